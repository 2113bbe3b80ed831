import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import keras  # noqa: E402

from keras_gemma.generation import samplers  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)
    np.random.seed(0)


def backend():
    return keras.config.backend()


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def accelerator():
    """The accelerator Keras computes on under this backend ("gpu", "tpu",
    "cuda"), or None on a CPU-only machine."""
    if backend() == "jax":
        import jax

        platform = jax.devices()[0].platform
        return None if platform == "cpu" else platform
    if backend() == "torch":
        import torch

        return "cuda" if torch.cuda.is_available() else None
    import tensorflow as tf

    return "gpu" if tf.config.list_physical_devices("GPU") else None


class ScriptedSampler(samplers.Sampler):
    """Emits `script[step]` in every row, whatever the logits."""

    def __init__(self, script):
        super().__init__()
        self.script = np.array(script, np.int32)

    def __call__(self, logits, key):
        token = keras.ops.take(keras.ops.convert_to_tensor(self.script), key[1])
        return keras.ops.broadcast_to(token, (logits.shape[0],))


def pytest_xdist_auto_num_workers(config):
    """The workers `-n auto` (the README's command) starts: two under JAX and
    TensorFlow on a machine with 2+ cores and 20+ GB (the two JAX workers
    peaked at 19.7 GB together), else none: the suite runs in this process.
    Always none under PyTorch: the graphs its generation traces stay in
    TorchScript's process-wide compilation unit after their model is freed,
    and two processes that grow so do not fit a 24 GB machine."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    if os.environ.get("KERAS_BACKEND", "jax") == "torch" or memory < 20 * 2**30 or (os.cpu_count() or 1) < 2:
        return 0
    return 2


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`-n auto --dist loadgroup`, the README's command),
    every test that loads the real Gemma 3 270M in-process runs in one worker,
    so the checkpoint is loaded (and transformers' reference computed) once."""
    for item in items:
        if {"real_270m", "hf_270m_reference"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("real_270m"))
