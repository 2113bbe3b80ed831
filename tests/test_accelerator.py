"""Generation on a GPU or TPU: the checks of `test_generation.py` that an
accelerator's compiled paths could break (JAX's and TensorFlow's XLA on the
device; PyTorch's `torch.compile` with CUDA graphs, `_TorchCompiled`). They
run where Keras computes on an accelerator and skip on a CPU-only machine
(CI). float32 models multiply at full float32 precision there
(`keras_gemma.precision`), so greedy tokens are comparable with uncached
forward passes. (The float32 logits' parity on the device:
`test_precision.py`.)"""

import pytest
from conftest import accelerator, backend

import test_generation
from keras_gemma.generation import compile as compile_module

pytestmark = [
    pytest.mark.accelerator,
    pytest.mark.skipif(accelerator() is None, reason="needs a GPU or TPU"),
]


@pytest.mark.parametrize("name", ["gemma3", "gemma2"])
def test_greedy_with_cache_equals_full_forward_on_the_accelerator(name):
    """A ragged batch past the sliding window: cached greedy decoding equals
    uncached forward passes, on the device."""
    lm = test_generation._hf_lm(name)
    if backend() == "torch":
        assert type(lm._functions().compiler) is compile_module._TorchCompiled
    test_generation._check_greedy_equals_full_forward(lm)


def test_stop_tokens_and_streaming_on_the_accelerator():
    """Rows end on their own stop tokens (PyTorch looks at them every few
    steps there), and streamed tokens are `generate`'s."""
    lm = test_generation._hf_lm("gemma3")
    test_generation.test_stop_tokens_end_each_row_independently(lm)
    test_generation.test_streamed_tokens_equal_generate(lm)


def test_no_recompile_within_a_bucket_on_the_accelerator(monkeypatch):
    """Prompts and budgets within one bucket reuse the compiled functions."""
    test_generation.test_no_recompile_for_same_bucket(test_generation._hf_lm("gemma3"), monkeypatch)

