"""float32 means float32 on every device (`keras_gemma/precision.py`)."""

import numpy as np
import pytest

import keras_gemma
from keras_gemma import precision
from conftest import accelerator, backend, to_numpy
from hf_reference import build_hf, gemma2_config, gemma3_config, hf_logits, ours_from_hf, padded_batch


@pytest.mark.skipif(accelerator() is None, reason="needs a GPU or TPU")
@pytest.mark.parametrize("make_config", [gemma2_config, gemma3_config], ids=["gemma2", "gemma3"])
def test_float32_parity_with_transformers_on_the_accelerator(make_config):
    """On a GPU or TPU at the framework's default settings (where JAX would
    multiply float32 in TF32), a float32 model's logits equal transformers'
    (computed on the CPU) at 1e-4."""
    hf = build_hf(make_config(), seed=1)
    ids, mask = padded_batch(13)
    expected = hf_logits(hf, ids, mask)
    ours = ours_from_hf(hf)
    actual = to_numpy(ours({"token_ids": ids, "padding_mask": mask}))
    np.testing.assert_allclose(actual[mask], expected[mask], atol=1e-4, rtol=1e-4)


def model(dtype):
    config = keras_gemma.GemmaConfig(
        vocabulary_size=64, num_layers=2, hidden_dim=32, num_query_heads=2, num_key_value_heads=1,
        head_dim=16, intermediate_dim=48, layer_types=("local", "global"), sliding_window_size=4,
        attention_logit_softcap=5.0,
    )
    return keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(config, dtype=dtype))


@pytest.mark.skipif(backend() != "jax", reason="inspects JAX's traced products")
@pytest.mark.parametrize("dtype, setting, expected", [
    ("float32", "highest", "HIGHEST"),
    ("float32", "high", "HIGH"),
    ("bfloat16", "highest", None),
])
def test_jax_traces_float32_products_at_the_chosen_precision(dtype, setting, expected, monkeypatch):
    """Every product of a float32 model (projections, attention, the head)
    is traced at full float32 precision, or TF32 when asked; bfloat16
    models keep JAX's default."""
    import jax

    monkeypatch.setattr(precision, "_precision", setting)
    lm = model(dtype)
    ids = np.array([[2, 5, 7, 9, 11]], "int32")

    def forward(ids):
        return lm({"token_ids": ids, "padding_mask": ids > 0})

    dots = [
        eqn.params["precision"]
        for eqn in jax.make_jaxpr(forward)(ids).eqns
        for eqn in _all_eqns(eqn)
        if eqn.primitive.name == "dot_general"
    ]
    assert len(dots) >= 2 * 7 + 1  # per layer 7 projections (and attention), the head
    names = {None if p is None else str(p[0]).split(".")[-1] for p in dots}
    assert names == {expected}


def _all_eqns(eqn):
    """An equation and those of the jaxprs nested in it (pjit, custom_jvp)."""
    yield eqn
    for value in eqn.params.values():
        inner = getattr(value, "jaxpr", None)
        inner = getattr(inner, "jaxpr", inner)
        for sub in getattr(inner, "eqns", ()):
            yield from _all_eqns(sub)


def test_precision_setting_is_checked():
    with pytest.raises(ValueError, match="highest"):
        keras_gemma.set_float32_matmul_precision("tf32")
    assert keras_gemma.get_float32_matmul_precision() == "highest"


@pytest.mark.skipif(backend() != "torch", reason="PyTorch's float32 matmul precision")
def test_torch_float32_model_runs_at_highest_precision(monkeypatch):
    import torch

    seen = []
    lm = model("float32")
    original = torch.einsum

    def spy(*args, **kwargs):
        seen.append(torch.get_float32_matmul_precision())
        return original(*args, **kwargs)

    torch.set_float32_matmul_precision("high")
    try:
        monkeypatch.setattr(torch, "einsum", spy)
        lm({"token_ids": np.array([[2, 5, 7]]), "padding_mask": np.array([[1, 1, 1]])})
    finally:
        torch.set_float32_matmul_precision("highest")
    assert seen and set(seen) == {"highest"}
    assert torch.get_float32_matmul_precision() == "highest"
