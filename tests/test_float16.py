"""The float16 guard: Gemma 3 and Gemma 2 27B overflow float16, so building
one in float16 warns once, and the model stays finite there (the
feed-forward in float32, the residual stream clipped)."""

import copy
import warnings

import numpy as np
import pytest
import torch
from conftest import to_numpy
from hf_reference import build_hf, gemma2_config, gemma3_config, hf_logits, ours_from_hf, padded_batch

import keras_gemma
from keras_gemma import backbone as backbone_module

# Feed-forward weights 100x the test models' (N(0, 0.25)): the gated
# products pass 65504.
BOOST = 100.0


def _overflowing_hf():
    hf = build_hf(gemma3_config(), seed=2)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.mlp.gate_proj.weight.mul_(BOOST)
            layer.mlp.up_proj.weight.mul_(BOOST)
    return hf


def test_float16_stays_finite_where_its_products_overflow(monkeypatch):
    """transformers' float16 model returns non-finite logits on these
    weights; ours stays finite, agrees with float32's top-1 at 80% of
    positions or more, and warns once; float32 still equals transformers."""
    monkeypatch.setattr(backbone_module, "_float16_warned", set())
    hf = _overflowing_hf()
    ids, mask = padded_batch(24)
    expected = hf_logits(hf, ids, mask)
    with torch.no_grad():
        half = copy.deepcopy(hf).half()
        hf16 = half(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long)).logits.float().numpy()
    assert not np.isfinite(hf16[mask]).all()  # the overflow bites

    ours32 = to_numpy(ours_from_hf(hf)({"token_ids": ids, "padding_mask": mask}))
    np.testing.assert_allclose(ours32[mask], expected[mask], atol=1e-4, rtol=1e-4)
    with pytest.warns(UserWarning, match="Gemma 3 in float16.*bfloat16"):
        ours16 = ours_from_hf(hf, dtype="float16")
    logits16 = to_numpy(ours16({"token_ids": ids, "padding_mask": mask})).astype("float32")
    assert np.isfinite(logits16[mask]).all()
    agreement = (logits16.argmax(-1) == ours32.argmax(-1))[mask].mean()
    assert agreement >= 0.8, agreement
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours_from_hf(hf, dtype="float16")  # once per process


def test_float16_warning_names_the_models_at_risk(monkeypatch):
    """Gemma 2 27B warns; bfloat16, float32 and the smaller Gemma 2 do not."""
    monkeypatch.setattr(backbone_module, "_float16_warned", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours_from_hf(build_hf(gemma2_config()), dtype="float16")
        for dtype in ("bfloat16", "float32"):
            ours_from_hf(build_hf(gemma3_config()), dtype=dtype)
    config = keras_gemma.presets.ARCHITECTURES["gemma2_27b"]
    with pytest.warns(UserWarning, match="Gemma 2 27B in float16"):
        backbone_module._warn_if_float16_overflows(config, "float16")


def test_float16_attention_runs_on_every_backend():
    """Keras' fused attention asks JAX for float16 products accumulated in
    float32, which XLA's CPU backend refuses; float16 attention goes through
    the einsum path instead. A float16 model (Gemma 1: no warning) gives
    float32's logits to float16 rounding, and generates."""
    config = keras_gemma.GemmaConfig(
        vocabulary_size=64, num_layers=2, hidden_dim=32, num_query_heads=2, num_key_value_heads=1, head_dim=16,
        intermediate_dim=64,
    )
    full = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(config))
    half = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(config, dtype="float16"))
    for name, variable in half.backbone.weight_map().items():
        variable.assign(full.backbone.weight_map()[name])
    batch = {"token_ids": np.arange(2, 26)[None].astype("int32"), "padding_mask": np.ones((1, 24), bool)}
    expected = to_numpy(full(batch))
    actual = to_numpy(half(batch)).astype("float32")
    np.testing.assert_allclose(actual, expected, atol=2e-2 * np.abs(expected).max())
    output = half.generate(batch, max_new_tokens=4, stop_token_ids=None)
    assert output["token_ids"].shape == (1, 28)
