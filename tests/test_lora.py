"""LoRA: parameter counts, a fit with a frozen base, adapter files, merging,
and clear errors."""

import os

import numpy as np
import pytest

import keras
import keras_gemma
from conftest import to_numpy
from keras_gemma.lora import lora_parameter_count

LOSS_THRESHOLD = 0.3  # from ~12 at the start (0.05 after 30 epochs on JAX)


def tiny_config(**overrides):
    args = dict(
        vocabulary_size=64, num_layers=2, hidden_dim=32, num_query_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_dim=48,
        layer_types=("local", "global"), sliding_window_size=4,
        use_post_norms=True, use_qk_norm=True, final_logit_softcap=30.0,
    )
    return keras_gemma.GemmaConfig(**{**args, **overrides})


def new_model(config=None):
    return keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(config or tiny_config()))


def copy_of(model):
    copy = new_model(model.config)
    copy.set_weights(model.get_weights())
    return copy


def task():
    """Four sequences to memorise: next-token prediction."""
    ids = np.random.default_rng(3).integers(0, 64, (4, 9)).astype("int32")
    inputs = {"token_ids": ids[:, :-1], "padding_mask": np.ones((4, 8), bool)}
    return inputs, ids[:, 1:]


def compile_for_fit(model, learning_rate=3e-2):
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


def base_values(model):
    return {w.path: to_numpy(w) for w in model.weights if "lora_kernel" not in w.path}


@pytest.mark.parametrize(
    "rank, targets",
    [(4, ("query", "value")), (2, "all"), (3, ["down", "key", "output"])],
)
def test_trainable_parameters_equal_the_formula(rank, targets):
    model = new_model()
    config = model.config
    model.backbone.enable_lora(rank, target_layers=targets)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == lora_parameter_count(config, rank, targets)
    if targets == ("query", "value"):
        n, k, d, h = 4, 2, 32, 8
        assert trainable == config.num_layers * ((n * d * rank + rank * h) + (k * d * rank + rank * h))
    assert all("lora_kernel" in w.path for w in model.trainable_weights)
    # Embedding, norms and base kernels are frozen; the total is unchanged plus the adapters.
    frozen = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    assert frozen == config.num_parameters()


@pytest.fixture(scope="module")
def trained():
    """A LoRA fit on the tiny task (done once for the tests below)."""
    keras.utils.set_random_seed(0)
    model = new_model()
    # A larger embedding, as trained ones are: with frozen norms and a frozen
    # tied head, logits are at most |hidden| * |embedding row|, which at
    # initialisation is too small to fit the task well.
    embeddings = model.backbone.token_embedding.embeddings
    embeddings.assign(embeddings * 4.0)
    base = copy_of(model)
    before = base_values(model)
    model.backbone.enable_lora(4, alpha=8, target_layers="all")
    compile_for_fit(model)
    inputs, labels = task()
    history = model.fit(inputs, labels, batch_size=4, epochs=30, verbose=0)
    return model, base, before, history.history["loss"]


def test_lora_fit_learns_with_the_base_frozen(trained):
    model, _, before, losses = trained
    assert losses[0] > 3.0
    assert losses[-1] < LOSS_THRESHOLD, losses
    after = base_values(model)
    assert before.keys() == after.keys()
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)  # bit for bit


def test_adapter_file_round_trip_reproduces_logits(trained, tmp_path):
    model, base, _, _ = trained
    inputs, _ = task()
    expected = to_numpy(model(inputs))
    path = str(tmp_path / "task.lora.npz")
    model.backbone.save_lora_weights(path)
    # Only the adapters (plus a little metadata).
    adapter_bytes = sum(int(np.prod(w.shape)) * 4 for w in model.trainable_weights)
    assert os.path.getsize(path) < adapter_bytes + 20_000
    restored = copy_of(base)
    restored.backbone.load_lora_weights(path)  # enables LoRA with the file's settings
    assert restored.backbone.lora.rank == 4 and restored.backbone.lora.alpha == 8
    np.testing.assert_array_equal(to_numpy(restored(inputs)), expected)


def test_merged_logits_equal_unmerged(trained, tmp_path):
    trained_model, base, _, _ = trained
    path = str(tmp_path / "task.lora.npz")
    trained_model.backbone.save_lora_weights(path)
    model = copy_of(base)
    model.backbone.load_lora_weights(path)
    inputs, _ = task()
    expected = to_numpy(model(inputs))
    model.backbone.merge_lora_weights()
    assert model.backbone.lora is None
    assert not any("lora" in w.path for w in model.weights)
    # A plain model again: everything trainable, nothing extra.
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == model.config.num_parameters()
    np.testing.assert_allclose(to_numpy(model(inputs)), expected, atol=1e-5, rtol=0)


def test_bad_lora_calls_say_what_is_wrong(tmp_path):
    model = new_model()
    with pytest.raises(ValueError, match="Unknown LoRA target.*'qkv'"):
        model.backbone.enable_lora(4, target_layers=("query", "qkv"))
    with pytest.raises(ValueError, match="non-empty"):
        model.backbone.enable_lora(4, target_layers=())
    with pytest.raises(ValueError, match="rank"):
        model.backbone.enable_lora(0)
    with pytest.raises(ValueError, match="not enabled"):
        model.backbone.merge_lora_weights()
    model.backbone.enable_lora(4)
    with pytest.raises(ValueError, match="already enabled"):
        model.backbone.enable_lora(4)
    path = str(tmp_path / "rank4.lora.npz")
    model.backbone.save_lora_weights(path)

    other_rank = new_model()
    other_rank.backbone.enable_lora(2)
    with pytest.raises(ValueError, match="rank 4.*rank 2"):
        other_rank.backbone.load_lora_weights(path)

    other_model = new_model(tiny_config(hidden_dim=48))
    with pytest.raises(ValueError, match="different model.*hidden_dim"):
        other_model.backbone.load_lora_weights(path)

    not_an_adapter = str(tmp_path / "other.npz")
    np.savez(not_an_adapter, x=np.zeros(3))
    with pytest.raises(ValueError, match="not a keras_gemma LoRA adapter"):
        new_model().backbone.load_lora_weights(not_an_adapter)

    with pytest.raises(ValueError, match="Quantize before enabling LoRA"):
        model.quantize("int8")
