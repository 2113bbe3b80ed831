"""Sharding with keras.distribution (JAX only): layout validity for every
preset, and sharded = unsharded on 8 virtual CPU devices (in a subprocess,
since XLA_FLAGS must be set before JAX starts)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import keras
import keras_gemma
from conftest import backend
from keras_gemma.distribution import get_layout_map, layout_problems
from keras_gemma.presets import ARCHITECTURES

pytestmark = pytest.mark.skipif(backend() != "jax", reason="keras.distribution sharding is JAX-only")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MESHES = [(1, 2), (1, 4), (1, 8), (2, 2), (2, 4), (4, 2), (8, 1)]  # (batch, model)


def fake_mesh(shape):
    """A mesh for layout arithmetic only (no real devices needed)."""
    devices = [f"cpu:{i}" for i in range(int(np.prod(shape)))]
    return keras.distribution.DeviceMesh(shape, ("batch", "model"), devices)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_layout_map_is_valid_for_every_preset(architecture):
    config = ARCHITECTURES[architecture]
    for shape in MESHES:
        mesh = fake_mesh(shape)
        # Config-aware (head sharding where heads divide) and config-free.
        for layout_map in (get_layout_map(mesh, config=config), get_layout_map(mesh)):
            assert layout_problems(layout_map, config) == [], (architecture, shape)
        layout = get_layout_map(mesh, config=config)[".../decoder_block_0/attention/key/kernel"]
        if config.num_key_value_heads % shape[1]:
            assert layout.axes[0] is None  # never a kv-head axis it cannot split


def test_layout_map_names_what_does_not_divide():
    config = keras_gemma.GemmaConfig(
        vocabulary_size=100, num_layers=1, hidden_dim=30, num_query_heads=2,
        num_key_value_heads=1, head_dim=8, intermediate_dim=48,
    )
    with pytest.raises(ValueError, match="30 is not divisible"):
        keras_gemma.GemmaBackbone.get_layout_map(fake_mesh((2, 4)), config=config)


SHARDED_SCRIPT = textwrap.dedent(
    """
    import json
    import numpy as np
    import jax
    import keras, keras_gemma
    from keras_gemma.distribution import weight_shapes

    assert len(jax.devices()) == 8, jax.devices()
    results = {}

    def tiny(**overrides):
        args = dict(
            vocabulary_size=64, num_layers=2, hidden_dim=32, num_query_heads=4,
            num_key_value_heads=4, head_dim=8, intermediate_dim=64,
            layer_types=("local", "global"), sliding_window_size=3,
            use_post_norms=True, use_qk_norm=True, attention_logit_softcap=5.0,
        )
        return keras_gemma.GemmaConfig(**{**args, **overrides})

    rng = np.random.default_rng(0)
    inputs = {
        "token_ids": rng.integers(0, 64, (4, 8)).astype("int32"),
        "padding_mask": np.ones((4, 8), bool),
    }
    inputs["padding_mask"][1, -2:] = False
    labels = np.roll(inputs["token_ids"], -1, axis=1)

    def compiled(model):
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return model

    devices = keras.distribution.list_devices()
    experts = tiny(num_experts=4, top_k_experts=2, moe_intermediate_dim=16)
    for name, config in (("gqa", tiny()), ("mqa", tiny(num_key_value_heads=1)), ("moe", experts)):
        keras.distribution.set_distribution(None)
        keras.utils.set_random_seed(0)
        plain = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(config))
        weights = plain.get_weights()
        expected = keras.ops.convert_to_numpy(plain(inputs))

        mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), devices)
        layout_map = keras_gemma.GemmaBackbone.get_layout_map(mesh, config=config)
        keras.distribution.set_distribution(
            keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
        )
        sharded = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(config))
        sharded.set_weights(weights)
        shapes = weight_shapes(config)
        specs = {}
        for variable in sharded.backbone.weights:
            for suffix, shape in shapes.items():
                if variable.path.endswith(suffix):
                    assert tuple(variable.shape) == shape, (variable.path, variable.shape, shape)
                    specs[suffix] = list(variable.value.sharding.spec)
        assert len(specs) == len(shapes), specs
        actual = keras.ops.convert_to_numpy(sharded(inputs))
        mask = inputs["padding_mask"]
        results[name] = {
            "max_diff": float(np.abs(actual - expected)[mask].max()),
            "specs": specs,
        }
        history = compiled(sharded).fit(inputs, labels, batch_size=4, epochs=2, verbose=0)
        results[name]["sharded_fit_loss"] = history.history["loss"]

    # Data parallel: replicated weights, the batch split over 8 devices.
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    keras.utils.set_random_seed(0)
    model = compiled(keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(tiny(num_key_value_heads=1))))
    big = {k: np.concatenate([v, v]) for k, v in inputs.items()}
    history = model.fit(big, np.concatenate([labels, labels]), batch_size=8, epochs=3, verbose=0)
    results["data_parallel_fit_loss"] = history.history["loss"]
    print("RESULTS" + json.dumps(results))
    """
)


def test_sharded_model_on_eight_cpu_devices(tmp_path):
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED_SCRIPT)
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "PYTHONPATH": ROOT,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    }
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    import json

    line = [l for l in result.stdout.splitlines() if l.startswith("RESULTS")][-1]
    results = json.loads(line[len("RESULTS"):])
    for name in ("gqa", "mqa", "moe"):
        assert results[name]["max_diff"] < 1e-5, results[name]
        losses = results[name]["sharded_fit_loss"]
        assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
    # GQA with 4 kv heads on a model axis of 4: sharded by head.
    assert results["gqa"]["specs"]["decoder_block_0/attention/key/kernel"][0] == "model"
    # MQA (1 kv head): along the hidden dimension, never the kv-head axis.
    assert results["mqa"]["specs"]["decoder_block_0/attention/key/kernel"][:2] == [None, "model"]
    assert results["mqa"]["specs"]["decoder_block_0/feed_forward/down/kernel"] == ["model", "batch"]
    # Expert banks along each expert's width, as the dense feed-forward.
    assert results["moe"]["specs"]["decoder_block_0/moe/gate_up"] == [None, None, "batch", "model"]
    assert results["moe"]["specs"]["decoder_block_1/moe/down"] == [None, "model", "batch"]
    losses = results["data_parallel_fit_loss"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
