"""Gemma 4 E2B/E4B's text decoder mechanisms against transformers'
`Gemma4ForCausalLM`: per-layer embeddings (PLE) and key/value sharing.

A tiny config where each bites: 6 layers, the last 2 sharing keys and
values (layer 4, sliding, reads layer 3's; layer 5, global, reads layer
1's), their feed-forward twice as wide (E2B's `use_double_wide_mlp`),
per-layer embeddings 8 wide, and a sliding window (4) shorter than the
padded batch (13). Then: each mechanism turned off moves the logits,
`save_pretrained` loads here, `export_to_transformers` loads there, cached
greedy decoding (ring caches wrapping, shared layers reading the cache
their source wrote in the same step) equals uncached forward passes, and
LoRA and int8 run.
"""

import numpy as np
import pytest
import torch
import transformers

import keras_gemma
from conftest import to_numpy
from gemma4_reference import (
    E2B, E4B, TOLERANCE, assert_checkpoints_round_trip, assert_lora_merges_and_int8_keeps_the_top_token,
    assert_our_adapter_loads_into_peft, assert_same_logits, build_gemma4, gemma4_config, greedy_equals_full_forward,
    logits_of, moved, with_weights_of,
)
from hf_reference import VOCAB, ours_from_hf, padded_batch
from keras_gemma.checkpoints.huggingface import config_from_hf
from keras_gemma.config import GemmaConfig
from keras_gemma.presets import PUBLISHED_PARAMETERS

LAYER_TYPES = ["sliding_attention", "full_attention"] + ["sliding_attention"] * 3 + ["full_attention"]


def e_config(**overrides):
    """The dense test model with 6 layers, the last 2 sharing keys and
    values (double-wide feed-forward there) and 8-wide per-layer inputs."""
    args = dict(
        intermediate_size=48, num_hidden_layers=6, layer_types=LAYER_TYPES,
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB,
        num_kv_shared_layers=2, use_double_wide_mlp=True,
    )
    return gemma4_config(**{**args, **overrides})


@pytest.fixture(scope="module")
def hf_model():
    return build_gemma4(e_config(), seed=1)


@pytest.fixture(scope="module")
def ours(hf_model):
    return ours_from_hf(hf_model)


def test_config_from_transformers(ours, hf_model):
    config, backbone = ours.config, ours.backbone
    assert (config.per_layer_input_dim, config.per_layer_vocabulary_size) == (8, VOCAB)
    assert config.num_kv_shared_layers == 2 and config.use_double_wide_mlp
    assert [config.kv_source(i) for i in range(6)] == [0, 1, 2, 3, 3, 1]
    assert hf_model.config.kv_sharing_modes == [None, "store", None, "store", "reuse", "reuse"]
    assert backbone.cache_slots == [0, 1, 2, 3, None, None]
    assert len(backbone.init_cache(1, 8)) == 4
    shapes = {name: tuple(w.shape) for name, w in backbone.weight_map().items()}
    assert shapes["per_layer_token_embedding"] == (VOCAB, 6 * 8)
    assert shapes["per_layer_model_projection"] == (64, 6 * 8) and shapes["per_layer_projection_norm"] == (8,)
    assert shapes["blocks.4.per_layer_input_gate"] == (64, 8) and shapes["blocks.4.per_layer_projection"] == (8, 64)
    for i in (4, 5):
        assert not {f"blocks.{i}.attention.{n}" for n in ("key", "value", "key_norm")} & set(shapes)
        assert f"blocks.{i}.attention.query_norm" in shapes
    assert shapes["blocks.3.feed_forward.up"] == (64, 48) and shapes["blocks.4.feed_forward.up"] == (64, 96)
    assert config.num_parameters() == sum(int(np.prod(s)) for s in shapes.values())
    assert {"per_layer_input_dim", "num_kv_shared_layers", "use_double_wide_mlp"} <= set(config.gemma4_mechanisms())


def test_logits_match_transformers(ours, hf_model):
    assert_same_logits(ours, hf_model)


def test_single_wide_mlp_and_mha_match_transformers():
    hf = build_gemma4(e_config(use_double_wide_mlp=False, attention_k_eq_v=False, num_kv_shared_layers=3), seed=5)
    model = ours_from_hf(hf)
    assert [model.config.kv_source(i) for i in range(6)] == [0, 1, 2, 2, 2, 1]
    assert_same_logits(model, hf)


@pytest.mark.parametrize(
    "changes",
    [
        {"per_layer_input_dim": 0},
        {"num_kv_shared_layers": 0, "use_double_wide_mlp": False},
        {"use_double_wide_mlp": False},
    ],
    ids=lambda c: next(iter(c)),
)
def test_each_mechanism_moves_the_logits(ours, changes):
    ids, mask = padded_batch(13)
    assert moved(logits_of(with_weights_of(ours, **changes), ids, mask), logits_of(ours, ids, mask), mask) > 100 * TOLERANCE


def test_shared_layers_read_their_source(ours):
    """Negate layer 1's key kernel and pin the residual stream after layer 1
    to the original's: layers 2-4 then match the original (layer 4, shared,
    reads layer 3), and layer 5, shared, global, moves: it reads layer 1's
    keys."""
    ids, mask = padded_batch(13)
    original = {}

    def record(x, i):
        original[i] = x
        return x

    ours.backbone.hidden_states(ids, mask, layer_intercept_fn=record)
    other = with_weights_of(ours)
    kernel = other.backbone.blocks[1].attention.key_dense.kernel
    kernel.assign(-kernel)
    changed = {}

    def pin(x, i):
        x = original[1] if i == 1 else x
        changed[i] = x
        return x

    other.backbone.hidden_states(ids, mask, layer_intercept_fn=pin)
    for i in (2, 3, 4):
        np.testing.assert_allclose(to_numpy(changed[i])[mask], to_numpy(original[i])[mask], atol=1e-5, rtol=1e-5)
    assert np.abs(to_numpy(changed[5]) - to_numpy(original[5]))[mask].max() > 1e-2


def test_per_layer_inputs_reach_every_block(ours):
    """Zeroing one layer's per-layer projection moves the logits: each
    block's gated residual is read."""
    ids, mask = padded_batch(13)
    logits = logits_of(ours, ids, mask)
    for i in (0, 5):
        other = with_weights_of(ours)
        kernel = other.backbone.blocks[i].per_layer_projection.kernel
        kernel.assign(np.zeros(kernel.shape, "float32"))
        assert moved(logits_of(other, ids, mask), logits, mask) > 100 * TOLERANCE


def test_config_errors():
    base = dict(
        vocabulary_size=VOCAB, num_layers=3, hidden_dim=16, num_query_heads=2, num_key_value_heads=1,
        head_dim=8, intermediate_dim=16,
    )
    with pytest.raises(ValueError, match="must be less than"):
        GemmaConfig(**base, num_kv_shared_layers=3)
    with pytest.raises(ValueError, match="no earlier layer"):
        GemmaConfig(**base, num_kv_shared_layers=1, layer_types=("global", "global", "local"), sliding_window_size=4)
    with pytest.raises(ValueError, match="non-negative"):
        GemmaConfig(**base, per_layer_input_dim=-1)
    with pytest.raises(ValueError, match="use_double_wide_mlp"):
        GemmaConfig(**base, use_double_wide_mlp=True)


def test_transformers_defaults_apply(hf_model):
    """A gemma4_text config without the PLE fields gets transformers' defaults."""
    fields = hf_model.config.to_dict()
    del fields["hidden_size_per_layer_input"], fields["vocab_size_per_layer_input"]
    config = config_from_hf(fields)
    assert (config.per_layer_input_dim, config.per_layer_vocabulary_size) == (256, 262_144)
    assert transformers.Gemma4TextConfig(**fields).hidden_size_per_layer_input == 256


def test_checkpoints_round_trip(ours, hf_model, tmp_path):
    """`save_pretrained` loads here; `export_to_transformers` loads there."""
    hf = assert_checkpoints_round_trip(ours, hf_model, tmp_path)
    assert hf.config.num_kv_shared_layers == 2 and hf.config.hidden_size_per_layer_input == 8
    assert not hasattr(hf.model.layers[4].self_attn, "k_proj")


def test_lora_and_int8_quantization_run(ours, tmp_path):
    """LoRA on every projection there is (shared layers have no key or value
    kernels), counted per layer; int8 weights (the per-layer table too) keep
    the top token, and a quantized preset loads with the same logits."""
    from keras_gemma.lora import kernel_shapes

    assert "key" not in kernel_shapes(ours.config, 4) and kernel_shapes(ours.config, 4)["up"] == (64, 96)
    lm, (ids, mask), _ = assert_lora_merges_and_int8_keeps_the_top_token(ours)
    assert lm.backbone.per_layer_token_embedding.quantization_mode == "int8"
    with pytest.warns(UserWarning):
        lm.save_to_preset(str(tmp_path / "int8"))
    again = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path / "int8"))
    np.testing.assert_array_equal(logits_of(again, ids, mask), logits_of(lm, ids, mask))


def test_lora_adapters_go_through_peft(ours, tmp_path):
    """LoRA on every projection, written for PEFT, loads onto the exported
    model with the same logits (the shared layers have no k_proj or v_proj
    there either), and reads back here."""
    adapter_dir, (ids, mask), expected = assert_our_adapter_loads_into_peft(ours, tmp_path)
    again = with_weights_of(ours)
    again.backbone.load_lora_weights(adapter_dir)
    np.testing.assert_allclose(logits_of(again, ids, mask)[mask], expected[mask], atol=TOLERANCE, rtol=TOLERANCE)


def test_remat_keeps_the_outputs(ours):
    """Rematerialized blocks (a source block is not: its keys and values
    are read later) give the same hidden states."""
    remat = keras_gemma.GemmaBackbone(ours.config, remat="blocks")
    for name, variable in remat.weight_map().items():
        variable.assign(ours.backbone.weight_map()[name])
    ids, mask = padded_batch(13)
    expected, _ = ours.backbone.hidden_states(ids, mask)
    actual, _ = remat.hidden_states(ids, mask, training=True)
    np.testing.assert_allclose(to_numpy(actual)[mask], to_numpy(expected)[mask], atol=1e-5, rtol=1e-5)


def test_backbone_config_round_trips(ours):
    again = keras_gemma.GemmaBackbone.from_config(ours.backbone.get_config())
    assert again.config == ours.config


def test_greedy_with_cache_equals_full_forward():
    """A ragged batch (prompts of 150, 11 and 3 tokens: a chunk of 128
    columns then one of 64) through ring caches (window 4, many wraps) and
    full caches; the shared layers read their sources' caches."""
    lm = ours_from_hf(build_gemma4(e_config(), seed=3, scale=0.05))
    rng = np.random.default_rng(1)
    greedy_equals_full_forward(lm, [rng.integers(4, VOCAB, n).tolist() for n in (150, 11, 3)], 16)




@pytest.mark.parametrize("fields, cached_layers", [(E2B, 15), (E4B, 24)], ids=["E2B", "E4B"])
def test_released_configs(fields, cached_layers):
    """At full size (transformers' model on the meta device, no weights):
    the same parameter count, the same source layers (transformers'
    "store" layers), and a cache for the non-shared layers only."""
    hf_config = transformers.Gemma4TextConfig(**fields)
    with torch.device("meta"):
        hf = transformers.Gemma4ForCausalLM(hf_config)
    scalars = sum(b.numel() for name, b in hf.named_buffers() if name.endswith("layer_scalar"))
    config = config_from_hf({**fields, "model_type": "gemma4_text"})
    assert config.num_parameters() == sum(p.numel() for p in hf.parameters()) + scalars
    first_shared = config.num_layers - config.num_kv_shared_layers
    sources = {config.kv_source(i) for i in range(first_shared, config.num_layers)}
    assert sources == {i for i, mode in enumerate(hf_config.kv_sharing_modes) if mode == "store"}
    assert sum(config.kv_source(i) == i for i in range(config.num_layers)) == cached_layers
    preset = keras_gemma.get_preset("gemma4_2b" if fields is E2B else "gemma4_4b")
    assert preset.config == config
    assert preset.config.num_parameters() == PUBLISHED_PARAMETERS[preset.architecture]
