"""float32 that is float32 on every device.

On GPUs and TPUs, JAX runs float32 matrix products in TF32 (or bfloat16
passes) unless told otherwise, which moves Gemma's logits by up to 3e-2 on
an H200; TensorFlow does the same on NVIDIA GPUs. A model whose compute
dtype is float32 runs its products at full float32 precision here, on every
backend and device. `set_float32_matmul_precision("high")` (or the
environment variable `KERAS_GEMMA_FLOAT32_MATMUL_PRECISION=high`) lets
float32 models take TF32's speed instead. bfloat16 models are unaffected.
"""

import contextlib
import os

import keras

PRECISIONS = ("highest", "high")
_precision = os.environ.get("KERAS_GEMMA_FLOAT32_MATMUL_PRECISION", "highest")


def set_float32_matmul_precision(precision):
    """`"highest"` (the default): float32 models multiply in full float32
    on every device. `"high"`: they may use TF32 on GPUs (faster, about
    three decimal digits)."""
    global _precision
    if precision not in PRECISIONS:
        raise ValueError(f"The float32 matmul precision must be one of {PRECISIONS}, got {precision!r}.")
    _precision = precision


def get_float32_matmul_precision():
    """The setting of `set_float32_matmul_precision`."""
    if _precision not in PRECISIONS:
        raise ValueError(
            f"KERAS_GEMMA_FLOAT32_MATMUL_PRECISION must be one of {PRECISIONS}, got {_precision!r}."
        )
    return _precision


def matmul_precision(compute_dtype):
    """A context in which a model computing in `compute_dtype` traces (JAX)
    or runs its products: full float32 for float32 models unless
    `set_float32_matmul_precision("high")`; no change otherwise."""
    if keras.backend.standardize_dtype(compute_dtype) != "float32":
        return contextlib.nullcontext()
    full = get_float32_matmul_precision() == "highest"
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        # Read when each product is traced, so jitted functions keep it.
        return jax.default_matmul_precision("highest" if full else "tensorfloat32")
    if backend == "torch":
        return _torch_precision("highest" if full else "high")
    if backend == "tensorflow":
        return _tensorflow_tf32(not full)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _torch_precision(precision):
    import torch

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@contextlib.contextmanager
def _tensorflow_tf32(enabled):
    # A process-wide switch, read when a product runs: it stays set, so
    # that graphs traced here run at this precision later too.
    import tensorflow as tf

    tf.config.experimental.enable_tensor_float_32_execution(enabled)
    yield
