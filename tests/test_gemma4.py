"""Gemma 4's dense text decoder (the 31B's mechanisms) against transformers'
`Gemma4ForCausalLM`.

A tiny config where each mechanism bites: global layers with their own head
width (32 against 16) and fewer key/value heads (1 against 2), keys used as
values on global layers, proportional rope (a quarter of the global heads'
frequency pairs rotate), the scale-free value norm with attention scaling
1.0, a stored per-layer scalar, a final soft-cap, and a sliding window (4)
shorter than the padded batch (13). Then: each mechanism turned off moves
the logits, `save_pretrained` loads here, `export_to_transformers` loads
there, `save_to_preset` writes keras-hub's Gemma4Backbone preset, and
cached greedy decoding equals uncached forward passes.
"""

import json
import os

import numpy as np
import pytest
import torch

import keras_gemma
from conftest import to_numpy
from gemma4_reference import (
    LAYER_TYPES, TOLERANCE, assert_checkpoints_round_trip, assert_lora_merges_and_int8_keeps_the_top_token,
    assert_our_adapter_loads_into_peft, assert_same_logits, build_gemma4, gemma4_config, greedy_equals_full_forward,
    logits_of, moved, with_weights_of,
)
from hf_reference import VOCAB, hf_logits, ours_from_hf, padded_batch
from keras_gemma.checkpoints.huggingface import config_from_hf


@pytest.fixture(scope="module")
def hf_model():
    return build_gemma4(seed=1)


@pytest.fixture(scope="module")
def ours(hf_model):
    return ours_from_hf(hf_model)


def test_config_from_transformers(ours):
    config = ours.config
    assert config.layer_types == ("local", "global", "local", "local", "global")
    assert (config.head_dim, config.global_head_dim) == (16, 32)
    assert (config.num_key_value_heads, config.num_global_key_value_heads) == (2, 1)
    assert config.global_keys_as_values and config.use_value_norm and config.use_layer_scalar
    assert config.use_qk_norm and config.use_post_norms
    assert config.query_pre_attn_scalar == 1.0 and config.attention_logit_softcap is None
    assert (config.global_rope_base, config.global_rope_fraction) == (1_000_000.0, 0.25)
    assert (config.local_rope_base, config.local_rope_fraction) == (10_000.0, 1.0)
    assert config.sliding_window_size == 4 and config.final_logit_softcap == 6.0
    shapes = {name: tuple(w.shape) for name, w in ours.backbone.weight_map().items()}
    assert shapes["blocks.0.attention.key"] == (2, 64, 16) and shapes["blocks.0.attention.value"] == (2, 64, 16)
    assert shapes["blocks.1.attention.key"] == (1, 64, 32) and "blocks.1.attention.value" not in shapes
    assert shapes["blocks.1.attention.query"] == (4, 64, 32) and shapes["blocks.1.attention.output"] == (4, 32, 64)
    assert config.num_parameters() == sum(int(np.prod(s)) for s in shapes.values())


def test_logits_match_transformers(ours, hf_model):
    ids, _, _ = assert_same_logits(ours, hf_model)
    assert ours.config.sliding_window_size < ids.shape[1]


def test_long_rows_match_transformers(ours, hf_model):
    """3 x 40 tokens: ten windows, proportional rope at larger angles."""
    assert_same_logits(ours, hf_model, seq_len=40)


def test_mha_global_layers_without_shared_keys_match_transformers():
    """attention_k_eq_v off: transformers keeps every layer's key/value heads
    and a value projection; global layers keep their own head width."""
    hf = build_gemma4(gemma4_config(attention_k_eq_v=False, num_key_value_heads=4), seed=2)
    ours = ours_from_hf(hf)
    assert not ours.config.global_keys_as_values and ours.config.num_global_key_value_heads == 4
    assert ours.backbone.blocks[1].attention.value_dense is not None
    assert_same_logits(ours, hf)


@pytest.mark.parametrize(
    "changes",
    [
        {"global_rope_fraction": 1.0},
        {"use_value_norm": False},
        {"query_pre_attn_scalar": 16},
        {"sliding_window_size": 64},
        {"final_logit_softcap": None},
        {"global_rope_base": 10_000.0},
    ],
    ids=lambda c: next(iter(c)),
)
def test_each_mechanism_moves_the_logits(ours, changes):
    ids, mask = padded_batch(13)
    logits = logits_of(ours, ids, mask)
    assert moved(logits_of(with_weights_of(ours, **changes), ids, mask), logits, mask) > 100 * TOLERANCE


def test_layer_scalars_move_the_logits(ours):
    ids, mask = padded_batch(13)
    other = with_weights_of(ours)
    for block in other.backbone.blocks:
        block.layer_scalar.assign(np.ones((1,), "float32"))
    assert moved(logits_of(other, ids, mask), logits_of(ours, ids, mask), mask) > 100 * TOLERANCE


def test_values_are_the_raw_key_projection(ours):
    """With a value kernel equal to the key kernel, a model without shared
    keys gives the same logits (values: the projection before key norm and
    rope); with the negated kernel they move, so values are read at all."""
    ids, mask = padded_batch(13)
    logits = logits_of(ours, ids, mask)
    separate = with_weights_of(ours, global_keys_as_values=False)
    for index in (1, 4):
        attention = separate.backbone.blocks[index].attention
        attention.value_dense.kernel.assign(attention.key_dense.kernel)
    np.testing.assert_allclose(logits_of(separate, ids, mask)[mask], logits[mask], atol=1e-5, rtol=1e-5)
    for index in (1, 4):
        attention = separate.backbone.blocks[index].attention
        attention.value_dense.kernel.assign(-attention.key_dense.kernel)
    assert moved(logits_of(separate, ids, mask), logits, mask) > 100 * TOLERANCE


def test_global_key_value_heads_are_grouped(ours):
    """One global key/value head for four query heads equals two heads that
    are its copies: each query head reads the head of its group."""
    ids, mask = padded_batch(13)
    wider = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(ours.config.replace(num_global_key_value_heads=2)))
    source = ours.backbone.weight_map()
    for name, variable in wider.backbone.weight_map().items():
        value = np.asarray(to_numpy(source[name]))
        if tuple(variable.shape) != value.shape:  # a global key kernel (1, d, h) -> (2, d, h)
            value = np.repeat(value, 2, axis=0)
        variable.assign(value)
    np.testing.assert_allclose(logits_of(wider, ids, mask)[mask], logits_of(ours, ids, mask)[mask], atol=1e-5)


def test_released_config_fields_load():
    """The released checkpoints' `global_head_dim` / `num_global_key_value_heads`
    (no `per_layer_config`) give the same config; mechanisms not supported
    yet are refused (PLE and key/value sharing: tests/test_gemma4_e.py)."""
    fields = gemma4_config().to_dict()
    released = {key: value for key, value in fields.items() if key != "per_layer_config"}
    released.update(global_head_dim=32, num_global_key_value_heads=1)
    assert config_from_hf(released) == config_from_hf(fields)
    assert config_from_hf({"model_type": "gemma4", "text_config": fields}) == config_from_hf(fields)
    assert config_from_hf({**fields, "use_bidirectional_attention": "vision"}) == config_from_hf(fields)
    # transformers makes the last layer global whatever `layer_types` says
    last_sliding = {**fields, "layer_types": LAYER_TYPES[:-1] + ["sliding_attention"]}
    assert config_from_hf(last_sliding).layer_types[-1] == "global"
    with pytest.raises(ValueError, match="not supported yet"):
        config_from_hf({**fields, "use_bidirectional_attention": "all"})


def test_checkpoints_round_trip(ours, hf_model, tmp_path):
    """`save_pretrained` loads here; `export_to_transformers` loads there."""
    hf = assert_checkpoints_round_trip(ours, hf_model, tmp_path)
    assert hf.model.layers[1].self_attn.v_proj is None and hf.model.layers[1].self_attn.head_dim == 32


def test_save_to_preset_round_trips(ours, tmp_path):
    """`save_to_preset` writes keras-hub's Gemma4Backbone preset (keras-hub's
    logits on it: `test_checkpoints_keras_hub_gemma4.py`), and `from_preset`
    loads it exactly."""
    directory = str(tmp_path / "preset")
    ours.save_to_preset(directory)
    with open(os.path.join(directory, "config.json")) as f:
        assert json.load(f)["class_name"] == "Gemma4Backbone"
    again = keras_gemma.GemmaCausalLM.from_preset(directory)
    assert again.config == ours.config
    ids, mask = padded_batch(13)
    np.testing.assert_array_equal(logits_of(again, ids, mask), logits_of(ours, ids, mask))


def test_lora_and_int8_quantization_run(ours):
    """LoRA adapters on every projection there is (global layers have no
    value kernel), counted per layer's shapes; int8 weights keep the top
    token."""
    assert_lora_merges_and_int8_keeps_the_top_token(ours)


def test_lora_adapters_go_through_peft(ours, hf_model, tmp_path):
    """LoRA on every projection, written for PEFT: it loads onto the exported
    model with the same logits (global layers have one key/value head and no
    v_proj: their rank differs, per layer, and their values are skipped).
    An adapter made by peft on transformers' model loads back here."""
    import peft

    _, (ids, mask), _ = assert_our_adapter_loads_into_peft(ours, tmp_path)

    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["k_proj", "v_proj", "o_proj", "up_proj"])
    model = peft.get_peft_model(build_gemma4(seed=1), config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    model.save_pretrained(str(tmp_path / "theirs"))
    again = with_weights_of(ours)
    again.backbone.load_lora_weights(str(tmp_path / "theirs"))
    expected = hf_logits(model, ids, mask)
    np.testing.assert_allclose(logits_of(again, ids, mask)[mask], expected[mask], atol=TOLERANCE, rtol=TOLERANCE)


def test_backbone_config_round_trips(ours):
    backbone = ours.backbone
    again = keras_gemma.GemmaBackbone.from_config(backbone.get_config())
    assert again.config == backbone.config


@pytest.fixture(scope="module")
def small_lm():
    # Small weights: with large ones the tied head echoes one token forever.
    return ours_from_hf(build_gemma4(seed=3, scale=0.05))


def test_greedy_with_cache_equals_full_forward(small_lm):
    """A ragged batch (prompts of 150, 11 and 3 tokens: padded to 192, a
    chunk of 128 columns then one of 64) through ring caches (window 4) and
    full caches of two head widths, many ring wraps."""
    rng = np.random.default_rng(1)
    greedy_equals_full_forward(small_lm, [rng.integers(4, VOCAB, n).tolist() for n in (150, 11, 3)], 16)
