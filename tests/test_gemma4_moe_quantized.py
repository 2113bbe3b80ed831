"""int8/int4 expert banks of Gemma 4's mixture of experts (26B-A4B).

A tiny model of 26B-A4B's shape (a local and a global layer, keys as
values on the global one, 8 experts of width 32, top 2, beside the dense
feed-forward), with a router large enough that routing is decisive. int4
runs in groups of 24 inputs, so every bank has several groups and a
partial one (64 = 24 + 24 + 16, 32 = 24 + 8). Checked: each expert's
stored kernel, scale and zero point are what Keras' own `EinsumDense`
quantization stores for the same kernel; the quantized model is a float
model holding the dequantized weights (banks dequantized by a numpy
reference) and stays close to the float model; cached greedy decoding
(prompts through every expert, decode steps through the gathered ones)
equals uncached passes; a quantized preset loads with the same logits
without building float banks first; the layout map shards the scales.
"""

import json

import numpy as np
import pytest

import keras
import keras_gemma
from conftest import to_numpy
from keras_gemma.checkpoints.weights import CheckpointError
from keras_gemma.layers import MixtureOfExperts
from keras_gemma.quantization import BankQuantizer, one_gc_collect, quantized_layers

EXPERTS, TOP_K, WIDTH, HIDDEN, BLOCK = 8, 2, 32, 64, 24
MODES = {
    "int8": keras.quantizers.Int8QuantizationConfig(activation_quantizer=None),
    "int4": keras.quantizers.Int4QuantizationConfig(block_size=BLOCK),
}


def moe_config():
    return keras_gemma.GemmaConfig(
        vocabulary_size=96, num_layers=2, hidden_dim=HIDDEN, num_query_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_dim=96, layer_types=("local", "global"), sliding_window_size=4,
        query_pre_attn_scalar=1.0, final_logit_softcap=30.0, use_post_norms=True, use_qk_norm=True,
        global_rope_base=1e6, global_rope_fraction=0.25, global_head_dim=32, num_global_key_value_heads=1,
        global_keys_as_values=True, use_value_norm=True, use_layer_scalar=True,
        num_experts=EXPERTS, top_k_experts=TOP_K, moe_intermediate_dim=WIDTH,
    )


def new_model():
    return keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(moe_config()))


def assign_weights(model, seed=0, embedding_std=1.0):
    """The same weights on every backend: `1/sqrt(fan_in)` kernels, a
    router 3x that (decisive routing), scales near 1. With unit embeddings
    the residual stream is mostly the input token's, which the head then
    picks again; at std 0.05 the blocks pick the next token."""
    rng = np.random.default_rng(seed)
    for name, variable in model.backbone.weight_map().items():
        shape = tuple(variable.shape)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "layer_scalar":
            continue
        if leaf in ("router_scale", "expert_scale"):
            value = rng.uniform(0.5, 1.5, shape)
        elif len(shape) == 1:  # a norm scale, around 0 (the model uses 1 + scale)
            value = rng.normal(size=shape) * 0.1
        else:
            fan_in = {"token_embedding": embedding_std**-2, "router": shape[0] / 9, "output": shape[0] * shape[1]}.get(
                leaf, shape[-2] if leaf in ("gate", "up", "down", "gate_up") else shape[1]  # (.., in, out); (n, d, h)
            )
            value = rng.normal(size=shape) * fan_in**-0.5
        variable.assign(value.astype("float32"))


def batch():
    """A full, a right-padded and a left-padded row, in the (3, 13) shape
    of `test_gemma4_moe.py` (JAX's eager operations are compiled per shape)."""
    ids = np.random.default_rng(1).integers(3, 96, (3, 13)).astype("int32")
    mask = np.ones(ids.shape, bool)
    mask[1, -4:] = False
    mask[2, :5] = False
    return ids, mask


def logits_of(model, ids, mask):
    return to_numpy(model({"token_ids": ids, "padding_mask": mask}))


@pytest.fixture(scope="module")
def models():
    """A float model and int8 / int4 copies of it."""
    float_model = new_model()
    assign_weights(float_model)
    result = {"float32": float_model}
    for mode, config in MODES.items():
        model = new_model()
        model.set_weights(float_model.get_weights())
        model.quantize(config=config)
        result[mode] = model
    return result


def unpack_int4(packed, width):
    """numpy: two signed nibbles per byte along the last axis, low first."""
    packed = packed.astype(np.uint8)
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=-1).astype(np.int8)
    nibbles = (nibbles ^ 8) - 8  # 8..15 -> -8..-1
    return nibbles.reshape(*packed.shape[:-1], -1)[..., :width]


def dequantized_bank(moe, name, width):
    """numpy reference: int8 `q / scale`; int4 in groups `(q - zero) * scale`,
    each group's scale for its BLOCK inputs."""
    values, scale = to_numpy(getattr(moe, name)), to_numpy(getattr(moe, name + "_scale")).astype(np.float32)
    if moe.bank_quantizer.mode == "int8":
        return values.astype(np.float32) / scale
    values = unpack_int4(values, width).astype(np.float32)
    rows = values.shape[-2]
    zero = np.repeat(to_numpy(getattr(moe, name + "_zero")), BLOCK, axis=-2)[..., :rows, :]
    return (values - zero) * np.repeat(scale, BLOCK, axis=-2)[..., :rows, :]


def int4_reference(kernels):
    """numpy: Keras' grouped int4 formula (`abs_max_quantize_grouped_with_zero_point`)
    on (..., in, out) kernels, groups of BLOCK inputs (the last zero-padded)."""
    *lead, rows, columns = kernels.shape
    groups = -(-rows // BLOCK)
    padded = np.concatenate([kernels, np.zeros((*lead, groups * BLOCK - rows, columns), kernels.dtype)], axis=-2)
    padded = padded.reshape(*lead, groups, BLOCK, columns)
    low, high = padded.min(axis=-2, keepdims=True), padded.max(axis=-2, keepdims=True)
    scale = (high - low + keras.config.epsilon()) / 15
    zero = np.clip(np.round(-low / scale) - 8, -8, 7)
    values = np.clip(np.round(padded / scale) + zero, -8, 7).reshape(*lead, groups * BLOCK, columns)[..., :rows, :]
    return values.astype(np.int8), scale[..., 0, :], zero[..., 0, :].astype(np.int8)


@pytest.mark.parametrize("mode", MODES)
def test_bank_values_are_keras_own_quantization(models, mode):
    """Every expert's kernel as Keras quantizes it: int8 by
    `abs_max_quantize` per output channel (the whole bank at once); int4
    by the numpy formula of Keras' grouped quantizer, and, for one expert
    of each bank, by Keras' own `EinsumDense.quantize` with the same config
    (values packed as Keras packs them, scale, zero point)."""
    moe, float_moe = models[mode].backbone.blocks[1].moe, models["float32"].backbone.blocks[1].moe
    assert moe.bank_quantizer.mode == mode and moe.bank_quantizer.block_size == (BLOCK if mode == "int4" else None)
    assert keras.backend.standardize_dtype(moe.router.dtype) == "float32"  # the router stays float
    for name, width, groups in (("gate_up", WIDTH, 3), ("down", HIDDEN, 2)):
        kernels = to_numpy(getattr(float_moe, name))  # (..., in, out)
        values, scale = to_numpy(getattr(moe, name)), to_numpy(getattr(moe, name + "_scale"))
        if mode == "int8":
            expected, expected_scale = keras.quantizers.abs_max_quantize(kernels, axis=-2, to_numpy=True)
            assert not hasattr(moe, name + "_zero")
            np.testing.assert_array_equal(values, to_numpy(expected))
            np.testing.assert_array_equal(scale, to_numpy(expected_scale))
            continue
        expected, expected_scale, expected_zero = int4_reference(kernels)
        assert scale.shape[-2] == groups
        np.testing.assert_array_equal(unpack_int4(values, width), expected)
        np.testing.assert_allclose(scale, expected_scale, rtol=1e-6)
        np.testing.assert_array_equal(to_numpy(getattr(moe, name + "_zero")), expected_zero)
        kernel = kernels.reshape(-1, *kernels.shape[-2:])[-1]  # the last expert's (last) kernel
        dense = keras.layers.EinsumDense("bi,io->bo", (width,))
        dense.build((None, kernel.shape[0]))
        dense.kernel.assign(kernel)
        dense.quantize(mode, config=MODES[mode])
        for suffix, keras_part in (("", dense._kernel), ("_scale", dense.kernel_scale), ("_zero", dense.kernel_zero)):
            part = to_numpy(getattr(moe, name + suffix))
            np.testing.assert_array_equal(part.reshape(-1, *part.shape[-2:])[-1], to_numpy(keras_part))


def test_per_channel_int4_bank_is_keras_per_channel_int4():
    """int4 without groups (`block_size=-1`): each kernel as Keras'
    per-channel int4 `EinsumDense` stores it (symmetric, no zero point;
    an odd width packed with a pad nibble), and `dequantize` gives
    `q / scale`."""
    config = keras.quantizers.Int4QuantizationConfig(block_size=-1)
    quantizer = BankQuantizer.of("int4", config)
    bank = np.random.default_rng(0).normal(size=(3, 2, 16, 5)).astype("float32")  # (e, 2, in, out)
    stored = quantizer.quantize(bank)
    assert quantizer.block_size is None and set(stored) == {"", "_scale"}
    assert stored[""].shape == (3, 2, 16, 3) and stored["_scale"].shape == (3, 2, 1, 5)
    for index in np.ndindex(3, 2):
        dense = keras.layers.EinsumDense("bi,io->bo", (5,))
        dense.build((None, 16))
        dense.kernel.assign(bank[index])
        dense.quantize("int4", config=config)
        np.testing.assert_array_equal(stored[""][index], to_numpy(dense._kernel))
        np.testing.assert_array_equal(stored["_scale"][index][0], to_numpy(dense.kernel_scale))
    expected = unpack_int4(stored[""], 5) / stored["_scale"]
    np.testing.assert_allclose(to_numpy(quantizer.dequantize(stored[""], stored["_scale"], outputs=5)), expected, rtol=1e-6)
    assert np.abs(expected - bank).max() <= (np.abs(bank).max(axis=-2, keepdims=True) / 7 * 0.501).max()


@pytest.mark.parametrize("mode, bound", [("int8", 0.02), ("int4", 0.25)])
def test_quantized_model_is_the_float_model_on_dequantized_banks(models, mode, bound):
    """Its logits equal (1e-5) those of a model with the same quantized
    projections (Keras' own) and float banks holding the dequantized values
    (the numpy reference), and stay close to the float model's (max |diff|
    / max |logit|, measured: int8 0.010, int4 0.10; the top token kept)."""
    quantized, reference = models[mode], models["float32"]
    target = new_model()
    target.set_weights(reference.get_weights())
    with one_gc_collect():  # Keras collects garbage at every deleted float kernel
        for layer in quantized_layers(target.backbone):
            if not isinstance(layer, MixtureOfExperts):
                layer.quantize(mode, type_check=False, config=MODES[mode])
    for q_block, block in zip(quantized.backbone.blocks, target.backbone.blocks):
        assert block.moe.bank_quantizer is None
        block.moe.gate_up.assign(dequantized_bank(q_block.moe, "gate_up", WIDTH))
        block.moe.down.assign(dequantized_bank(q_block.moe, "down", HIDDEN))
    ids, mask = batch()
    actual, expected = logits_of(quantized, ids, mask)[mask], logits_of(target, ids, mask)[mask]
    np.testing.assert_allclose(actual, expected, atol=1e-5 * np.abs(expected).max(), rtol=1e-5)

    float_logits = logits_of(reference, ids, mask)[mask]
    error = np.abs(actual - float_logits).max() / np.abs(float_logits).max()
    agreement = np.mean(actual.argmax(-1) == float_logits.argmax(-1))
    print(f"{mode}: max |diff| / max |logit| {error:.4f}, top-1 agreement {agreement:.3f}")
    assert error < bound and agreement >= 0.9


def test_cached_greedy_equals_uncached_on_int4_experts(models):
    """A ragged batch: prompts through every expert (dense dispatch),
    decode steps (3 rows x top 2 <= 8) through the gathered ones. Small
    embeddings, so that each row's tokens vary."""
    lm = new_model()
    assign_weights(lm, embedding_std=0.05)
    lm.quantize(config=MODES["int4"])
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 96, n).tolist() for n in (4, 3, 2)]  # one prefill chunk
    ids, mask = np.zeros((3, 4), np.int32), np.zeros((3, 4), bool)
    for i, prompt in enumerate(prompts):
        ids[i, : len(prompt)], mask[i, : len(prompt)] = prompt, True
    output = lm.generate({"token_ids": ids, "padding_mask": mask}, max_new_tokens=8, stop_token_ids=None)
    rows = [row[m].tolist() for row, m in zip(output["token_ids"], output["padding_mask"])]
    full, full_mask = np.zeros((3, 13), np.int32), np.zeros((3, 13), bool)
    for i, row in enumerate(rows):
        full[i, : len(row)], full_mask[i, : len(row)] = row, True
    picks = logits_of(lm, full, full_mask).argmax(-1)  # the shape `batch()` runs
    for i, (prompt, row) in enumerate(zip(prompts, rows)):
        assert len(row) == len(prompt) + 8 and row[: len(prompt)] == prompt
        assert row[len(prompt):] == picks[i, len(prompt) - 1 : len(row) - 1].tolist()
    assert all(len(set(row[len(p):])) >= 3 for p, row in zip(prompts, rows)), rows


@pytest.mark.parametrize("mode", MODES)
def test_quantized_preset_round_trip_is_exact(models, mode, tmp_path, monkeypatch):
    model, directory = models[mode], str(tmp_path / "preset")
    with pytest.warns(UserWarning, match="native preset"):
        model.backbone.save_to_preset(directory)
    with open(f"{directory}/metadata.json") as f:
        assert json.load(f)["format_version"] == 2

    def refuse(*args, **kwargs):
        raise AssertionError("loading must build the quantized banks from the record, not quantize float ones")

    monkeypatch.setattr(MixtureOfExperts, "quantize", refuse)
    restored = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone.from_preset(directory))
    assert restored.backbone.quantization == model.backbone.quantization
    described = lambda m: [(w.path.split("/", 1)[1], tuple(w.shape), str(w.dtype)) for w in m.backbone.weights]  # noqa: E731
    assert described(restored) == described(model)
    ids, mask = batch()
    np.testing.assert_array_equal(logits_of(restored, ids, mask), logits_of(model, ids, mask))

    # A version 1 save kept the banks float: refused, saying what to do.
    with open(f"{directory}/metadata.json") as f:
        metadata = json.load(f)
    with open(f"{directory}/metadata.json", "w") as f:
        json.dump({**metadata, "format_version": 1}, f)
    with pytest.raises(CheckpointError, match="format version 1.*Quantize the float model again"):
        keras_gemma.GemmaBackbone.from_preset(directory)


def test_layout_map_shards_the_scales_like_their_banks(models):
    from keras_gemma.distribution import get_layout_map, layout_problems

    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), [f"cpu:{i}" for i in range(8)])
    layout_map = get_layout_map(mesh, config=moe_config())
    for mode in MODES:
        variables = {w.path: tuple(w.shape) for w in models[mode].backbone.weights if "/moe/" in w.path}
        names = {path.rsplit("/", 1)[1] for path in variables}
        assert names >= {"gate_up", "gate_up_scale", "down", "down_scale"}
        assert ("gate_up_zero" in names) == (mode == "int4")
        for path in variables:  # banks, scales and zero points sharded; the router replicated
            layout = layout_map[path]
            assert (layout is not None) == ("/moe/router" not in path and "expert_scale" not in path), path
            if layout is not None and path.endswith(("_scale", "_zero")):
                bank = layout_map[path.rsplit("_", 1)[0]].axes
                assert tuple(layout.axes) == (*bank[:-2], None, bank[-1]), path  # groups replicated
        assert layout_problems(layout_map, moe_config(), shapes=variables) == []
