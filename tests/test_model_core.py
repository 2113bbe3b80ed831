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


# Published counts (presets.PUBLISHED_PARAMETERS, sources given there).
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
        shieldgemma_9b_en shieldgemma_27b_en function_gemma_instruct_270m
        medgemma_instruct_27b_text vault_gemma_1b_en translategemma_4b_it
        translategemma_12b_it translategemma_27b_it gemma4_31b gemma4_instruct_31b
        gemma4_2b gemma4_instruct_2b gemma4_4b gemma4_instruct_4b gemma4_26b_a4b gemma4_instruct_26b_a4b
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


def reference_attention(q, keys, values, query_positions, key_positions, window, scale, cap):
    """Masked softmax attention in float64 numpy, one query head at a time."""
    b, t, n, h = q.shape
    k = keys.shape[2]
    out = np.zeros((b, t, n, h))
    for head in range(n):
        kv = head // (n // k)  # query heads of a group share a key/value head
        logits = np.einsum("bth,bsh->bts", q[:, :, head] * scale, keys[:, :, kv])
        if cap is not None:
            logits = cap * np.tanh(logits / cap)
        qp, kp = query_positions[:, :, None], key_positions[:, None, :]
        visible = (kp >= 0) & (kp <= qp) & ((qp - kp < window) if window else True)
        logits = np.where(visible, logits, -1e9)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out[:, :, head] = np.einsum("bts,bsh->bth", probs, values[:, :, kv])
    return out


@pytest.mark.parametrize("cap", [None, 2.0], ids=["fused", "soft-capped"])
@pytest.mark.parametrize("num_key_value_heads", [1, 2, 4], ids=["mqa", "gqa", "mha"])
@pytest.mark.parametrize("window", [None, 3])
def test_attention_equals_masked_softmax(window, num_key_value_heads, cap):
    """`Attention.attend` (Keras' `dot_product_attention` without a soft-cap,
    einsums with one; query heads folded per key/value head) equals masked
    softmax attention computed head by head: global and sliding-window
    layers, MQA/GQA/MHA, a left-padded row, keys from a cache (positions out
    of order, empty slots)."""
    from keras_gemma import layers

    config = tiny_config(
        sliding_window_size=window or 4, num_key_value_heads=num_key_value_heads, attention_logit_softcap=cap
    )
    layer = layers.Attention(config, layer_index=5 if window is None else 0)  # pattern: 5 local, 1 global
    assert layer.window == window
    b, t, s, n, h = 2, 9, 13, config.num_query_heads, config.head_dim
    rng = np.random.default_rng(num_key_value_heads)
    q = rng.normal(size=(b, t, n, h)).astype("float32") * 2
    keys, values = (rng.normal(size=(b, s, num_key_value_heads, h)).astype("float32") * 2 for _ in range(2))
    query_positions = np.stack([np.arange(t) + 4, np.maximum(np.arange(t) - 3, 0)]).astype("int32")
    key_positions = np.stack([rng.permutation(s) - 1, np.where(np.arange(s) < 5, -1, np.arange(s) - 5)]).astype("int32")
    out = to_numpy(layer.attend(*map(keras.ops.convert_to_tensor, (q, query_positions, keys, values, key_positions))))
    expected = reference_attention(q, keys, values, query_positions, key_positions, window, layer.query_scale, cap)
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(backend() != "jax", reason="reads XLA's compiled program")
def test_a_decode_step_reads_the_attention_kernels_as_stored():
    """A decode step's query and output projections read the kernels where
    they lie: XLA compiles no transpose or copy of a kernel (a copy of each
    kernel on every step cost Gemma 3 270M a third of its decode speed on
    CPU, 31 -> 44 ms per step), while a long prompt's query einsum may."""
    import jax
    from keras_gemma import layers

    config = tiny_config(hidden_dim=48, num_query_heads=4, num_key_value_heads=1, head_dim=16)
    layer = layers.Attention(config, layer_index=5)
    layer.build()
    kernels = [layer.query_dense.kernel, layer.output_dense.kernel]
    kernel_sizes = {int(np.prod(k.shape)) for k in kernels}

    def project(values, x):
        with keras.StatelessScope(state_mapping=list(zip(kernels, values))):
            return layer.output_dense(layer._query(x))

    def copies_of_kernels(rows):
        x = np.ones((1, rows, config.hidden_dim), "float32")
        text = jax.jit(project).lower([k.value for k in kernels], x).compile().as_text()
        shapes = [line.split("=")[1].split()[0] for line in text.splitlines() if " transpose(" in line or " copy(" in line]
        sizes = [int(np.prod([int(n) for n in shape.split("[")[1].split("]")[0].split(",")])) for shape in shapes]
        return [size for size in sizes if size in kernel_sizes]

    assert copies_of_kernels(1) == []
    assert copies_of_kernels(layers.PER_HEAD_ROWS) == []


@pytest.mark.parametrize("window", [3, 4, None])
def test_cache_writes_put_index_i_at_slot_i_mod_length(window):
    """`write_cache`: a first chunk longer than a ring keeps its last c keys,
    rolled so index i sits at slot `i % c`; later chunks and decode steps
    (aligned as the engine makes them) overwrite the oldest."""
    from keras_gemma import layers

    slots = layers.ring_length(window, 16)
    assert slots == {3: 4, 4: 4, None: 16}[window]
    cache = (np.zeros((1, slots, 1, 1), "float32"), np.zeros((1, slots, 1, 1), "float32"), -np.ones((1, slots), "int32"))
    written = np.full(slots, -1)
    for start, size in [(0, 8), (8, 4), (12, 2), (14, 1), (15, 1)]:  # the engine's chunks, then decode steps
        index = np.arange(start, start + size)
        values = index.astype("float32").reshape(1, size, 1, 1)
        cache = layers.write_cache(cache, values, values, index[None].astype("int32"), start)
        written[index[-slots:] % slots] = index[-slots:]
        np.testing.assert_array_equal(to_numpy(cache[2])[0], written)
        np.testing.assert_array_equal(to_numpy(cache[0])[0, :, 0, 0], np.maximum(written, 0))


def test_layers_are_plain_keras_ops():
    """`layers.py` imports no device- or backend-specific module and attends
    through Keras' `dot_product_attention`."""
    import ast

    from keras_gemma import layers

    source = open(layers.__file__).read()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert imported == {"numpy", "keras", "keras_gemma.quantization"}
    assert "ops.dot_product_attention(" in source and "backend()" not in source


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
    import sys, tempfile
    import numpy as np
    import keras_gemma
    config = keras_gemma.GemmaConfig(
        vocabulary_size=50, num_layers=2, hidden_dim=16, num_query_heads=2,
        num_key_value_heads=1, head_dim=8, intermediate_dim=32,
        layer_types=("local", "global"), sliding_window_size=2,
    )
    model = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(config))
    inputs = {"token_ids": np.ones((1, 4), "int32"), "padding_mask": np.ones((1, 4), bool)}
    model(inputs)
    # Quantized, generating, saved and loaded again.
    model.quantize("int8")
    model.generate(inputs, max_new_tokens=2)
    with tempfile.TemporaryDirectory() as directory:
        model.save_to_preset(directory + "/int8")
        keras_gemma.GemmaCausalLM.from_preset(directory + "/int8")(inputs)
    loaded = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))
    assert not loaded, loaded[:5]
    """
)


def test_configs_are_serialized_as_keras_serializes_them():
    """Quantization configs and dtype policies are written without Keras'
    `serialize_keras_object` (it imports TensorFlow): the same dicts."""
    from keras.quantizers import AbsMaxQuantizer, Int4QuantizationConfig, Int8QuantizationConfig

    from keras_gemma.backbone import _serialized_policy
    from keras_gemma.quantization import default_config, serialize_config

    configs = [
        default_config("int8"), default_config("int4"), Int8QuantizationConfig(),
        Int4QuantizationConfig(block_size=-1), Int8QuantizationConfig(weight_quantizer=AbsMaxQuantizer(axis=0)),
    ]
    for config in configs:
        assert serialize_config(config) == keras.saving.serialize_keras_object(config)
    for name in ("float32", "bfloat16", "mixed_bfloat16", "int8_from_float32"):
        policy = keras.dtype_policies.get(name)
        assert _serialized_policy(policy) == keras.dtype_policies.serialize(policy)


def test_no_tensorflow_under_jax_or_torch():
    targets = [backend()] if backend() in ("jax", "torch") else ["jax", "torch"]
    for target in targets:
        env = {**os.environ, "KERAS_BACKEND": target, "PYTHONPATH": ROOT}
        result = subprocess.run([sys.executable, "-c", NO_TENSORFLOW_SCRIPT], env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
