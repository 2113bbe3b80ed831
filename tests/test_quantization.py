"""Weight-only int8/int4 quantization: memory, closeness to float32, the
quantized tied head, save/load, and LoRA on an int8 base (QLoRA-style)."""

import numpy as np
import pytest

import keras
import keras_gemma
from conftest import to_numpy
from keras_gemma.quantization import dequantized_embeddings, parameter_bytes


def tiny_config(**overrides):
    # Wide enough that the per-channel scales are a small share of the bytes.
    args = dict(
        vocabulary_size=256, num_layers=2, hidden_dim=64, num_query_heads=4,
        num_key_value_heads=1, head_dim=16, intermediate_dim=128,
        layer_types=("local", "global"), sliding_window_size=4,
        use_post_norms=True, use_qk_norm=True, final_logit_softcap=30.0,
    )
    return keras_gemma.GemmaConfig(**{**args, **overrides})


def new_model(dtype=None):
    return keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(tiny_config(), dtype=dtype))


def batch(batch_size=4, seq_len=12):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 256, (batch_size, seq_len)).astype("int32")
    mask = np.ones((batch_size, seq_len), bool)
    mask[1, -3:] = False
    return {"token_ids": ids, "padding_mask": mask}


def assign_random_weights(model, seed=0):
    """The same weights on every backend (numpy draws), with peaked logits as
    trained models have: unit-variance embeddings, `1/sqrt(fan_in)` kernels."""
    rng = np.random.default_rng(seed)
    for name, variable in model.backbone.weight_map().items():
        shape = tuple(variable.shape)
        if name == "token_embedding":
            std = 1.0
        elif name.endswith((".query", ".key", ".value")):
            std = shape[1] ** -0.5  # (heads, d, h)
        elif name.endswith(".output"):
            std = (shape[0] * shape[1]) ** -0.5  # (n, h, d)
        elif name.endswith((".gate", ".up", ".down")):
            std = shape[0] ** -0.5
        else:
            std = 0.1  # norm scales, around 0 (the model uses 1 + scale)
        variable.assign(rng.normal(size=shape).astype("float32") * std)


@pytest.fixture(scope="module")
def models():
    """A float32 model and int8 / int4 copies of it."""
    float_model = new_model()
    assign_random_weights(float_model)
    result = {"float32": float_model}
    for mode in ("int8", "int4"):
        model = new_model()
        model.set_weights(float_model.get_weights())
        model.quantize(mode)
        result[mode] = model
    return result


def test_parameter_memory(models):
    float_bytes = parameter_bytes(models["float32"])
    assert float_bytes == 4 * tiny_config().num_parameters()
    assert parameter_bytes(new_model("bfloat16")) == float_bytes // 2
    int8 = parameter_bytes(models["int8"]) / float_bytes
    int4 = parameter_bytes(models["int4"]) / float_bytes
    print(f"parameter memory vs float32: int8 {int8:.3f}, int4 {int4:.3f}")
    assert 0.25 <= int8 < 0.30  # a quarter, plus float scales and norms
    assert 0.125 <= int4 < 0.20  # an eighth, plus scales, zero points and norms


def test_every_projection_and_the_head_are_quantized(models):
    for mode in ("int8", "int4"):
        backbone = models[mode].backbone
        assert backbone.quantization.mode == mode
        layers = [backbone.token_embedding] + [
            layer for block in backbone.blocks
            for layer in (block.attention.query_dense, block.attention.key_dense, block.attention.value_dense,
                          block.attention.output_dense, block.feed_forward.gate, block.feed_forward.up, block.feed_forward.down)
        ]
        for layer in layers:
            assert layer.quantization_mode == mode, layer.path
            assert keras.backend.standardize_dtype(layer._kernel.dtype if hasattr(layer, "_kernel") else layer._embeddings.dtype) == "int8"
        assert keras.backend.standardize_dtype(backbone.final_norm.scale.dtype) == "float32"


@pytest.mark.parametrize("mode, min_agreement, max_error", [("int8", 0.97, 0.03), ("int4", 0.85, 0.3)])
def test_logits_close_to_float32(models, mode, min_agreement, max_error):
    inputs = batch()
    mask = inputs["padding_mask"]
    reference = to_numpy(models["float32"](inputs))[mask]
    actual = to_numpy(models[mode](inputs))[mask]
    agreement = np.mean(actual.argmax(-1) == reference.argmax(-1))
    error = np.abs(actual - reference).max() / np.abs(reference).max()
    print(f"{mode}: top-1 agreement with float32 {agreement:.3f}, max |diff| / max |logit| {error:.3f}")
    assert agreement >= min_agreement
    assert error < max_error


def effective_kernel(layer, kernel_shape):
    """The float kernel a (quantized) projection applies, read off by feeding it the identity."""
    inputs, rest = layer.equation.split(",")
    kernel_axes, output_axes = rest.split("->")
    in_axes, out_axes = inputs[2:], output_axes[2:]  # drop "bt"/"bs"
    in_shape = tuple(dict(zip(kernel_axes, kernel_shape))[a] for a in in_axes)
    size = int(np.prod(in_shape))
    out = to_numpy(layer(np.eye(size, dtype="float32").reshape((1, size) + in_shape)))[0]
    out = out.reshape(in_shape + out.shape[1:])
    return np.einsum(f"{in_axes}{out_axes}->{kernel_axes}", out)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_is_the_float_model_on_dequantized_weights(models, mode):
    """Quantization changes the weights only: the quantized model equals a
    float model holding its dequantized weights."""
    quantized, reference = models[mode].backbone, models["float32"].backbone
    float_model = new_model()
    float_model.set_weights(models["float32"].get_weights())
    target = float_model.backbone
    target.token_embedding.embeddings.assign(dequantized_embeddings(quantized.token_embedding, "float32"))
    for q_block, r_block, t_block in zip(quantized.blocks, reference.blocks, target.blocks):
        for parent, name in [("attention", n) for n in ("query_dense", "key_dense", "value_dense", "output_dense")] + [
            ("feed_forward", n) for n in ("gate", "up", "down")
        ]:
            q_layer, r_layer, t_layer = (getattr(getattr(b, parent), name) for b in (q_block, r_block, t_block))
            t_layer.kernel.assign(effective_kernel(q_layer, tuple(r_layer.kernel.shape)))
    inputs = batch()
    mask = inputs["padding_mask"]
    expected = to_numpy(float_model(inputs))[mask]
    np.testing.assert_allclose(to_numpy(models[mode](inputs))[mask], expected, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_head_uses_the_dequantized_table(models, mode):
    """The tied output head reads the same table the token lookup does."""
    embedding = models[mode].backbone.token_embedding
    ids = np.arange(256, dtype="int32")[None]
    looked_up = to_numpy(embedding(ids))[0]  # Keras' own int8/int4 lookup
    table = to_numpy(dequantized_embeddings(embedding, "float32"))
    np.testing.assert_allclose(table, looked_up, rtol=1e-6, atol=1e-7)
    float_table = to_numpy(models["float32"].backbone.token_embedding.embeddings)
    step = np.abs(float_table).max(axis=1, keepdims=True) / (127 if mode == "int8" else 7)
    assert (np.abs(table - float_table) <= step * 1.01).all()
    hidden = np.random.default_rng(0).normal(size=(1, 3, 64)).astype("float32")
    np.testing.assert_allclose(to_numpy(embedding.reverse(hidden)), hidden @ table.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_save_and_load(models, mode, tmp_path):
    model = models[mode]
    inputs = batch()
    expected = to_numpy(model(inputs))
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    assert restored.backbone.quantization == model.backbone.quantization
    names = lambda m: [w.path.split("/", 1)[1] + ":" + str(w.dtype) for w in m.backbone.weights]  # noqa: E731
    assert names(restored) == names(model)
    np.testing.assert_array_equal(to_numpy(restored(inputs)), expected)

    weights_path = str(tmp_path / "model.weights.h5")
    model.save_weights(weights_path)
    config = model.backbone.get_config()  # carries the quantization record
    fresh = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone.from_config(config))
    fresh.load_weights(weights_path)
    np.testing.assert_array_equal(to_numpy(fresh(inputs)), expected)


def test_cached_generation_on_an_int8_model_equals_uncached(models):
    """Greedy decoding through the compiled cached loop picks each step's
    argmax of an uncached forward pass, for a ragged batch (JAX on CPU
    once failed to trace the loop, KeyError 'subfuns': Keras' quantized
    products have a custom gradient, which the CPU tuning's jaxpr rewrite
    bound again from its parameters)."""
    lm = models["int8"]
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 256, n).tolist() for n in (5, 2, 3)]
    ids, mask = np.zeros((3, 5), "int32"), np.zeros((3, 5), bool)
    for i, prompt in enumerate(prompts):
        ids[i, : len(prompt)], mask[i, : len(prompt)] = prompt, True
    output = lm.generate({"token_ids": ids, "padding_mask": mask}, max_length=12, stop_token_ids=None)
    rows = [row[row_mask].tolist() for row, row_mask in zip(output["token_ids"], output["padding_mask"])]
    assert [len(row) for row in rows] == [12] * 3
    picks = to_numpy(lm({"token_ids": np.array(rows, "int32")})).argmax(-1).tolist()
    for prompt, row, row_picks in zip(prompts, rows, picks):
        assert row[: len(prompt)] == prompt and row[len(prompt):] == row_picks[len(prompt) - 1 : -1]


def test_lora_fit_on_an_int8_base():
    keras.utils.set_random_seed(0)
    model = new_model()
    embeddings = model.backbone.token_embedding.embeddings
    embeddings.assign(embeddings * 4.0)  # a sharper head, as in test_lora
    model.quantize("int8")
    base = {w.path: to_numpy(w) for w in model.weights}
    model.backbone.enable_lora(4, alpha=8, target_layers="all")
    assert all("lora_kernel" in w.path for w in model.trainable_weights)
    assert {keras.backend.standardize_dtype(w.dtype) for w in model.trainable_weights} == {"float32"}
    model.compile(
        optimizer=keras.optimizers.Adam(3e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    ids = np.random.default_rng(3).integers(0, 256, (4, 9)).astype("int32")
    inputs = {"token_ids": ids[:, :-1], "padding_mask": np.ones((4, 8), bool)}
    losses = model.fit(inputs, ids[:, 1:], batch_size=4, epochs=20, verbose=0).history["loss"]
    print(f"QLoRA losses: {losses[0]:.2f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.3 * losses[0], losses
    for w in model.weights:
        if w.path in base:
            np.testing.assert_array_equal(to_numpy(w), base[w.path], err_msg=w.path)

    # Merging re-quantizes the base with the adapter folded in: still int8,
    # no adapter left, logits close to the unmerged ones.
    expected = to_numpy(model(inputs))
    model.backbone.merge_lora_weights()
    assert model.backbone.blocks[0].attention.query_dense._kernel.dtype == "int8"
    assert not any("lora" in w.path for w in model.weights)
    merged = to_numpy(model(inputs))
    assert np.mean(merged.argmax(-1) == expected.argmax(-1)) >= 0.9


def test_bad_quantize_calls_say_what_is_wrong(models):
    with pytest.raises(ValueError, match="already quantized"):
        models["int8"].quantize("int4")
    with pytest.raises(ValueError, match="Unsupported quantization mode 'float8'"):
        new_model().quantize("float8")
