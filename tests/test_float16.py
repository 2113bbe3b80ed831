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
