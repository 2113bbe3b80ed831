"""Logits equal Hugging Face transformers' on the same weights, per generation.

Configs make each mechanism bite: sequences longer than the sliding window,
MQA and GQA, soft-caps that saturate, query_pre_attn_scalar != head_dim,
Gemma 3's 5:1 local/global pattern with two rope bases and linear scaling.
Each test also shows that turning the mechanism off changes the logits, so
agreement is not an accident of the mechanism never firing.
"""

import numpy as np
import pytest

import keras_gemma
from conftest import to_numpy
from hf_reference import (
    build_hf, gemma1_config, gemma2_config, gemma3_config, hf_logits, ours_from_hf, padded_batch, positions_of,
)

TOLERANCE = 1e-4


def our_logits(model, ids, mask):
    return to_numpy(model({"token_ids": ids, "padding_mask": mask}))


def assert_parity(hf_model, seq_len=13):
    ids, mask = padded_batch(seq_len)
    ours = ours_from_hf(hf_model)
    expected = hf_logits(hf_model, ids, mask)
    actual = our_logits(ours, ids, mask)
    assert actual.shape == expected.shape == (3, seq_len, hf_model.config.vocab_size)
    np.testing.assert_allclose(actual[mask], expected[mask], atol=TOLERANCE, rtol=TOLERANCE)
    return ours, ids, mask, actual


def assert_mechanism_matters(model, ids, mask, logits, **changes):
    """Same weights, one mechanism changed: the logits must move well past tolerance."""
    config = model.config.replace(**changes)
    other = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(config))
    for variable, value in zip(other.backbone.weights, model.backbone.weights):
        variable.assign(value)
    changed = our_logits(other, ids, mask)
    assert np.max(np.abs(changed[mask] - logits[mask])) > 100 * TOLERANCE, changes


@pytest.mark.parametrize("num_key_value_heads", [1, 4], ids=["mqa", "mha"])
def test_gemma1_matches_transformers(num_key_value_heads):
    hf = build_hf(gemma1_config(num_key_value_heads=num_key_value_heads))
    assert_parity(hf)


def test_gemma1_gqa_matches_transformers():
    assert_parity(build_hf(gemma1_config(num_key_value_heads=2)))


def test_gemma2_matches_transformers():
    ours, ids, mask, logits = assert_parity(build_hf(gemma2_config(), seed=1), seq_len=13)
    config = ours.config
    assert config.layer_types == ("local", "global", "local", "global")
    assert config.sliding_window_size == 4 < ids.shape[1]
    assert config.query_pre_attn_scalar == 24 != config.head_dim
    assert_mechanism_matters(ours, ids, mask, logits, attention_logit_softcap=None)
    assert_mechanism_matters(ours, ids, mask, logits, final_logit_softcap=None)
    assert_mechanism_matters(ours, ids, mask, logits, sliding_window_size=64)
    assert_mechanism_matters(ours, ids, mask, logits, query_pre_attn_scalar=16)
    assert np.abs(logits[mask]).max() > 0.9 * config.final_logit_softcap  # saturates


def test_gemma2_mqa_matches_transformers():
    assert_parity(build_hf(gemma2_config(num_key_value_heads=1), seed=2))


def test_gemma3_matches_transformers():
    ours, ids, mask, logits = assert_parity(build_hf(gemma3_config(), seed=3), seq_len=13)
    config = ours.config
    assert config.layer_types == ("local",) * 5 + ("global", "local")
    assert (config.global_rope_base, config.global_rope_scaling) == (1_000_000.0, 8.0)
    assert (config.local_rope_base, config.local_rope_scaling) == (10_000.0, 1.0)
    assert config.use_qk_norm and config.use_post_norms
    assert_mechanism_matters(ours, ids, mask, logits, sliding_window_size=64)
    assert_mechanism_matters(ours, ids, mask, logits, global_rope_scaling=1.0)
    assert_mechanism_matters(ours, ids, mask, logits, local_rope_base=1_000_000.0)
    assert_mechanism_matters(ours, ids, mask, logits, query_pre_attn_scalar=16)


def test_long_sequences_match_transformers():
    """Longer rows (3 x 40 tokens), ten times the sliding window."""
    assert_parity(build_hf(gemma2_config(), seed=5), seq_len=40)
    assert_parity(build_hf(gemma3_config(), seed=5), seq_len=40)


def test_prompts_attending_by_blocks_match_transformers():
    """3 x 300 tokens: self-attention by blocks of 128 queries, each over
    the keys it can see (`Attention.attend_itself`), the last block short,
    sliding windows of 4 cutting each block's keys."""
    from keras_gemma import layers

    assert 300 >= 2 * layers.ATTENTION_BLOCK
    assert_parity(build_hf(gemma2_config(), seed=6), seq_len=300)
    assert_parity(build_hf(gemma3_config(), seed=6), seq_len=300)


def test_gemma3_mqa_legacy_config_matches_transformers():
    """Older HF Gemma 3 configs: `sliding_window_pattern`, `rope_local_base_freq`, `rope_scaling`."""
    hf = build_hf(gemma3_config(num_key_value_heads=1), seed=4)
    legacy = hf.config.to_dict()
    legacy.pop("layer_types")
    legacy.pop("rope_parameters")
    legacy.update(
        sliding_window_pattern=6, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
    )
    from keras_gemma.checkpoints.huggingface import config_from_hf

    config = config_from_hf(legacy)
    assert config.layer_types == ("local",) * 5 + ("global", "local")
    assert config == ours_from_hf(hf).config
    assert_parity(hf)


def test_left_padding_equals_unpadded():
    """A left-padded row gives the unpadded row's logits (positions skip padding)."""
    hf = build_hf(gemma3_config(), seed=5)
    ours = ours_from_hf(hf)
    ids, mask = padded_batch(13)
    padded = our_logits(ours, ids[2:3], mask[2:3])[0][mask[2]]
    alone = our_logits(ours, ids[2:3, 5:], mask[2:3, 5:])[0]
    np.testing.assert_allclose(padded, alone, atol=1e-5, rtol=1e-5)
    assert (positions_of(mask)[2][mask[2]] == np.arange(8)).all()
