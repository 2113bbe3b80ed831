"""Gemma 4's mixture-of-experts feed-forward (26B-A4B) against transformers'
`Gemma4ForCausalLM`.

The dense test model of `test_gemma4.py` with `enable_moe_block`: 8 experts of
width 32, top 2, beside the dense feed-forward in every block. The router's
kernel is large, so routing is decisive and uneven (tokens pick different
expert pairs; asserted), its scales and the experts' scales away from 1.
Then: the experts off, or top 1, move the logits; the gathered (decode)
dispatch equals the dense one; `save_pretrained` loads here,
`export_to_transformers` loads there; cached greedy decoding equals uncached
forward passes; the sharding layout covers the expert banks; LoRA runs and
leaves the experts frozen, int8 quantizes them too (their own tests:
`test_gemma4_moe_quantized.py`).
"""

import json
import os

import numpy as np
import pytest
import torch
import transformers

import keras
import keras_gemma
from conftest import backend, to_numpy
from hf_reference import VOCAB, hf_logits, ours_from_hf, padded_batch
from keras_gemma.checkpoints.huggingface import config_from_hf
from gemma4_reference import (
    RELEASED_26B_A4B, TOLERANCE, assert_checkpoints_round_trip, assert_lora_merges_and_int8_keeps_the_top_token,
    assert_same_logits, build_gemma4, gemma4_config, logits_of, with_weights_of,
)

EXPERTS, TOP_K, WIDTH = 8, 2, 32


def moe_config(**overrides):
    args = dict(enable_moe_block=True, num_experts=EXPERTS, top_k_experts=TOP_K, moe_intermediate_size=WIDTH)
    return gemma4_config(**{**args, **overrides})


def build_moe(hf_config=None, seed=0, scale=0.25, router_scale=4.0):
    """`build_gemma4` with a router kernel `router_scale` times larger."""
    return build_gemma4(hf_config or moe_config(), seed=seed, scale=scale, router_scale=router_scale)


@pytest.fixture(scope="module")
def hf_model():
    return build_moe(seed=1)


@pytest.fixture(scope="module")
def ours(hf_model):
    return ours_from_hf(hf_model)


def test_config_from_transformers(ours):
    config = ours.config
    assert (config.num_experts, config.top_k_experts, config.moe_intermediate_dim) == (EXPERTS, TOP_K, WIDTH)
    assert "num_experts" in config.gemma4_mechanisms()
    shapes = {name: tuple(w.shape) for name, w in ours.backbone.weight_map().items()}
    assert shapes["blocks.0.moe.gate_up"] == (EXPERTS, 2, 64, WIDTH) and shapes["blocks.0.moe.down"] == (EXPERTS, WIDTH, 64)
    assert shapes["blocks.0.moe.router"] == (64, EXPERTS) and shapes["blocks.0.moe.expert_scale"] == (EXPERTS,)
    assert shapes["blocks.4.post_dense_ffw_norm"] == shapes["blocks.4.pre_moe_norm"] == (64,)
    assert config.num_parameters() == sum(int(np.prod(s)) for s in shapes.values())


def test_routing_is_uneven(hf_model):
    """Tokens pick different expert pairs, in every layer, by large margins."""
    picks = []
    hooks = [
        layer.router.register_forward_hook(lambda module, args, out: picks.append(out[2].sort(-1).values))
        for layer in hf_model.model.layers
    ]
    try:
        hf_logits(hf_model, *padded_batch(13))
    finally:
        for hook in hooks:
            hook.remove()
    assert len(picks) == 5
    for layer_picks in picks:
        assert len({tuple(row) for row in layer_picks.tolist()}) > 3


def test_logits_match_transformers(ours, hf_model):
    ids, _, _ = assert_same_logits(ours, hf_model)
    assert ours.config.sliding_window_size < ids.shape[1]


def test_gathered_dispatch_equals_dense(ours):
    """A few tokens go through only their chosen experts' kernels; the same
    tokens through every expert with the gate matrix give the same output."""
    moe = ours.backbone.blocks[1].moe
    x = keras.ops.convert_to_tensor(np.random.default_rng(0).normal(size=(2, 3, 64)).astype("float32"))
    experts, weights = moe.route(x)
    gates = keras.ops.sum(keras.ops.one_hot(experts, EXPERTS) * weights[..., None], axis=2)
    assert np.count_nonzero(to_numpy(gates), axis=-1).tolist() == [[TOP_K] * 3] * 2
    np.testing.assert_allclose(to_numpy(moe.gathered(x, experts, weights)), to_numpy(moe.dense(x, gates)), atol=1e-5)
    np.testing.assert_allclose(to_numpy(moe(x[:1, :2], router_input=x[:1, :2])), to_numpy(moe.dense(x, gates))[:1, :2], atol=1e-5)


@pytest.mark.parametrize(
    "changes",
    [{"num_experts": None, "top_k_experts": None, "moe_intermediate_dim": None}, {"top_k_experts": 1}],
    ids=["no_experts", "top_1"],
)
def test_experts_move_the_logits(ours, changes):
    ids, mask = padded_batch(13)
    moved = np.abs(logits_of(with_weights_of(ours, **changes), ids, mask) - logits_of(ours, ids, mask))[mask].max()
    assert moved > 100 * TOLERANCE


def test_bad_expert_configs_are_refused(ours):
    with pytest.raises(ValueError, match="must not exceed `num_experts`"):
        ours.config.replace(top_k_experts=9)
    with pytest.raises(ValueError, match="without `num_experts`"):
        ours.config.replace(num_experts=None)
    with pytest.raises(ValueError, match="`moe_intermediate_dim` must be a positive integer"):
        ours.config.replace(moe_intermediate_dim=0)
    fields = moe_config().to_dict()
    with pytest.raises(ValueError, match="needs \\['num_experts'\\]"):
        config_from_hf({**fields, "num_experts": None})




def test_26b_a4b_architecture_is_the_released_config():
    """The preset architecture equals what `config_from_hf` reads from the
    released config.json (25.2B text parameters, 128 experts, top 8)."""
    from keras_gemma.presets import ARCHITECTURES

    config = ARCHITECTURES["gemma4_26b_a4b"]
    assert config_from_hf({"model_type": "gemma4", "text_config": RELEASED_26B_A4B}) == config
    assert round(config.num_parameters() / 1e9, 1) == 25.2
    # transformers' model at full size, on the meta device (no weights);
    # its config class takes 0, not the file's null, for "no per-layer input".
    with torch.device("meta"):
        hf_config = transformers.Gemma4TextConfig(**{**RELEASED_26B_A4B, "hidden_size_per_layer_input": 0})
        hf = transformers.Gemma4ForCausalLM(hf_config)
    buffers = sum(b.numel() for name, b in hf.named_buffers() if name.endswith("layer_scalar"))
    assert config.num_parameters() == sum(p.numel() for p in hf.parameters()) + buffers


def test_checkpoints_round_trip(ours, hf_model, tmp_path):
    """`save_pretrained` loads here; `export_to_transformers` loads there."""
    hf = assert_checkpoints_round_trip(ours, hf_model, tmp_path)
    assert hf.config.enable_moe_block and hf.config.num_experts == EXPERTS and hf.config.top_k_experts == TOP_K


def test_save_to_preset_round_trips(ours, tmp_path):
    """A keras-hub Gemma4Backbone preset with `enable_moe_block`, loaded back exactly."""
    directory = str(tmp_path / "preset")
    ours.save_to_preset(directory)
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    assert config["class_name"] == "Gemma4Backbone" and config["config"]["enable_moe_block"]
    again = keras_gemma.GemmaCausalLM.from_preset(directory)
    assert again.config == ours.config
    ids, mask = padded_batch(13)
    np.testing.assert_array_equal(logits_of(again, ids, mask), logits_of(ours, ids, mask))


def test_lora_leaves_the_experts_frozen_and_int8_quantizes_them(ours):
    """LoRA targets the dense projections and freezes the experts (a
    target among them is refused); int8 quantizes the projections and the
    expert banks (the router stays float), keeping the top token."""
    with pytest.raises(ValueError, match="mixture of experts"):
        with_weights_of(ours).backbone.enable_lora(2, target_layers=("query", "experts"))
    lm, _, _ = assert_lora_merges_and_int8_keeps_the_top_token(ours)
    moe = lm.backbone.blocks[0].moe
    dtypes = {name: keras.backend.standardize_dtype(getattr(moe, name).dtype) for name in ("gate_up", "down", "router")}
    assert dtypes == {"gate_up": "int8", "down": "int8", "router": "float32"}
    assert tuple(moe.gate_up_scale.shape) == (EXPERTS, 2, 1, WIDTH) and tuple(moe.down_scale.shape) == (EXPERTS, 1, 64)


@pytest.mark.skipif(backend() != "jax", reason="keras.distribution sharding is JAX-only")
def test_layout_map_covers_the_experts(ours):
    from keras_gemma.distribution import get_layout_map, layout_problems, weight_shapes

    config = ours.config.replace(num_experts=16, moe_intermediate_dim=48)
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), [f"cpu:{i}" for i in range(8)])
    layout_map = get_layout_map(mesh, config=config)
    assert tuple(layout_map["decoder_block_3/moe/gate_up"].axes) == (None, None, "batch", "model")
    assert tuple(layout_map["decoder_block_3/moe/down"].axes) == (None, "model", "batch")
    assert "decoder_block_0/moe/gate_up" in weight_shapes(config) and layout_problems(layout_map, config) == []
    paths = {variable.path for variable in ours.backbone.weights if "/moe/" in variable.path}
    assert {path.split("/")[-1] for path in paths} == {"router", "router_scale", "expert_scale", "gate_up", "down"}
    for path in paths:  # the banks are sharded, the router replicated
        assert (layout_map[path] is not None) == path.endswith(("gate_up", "down")), path
    with pytest.raises(ValueError, match="50 is not divisible"):
        get_layout_map(mesh, config=config.replace(moe_intermediate_dim=50))


@pytest.mark.skipif(backend() != "jax", reason="keras.distribution sharding is JAX-only")
def test_26b_a4b_global_layers_are_not_split_by_head_where_they_cannot_be():
    """16 query heads and 8 local kv heads divide 4 devices, its global
    layers' 2 kv heads do not: attention goes along the hidden dimension."""
    from keras_gemma.distribution import get_layout_map, layout_problems
    from keras_gemma.presets import ARCHITECTURES

    config = ARCHITECTURES["gemma4_26b_a4b"]
    for shape in ((1, 2), (1, 4), (2, 4), (1, 8)):
        mesh = keras.distribution.DeviceMesh(shape, ("batch", "model"), [f"cpu:{i}" for i in range(int(np.prod(shape)))])
        layout_map = get_layout_map(mesh, config=config)
        assert layout_problems(layout_map, config) == [], shape
        key = tuple(layout_map["decoder_block_5/attention/key/kernel"].axes)
        assert key == (("model", "batch", None) if shape[1] == 2 else (None, "model", "batch")), shape


def test_greedy_with_cache_equals_full_forward():
    """A ragged batch through ring caches (window 4, wrapped) and full
    caches: prompts go through every expert (dense dispatch), decode steps
    through the chosen ones (3 rows x top 2 <= 8 experts: gathered). The
    uncached check is one right-padded forward of the 13-column shape the
    other tests use (JAX's eager operations, compiled per shape, are reused)."""
    lm = ours_from_hf(build_moe(seed=3, scale=0.05, router_scale=40.0))
    rng = np.random.default_rng(1)
    prompts, new_tokens = [rng.integers(4, VOCAB, n).tolist() for n in (5, 4, 2)], 8
    ids, mask = np.zeros((3, 5), np.int32), np.zeros((3, 5), bool)
    for i, prompt in enumerate(prompts):
        ids[i, : len(prompt)], mask[i, : len(prompt)] = prompt, True
    output = lm.generate({"token_ids": ids, "padding_mask": mask}, max_new_tokens=new_tokens, stop_token_ids=None)
    rows = [row[m].tolist() for row, m in zip(output["token_ids"], output["padding_mask"])]
    full, full_mask = np.zeros((3, 13), np.int32), np.zeros((3, 13), bool)
    for i, (prompt, row) in enumerate(zip(prompts, rows)):
        assert len(row) == len(prompt) + new_tokens and row[: len(prompt)] == prompt
        full[i, : len(row)], full_mask[i, : len(row)] = row, True
    picks = logits_of(lm, full, full_mask).argmax(-1)
    for i, (prompt, row) in enumerate(zip(prompts, rows)):
        assert row[len(prompt):] == picks[i, len(prompt) - 1 : len(row) - 1].tolist()
        assert len(set(row[len(prompt):])) >= 3, rows
