"""Configs, presets, precision, serialisation and backend independence."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import keras
import keras_gemma
from conftest import backend, to_numpy
from keras_gemma.checkpoints.weights import assign_weights
from keras_gemma.presets import ARCHITECTURES, PRESETS, PUBLISHED_PARAMETERS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    args = dict(
        vocabulary_size=64, num_layers=6, hidden_dim=32, num_query_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_dim=48,
        layer_types=keras_gemma.layer_pattern(6, ("local",) * 5 + ("global",)),
        sliding_window_size=3, use_post_norms=True, use_qk_norm=True,
        attention_logit_softcap=5.0, final_logit_softcap=8.0,
        global_rope_base=1e6, global_rope_scaling=8.0,
    )
    return keras_gemma.GemmaConfig(**{**args, **overrides})


def batch(vocabulary_size=64, seq_len=9):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, vocabulary_size, (2, seq_len)).astype("int32")
    mask = np.ones((2, seq_len), bool)
    mask[1, -3:] = False
    return {"token_ids": ids, "padding_mask": mask}


# Published counts, REFERENCE.md section 2.
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_parameter_count_equals_published(architecture):
    assert ARCHITECTURES[architecture].num_parameters() == PUBLISHED_PARAMETERS[architecture]


def test_270m_is_built_with_the_published_count():
    model = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(ARCHITECTURES["gemma3_270m"]))
    assert model.count_params() == 268_098_176
    assert model.backbone.count_params() == 268_098_176


def test_every_known_preset_is_registered():
    expected = """
        gemma_2b_en gemma_instruct_2b_en gemma_1.1_instruct_2b_en gemma_7b_en
        gemma_instruct_7b_en gemma_1.1_instruct_7b_en code_gemma_2b_en
        code_gemma_1.1_2b_en code_gemma_7b_en code_gemma_instruct_7b_en
        code_gemma_1.1_instruct_7b_en gemma2_2b_en gemma2_instruct_2b_en gemma2_9b_en
        gemma2_instruct_9b_en gemma2_27b_en gemma2_instruct_27b_en gemma3_270m
        gemma3_instruct_270m gemma3_1b gemma3_instruct_1b gemma3_4b_text
        gemma3_instruct_4b_text gemma3_12b_text gemma3_instruct_12b_text
        gemma3_27b_text gemma3_instruct_27b_text shieldgemma_2b_en
        shieldgemma_9b_en shieldgemma_27b_en
    """.split()
    assert sorted(expected) == keras_gemma.list_presets()
    assert PRESETS["gemma2_9b_en"].kaggle_handle == "kaggle://keras/gemma2/keras/gemma2_9b_en/4"
    assert PRESETS["gemma2_27b_en"].config.query_pre_attn_scalar == 144
    assert PRESETS["gemma3_instruct_27b_text"].config.query_pre_attn_scalar == 168
    assert PRESETS["gemma3_4b_text"].config.global_rope_scaling == 8.0
    assert PRESETS["gemma3_1b"].config.global_rope_scaling == 1.0
    layer_types = PRESETS["gemma3_1b"].config.layer_types
    assert [i for i, t in enumerate(layer_types) if t == "global"] == [5, 11, 17, 23]
    assert PRESETS["gemma2_2b_en"].config.layer_types[:2] == ("local", "global")


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="gemma2_9b_en") as info:
        keras_gemma.get_preset("gemma2_9b")
    assert "gemma3_270m" in str(info.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_query_heads=4, num_key_value_heads=3), "divisible"),
        (dict(layer_types=("local", "global", "ring", "local", "local", "global")), "Unknown attention type 'ring' for layer 2"),
        (dict(sliding_window_size=-4), "sliding_window_size"),
        (dict(sliding_window_size=None), "sliding_window_size"),
        (dict(layer_types=("global",) * 5), "6"),
        (dict(hidden_dim=0), "hidden_dim"),
        (dict(final_logit_softcap=-1.0), "final_logit_softcap"),
    ],
)
def test_bad_configuration_says_what_is_wrong(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)
    with pytest.raises(ValueError, match=message):
        keras_gemma.GemmaBackbone(**{**tiny_config().to_dict(), **overrides})


def test_backbone_accepts_config_dict_or_kwargs():
    config = tiny_config()
    assert keras_gemma.GemmaBackbone(config.to_dict()).config == config
    assert keras_gemma.GemmaBackbone(**config.to_dict()).config == config


def test_saved_model_round_trip(tmp_path):
    model = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(tiny_config()))
    inputs = batch()
    expected = to_numpy(model(inputs))
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    assert restored.config == model.config
    np.testing.assert_array_equal(to_numpy(restored(inputs)), expected)


@pytest.mark.skipif(backend() != "torch", reason="a PyTorch storage order")
def test_torch_kernels_stay_out_in_ordered_through_assignment():
    """PyTorch keeps float32 projection kernels in (out, in) memory order,
    the order its generation multiplies by fastest; loading weights keeps
    it, and the values are the assigned ones."""
    backbone = keras_gemma.GemmaBackbone(tiny_config())
    arrays = {name: np.asarray(keras.ops.convert_to_numpy(v)) for name, v in backbone.weight_map().items()}
    rng = np.random.default_rng(0)
    arrays = {name: rng.standard_normal(a.shape).astype(a.dtype) for name, a in arrays.items()}
    assign_weights(backbone, arrays)
    config = backbone.config
    d, f, h = config.hidden_dim, config.intermediate_dim, config.head_dim
    n, k = config.num_query_heads, config.num_key_value_heads
    strides = {  # (out, in) matrices: the "in" axis has stride 1
        "feed_forward.gate": (1, d),
        "feed_forward.up": (1, d),
        "feed_forward.down": (1, f),
        "attention.query": (h * d, 1, d),
        "attention.key": (h * d, 1, d),
        "attention.value": (h * d, 1, d),
        "attention.output": (h, 1, n * h),
    }
    for i, block in enumerate(backbone.blocks):
        for path, stride in strides.items():
            layer, name = path.split(".")
            kernel = getattr(getattr(block, layer), f"{name}_dense" if layer == "attention" else name).kernel
            assert tuple(kernel.value.stride()) == stride, (i, path)
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(kernel), arrays[f"blocks.{i}.{path}"])
    assert len({d, f, h, n, k}) > 2


@pytest.mark.parametrize("dtype", ["bfloat16", "mixed_bfloat16"])
def test_reduced_precision(dtype):
    config = tiny_config()
    full = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(config))
    half = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(config, dtype=dtype))
    for target, source in zip(half.backbone.weights, full.backbone.weights):
        target.assign(keras.ops.cast(source, target.dtype))
    variable_dtype = "bfloat16" if dtype == "bfloat16" else "float32"
    assert {w.dtype for w in half.backbone.weights} == {variable_dtype}
    inputs = batch()
    logits = half(inputs)
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"
    hidden = half.backbone(inputs)
    assert keras.backend.standardize_dtype(hidden.dtype) == "bfloat16"
    mask = inputs["padding_mask"]
    reference, actual = to_numpy(full(inputs))[mask], to_numpy(logits)[mask]
    assert np.isfinite(actual).all()
    # bfloat16 keeps ~3 significant digits; the argmax almost always agrees.
    np.testing.assert_allclose(actual, reference, atol=0.25 * np.abs(reference).max())
    assert np.mean(actual.argmax(-1) == reference.argmax(-1)) >= 0.9


def test_norms_compute_in_float32():
    """A bfloat16 RMSNorm equals the float32 one rounded once at the end."""
    from keras_gemma.layers import RMSNorm

    x = np.random.default_rng(0).normal(size=(2, 3, 64)).astype("float32") * 100
    scale = np.random.default_rng(1).normal(size=(64,)).astype("float32")
    norm32, norm16 = RMSNorm(dtype="float32"), RMSNorm(dtype="bfloat16")
    for norm in (norm32, norm16):
        norm.build(x.shape)
        norm.scale.assign(keras.ops.cast(scale, norm.scale.dtype))
    exact = to_numpy(norm32(x))
    x16 = keras.ops.cast(x, "bfloat16")
    scale16 = to_numpy(keras.ops.cast(keras.ops.cast(scale, "bfloat16"), "float32"))
    x16_in_32 = to_numpy(keras.ops.cast(x16, "float32"))
    expected = x16_in_32 / np.sqrt(np.mean(x16_in_32**2, -1, keepdims=True) + 1e-6) * (1 + scale16)
    actual = to_numpy(keras.ops.cast(norm16(x16), "float32"))
    np.testing.assert_allclose(actual, to_numpy(keras.ops.cast(keras.ops.cast(expected, "bfloat16"), "float32")), rtol=1e-2)
    assert np.abs(actual - exact).max() < 0.05 * np.abs(exact).max()


@pytest.mark.parametrize("smallest", [2, 8], ids=["capped", "ragged"])
@pytest.mark.parametrize("window", [None, 3, 8, 13])
def test_attention_blocks_equal_full_attention(window, smallest, monkeypatch):
    """Long self-attention by query blocks (training, prefill) equals the
    full masked t x t form, for global and sliding-window layers, ragged
    rows and a soft-cap included. Blocks of `ATTENTION_BLOCK` queries
    (ragged: 8 blocks of 8, the last of 3), or more each where that would
    make more than `MAX_ATTENTION_BLOCKS` (capped: 15 of 4)."""
    from keras_gemma import layers

    monkeypatch.setattr(layers, "ATTENTION_BLOCK", smallest)
    config = tiny_config(sliding_window_size=window or 4)
    layer = layers.Attention(config, layer_index=5 if window is None else 0)  # pattern: 5 local, 1 global
    b, t, k, h = 2, 59, config.num_key_value_heads, config.head_dim
    assert layer.window == window and layer._by_blocks(t)
    assert layers.attention_block(t) == {2: 4, 8: 8}[smallest]
    rng = np.random.default_rng(window)
    q = rng.normal(size=(b, t, config.num_query_heads, h)).astype("float32") * 2
    keys, values = (rng.normal(size=(b, k, h, t)).astype("float32") * 2 for _ in range(2))
    positions = np.stack([np.arange(t), np.arange(t) - 11]).astype("int32")  # row 1: 11 left-padding slots
    key_positions = np.where(positions >= 0, positions, -1).astype("int32")
    q, keys, values, query_positions, key_positions = map(
        keras.ops.convert_to_tensor, (q, keys, values, positions, key_positions)
    )
    blocks = to_numpy(layer._attend_blocks(q, query_positions, keys, values, key_positions))
    full = to_numpy(layer._attend(q, query_positions, [(keys, values, key_positions)]))
    real = positions >= 0
    np.testing.assert_allclose(blocks[real], full[real], atol=1e-5, rtol=1e-5)


def test_last_only_hidden_state_equals_the_full_passes_last_column():
    """A prompt chunk's pass (`hidden_states(last_only=True)`: the last block
    queries from the last column only) gives the last column's hidden state
    of the full pass, and the same cache; ragged rows (left padding)."""
    model = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(tiny_config(num_layers=6)))
    backbone = model.backbone
    ids = batch(seq_len=11)["token_ids"]
    mask = np.ones_like(ids, bool)
    mask[1, :4] = False  # left padding
    full, full_cache = backbone.hidden_states(ids, mask, cache=backbone.init_cache(2, 16))
    last, last_cache = backbone.hidden_states(ids, mask, cache=backbone.init_cache(2, 16), last_only=True)
    assert tuple(last.shape) == (2, 1, 32)
    np.testing.assert_allclose(to_numpy(last), to_numpy(full)[:, -1:], atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(last_cache, full_cache):
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


def test_fit_step_trains():
    model = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(tiny_config(num_layers=2, layer_types=("local", "global"))))
    inputs = batch()
    labels = np.roll(inputs["token_ids"], -1, axis=1)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(inputs, labels, sample_weight=inputs["padding_mask"].astype("float32"), epochs=8, batch_size=2, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.7 * losses[0]


CROSS_BACKEND_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import keras, keras_gemma
    from keras_gemma.checkpoints.weights import assign_weights
    config_path, weights_path, inputs_path, out_path = sys.argv[1:]
    config = keras_gemma.GemmaConfig.from_dict(json.load(open(config_path)))
    model = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(config))
    assign_weights(model.backbone, dict(np.load(weights_path)))
    inputs = dict(np.load(inputs_path))
    np.save(out_path, keras.ops.convert_to_numpy(model(inputs)))
    """
)


def test_backends_agree(tmp_path):
    """The same weights give the same logits on JAX, TensorFlow and PyTorch."""
    config = tiny_config()
    model = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(config))
    rng = np.random.default_rng(0)
    weights = {name: rng.normal(size=v.shape).astype("float32") * 0.3 for name, v in model.backbone.weight_map().items()}
    assign_weights(model.backbone, weights)
    inputs = batch()
    ours = to_numpy(model(inputs))
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    np.savez(tmp_path / "weights.npz", **weights)
    np.savez(tmp_path / "inputs.npz", **inputs)
    (tmp_path / "script.py").write_text(CROSS_BACKEND_SCRIPT)
    others = [b for b in ("jax", "tensorflow", "torch") if b != backend()]
    for other in others:
        out = tmp_path / f"{other}.npy"
        env = {**os.environ, "KERAS_BACKEND": other, "PYTHONPATH": ROOT}
        subprocess.run(
            [sys.executable, str(tmp_path / "script.py"), str(tmp_path / "config.json"),
             str(tmp_path / "weights.npz"), str(tmp_path / "inputs.npz"), str(out)],
            check=True, env=env, capture_output=True,
        )
        theirs = np.load(out)
        mask = inputs["padding_mask"]
        np.testing.assert_allclose(theirs[mask], ours[mask], atol=1e-5, rtol=1e-5, err_msg=other)


NO_TENSORFLOW_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import keras_gemma
    config = keras_gemma.GemmaConfig(
        vocabulary_size=50, num_layers=2, hidden_dim=16, num_query_heads=2,
        num_key_value_heads=1, head_dim=8, intermediate_dim=32,
        layer_types=("local", "global"), sliding_window_size=2,
    )
    model = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(config))
    model({"token_ids": np.ones((1, 4), "int32"), "padding_mask": np.ones((1, 4), bool)})
    loaded = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))
    assert not loaded, loaded
    """
)


def test_no_tensorflow_under_jax_or_torch():
    targets = [backend()] if backend() in ("jax", "torch") else ["jax", "torch"]
    for target in targets:
        env = {**os.environ, "KERAS_BACKEND": target, "PYTHONPATH": ROOT}
        result = subprocess.run([sys.executable, "-c", NO_TENSORFLOW_SCRIPT], env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]


# The model's products (`keras_gemma/products.py`): every equation the layers
# use, with one row (a batch-1 decode step) and several.
PRODUCTS = [
    ("btd,ndh->btnh", (1, 1, 32), (4, 32, 8)),
    ("btd,ndh->btnh", (2, 5, 32), (4, 32, 8)),
    ("btNh,Nhd->btd", (1, 1, 4, 8), (4, 8, 32)),
    ("btd,df->btf", (1, 1, 32), (32, 48)),
    ("btf,fd->btd", (3, 2, 48), (48, 32)),
    ("bd,vd->bv", (1, 32), (64, 32)),
    ("bd,vd->bv", (8, 32), (64, 32)),
    ("bkhs,btkgh->bkgts", (2, 2, 8, 7), (2, 1, 2, 2, 8)),
    ("bkgts,bkhs->btkgh", (1, 2, 2, 1, 7), (1, 2, 8, 7)),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("equation,x_shape,y_shape", PRODUCTS)
def test_products_accumulate_in_float32_and_round_once(equation, x_shape, y_shape, dtype):
    """`products.einsum` is `ops.einsum` in float32 and, in bfloat16, the
    float32 product of the bfloat16 operands rounded once (to within the
    last bit: ops.einsum's own bfloat16 product on TensorFlow/PyTorch)."""
    from keras_gemma import products

    rng = np.random.default_rng(0)
    x, y = (keras.ops.cast(rng.normal(size=s).astype("float32"), dtype) for s in (x_shape, y_shape))
    out = products.einsum(equation, x, y)
    assert keras.backend.standardize_dtype(out.dtype) == dtype
    x32, y32 = (np.asarray(to_numpy(keras.ops.cast(a, "float32")), np.float64) for a in (x, y))
    exact = np.einsum(equation, x32, y32)
    if dtype == "float32":
        np.testing.assert_allclose(to_numpy(out), to_numpy(keras.ops.einsum(equation, x, y)), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(to_numpy(out), exact, rtol=1e-5, atol=1e-5)
    else:
        rounded = to_numpy(keras.ops.cast(keras.ops.cast(exact.astype("float32"), "bfloat16"), "float32"))
        np.testing.assert_allclose(to_numpy(keras.ops.cast(out, "float32")), rounded, rtol=2**-7, atol=1e-6)
    if len(x_shape) == 3 and len(y_shape) == 3 and equation.startswith("btd,ndh"):  # the per-head form
        heads = keras.ops.broadcast_to(keras.ops.reshape(x, (1, -1, x_shape[-1])), (y_shape[0], x_shape[0] * x_shape[1], x_shape[-1]))
        per_head = keras.ops.transpose(products.matmul(heads, y), (1, 0, 2))
        np.testing.assert_allclose(
            to_numpy(keras.ops.cast(per_head, "float32")),
            to_numpy(keras.ops.cast(keras.ops.reshape(out, per_head.shape), "float32")), rtol=2**-7, atol=1e-6,
        )


def test_on_cpu_answers_on_every_backend():
    # CI's machines have no accelerator; PyTorch has no keras.distribution.
    from keras_gemma import products

    assert products.on_cpu()


@pytest.mark.skipif(backend() != "jax", reason="the JAX form of products")
def test_jax_bfloat16_products_take_float32_results_and_two_rows():
    """On JAX on CPU, a bfloat16 product asks XLA for a float32 result (its
    bfloat16 kernel; a bfloat16 result converts both operands to float32
    first) and a single row goes in as two (XLA's matrix-vector path is
    ~10x slower in bfloat16); float32 and float16 products are Keras' own."""
    import jax

    from keras_gemma import products

    def dots(fn, *shapes, dtype="bfloat16"):
        args = [jax.numpy.zeros(s, dtype) for s in shapes]
        jaxpr = jax.make_jaxpr(fn)(*args)
        return [(e.params["preferred_element_type"], tuple(e.invars[0].aval.shape)) for e in jaxpr.eqns if e.primitive.name == "dot_general"]

    one_row = dots(lambda x, w: products.einsum("btd,df->btf", x, w), (1, 1, 32), (32, 48))
    assert [(str(t), s) for t, s in one_row] == [("float32", (2, 1, 32))]
    rows = dots(lambda x, w: products.einsum("btd,df->btf", x, w), (2, 3, 32), (32, 48))
    assert [(str(t), s) for t, s in rows] == [("float32", (2, 3, 32))]
    heads = dots(products.matmul, (4, 1, 32), (4, 32, 8))
    assert [(str(t), s) for t, s in heads] == [("float32", (4, 2, 32))]
    full = dots(lambda x, w: products.einsum("btd,df->btf", x, w), (1, 1, 32), (32, 48), dtype="float32")
    assert [s for _, s in full] == [(1, 1, 32)]
    half = dots(lambda x, w: products.einsum("btd,df->btf", x, w), (1, 1, 32), (32, 48), dtype="float16")
    assert [(str(t), s) for t, s in half] == [("float16", (1, 1, 32))]
