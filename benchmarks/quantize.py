"""Parameter memory (float32 / bfloat16 / int8 / int4) and top-1 agreement of
the quantized models with float32, for one architecture.

Weights are random (numpy draws shaped like trained ones: unit-variance
embeddings, `1/sqrt(fan_in)` kernels), so the agreement says how much the
quantization moves the logits, not how a real checkpoint fares; that version
will use `GemmaCausalLM.from_preset`.

    KERAS_BACKEND=jax python benchmarks/quantize.py                 # gemma3_270m
    KERAS_BACKEND=jax python benchmarks/quantize.py --architecture gemma3_1b --layers 4
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="gemma3_270m", choices=sorted(ARCHITECTURES))
    parser.add_argument("--layers", type=int, default=None, help="keep only this many blocks (faster)")
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

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
