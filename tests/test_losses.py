"""The chunked causal-LM loss against full softmax cross-entropy and
transformers: values and gradients (hidden states, table, every weight),
masked, weighted and soft-capped, on every backend."""

import numpy as np
import pytest
import torch

import keras
from keras import ops

import keras_gemma
from conftest import backend, to_numpy
from hf_reference import build_hf, gemma2_config, ours_from_hf, padded_batch
from keras_gemma import losses
from keras_gemma.checkpoints.huggingface import canonical_weights

TOLERANCE = 1e-5


def value_and_gradients(fn, arrays):
    """fn(*tensors) -> scalar, and its gradients, at numpy `arrays`, on this backend."""
    if backend() == "jax":
        import jax

        value, grads = jax.value_and_grad(fn, argnums=tuple(range(len(arrays))))(*arrays)
    elif backend() == "tensorflow":
        import tensorflow as tf

        tensors = [tf.Variable(a) for a in arrays]
        with tf.GradientTape() as tape:
            value = fn(*tensors)
        grads = tape.gradient(value, tensors)
    else:
        tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
        value = fn(*tensors)
        value.backward()
        grads = [t.grad for t in tensors]
    return float(to_numpy(value)), [to_numpy(g) for g in grads]


def model_value_and_gradients(model, fn):
    """fn() -> scalar using `model`'s variables, and d/d every trainable variable."""
    variables = model.trainable_variables
    if backend() == "jax":
        import jax

        def stateless(values):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return fn()

        value, grads = jax.value_and_grad(stateless)([v.value for v in variables])
    elif backend() == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            value = fn()
        grads = tape.gradient(value, [v.value for v in variables])
    else:
        for v in variables:
            v.value.grad = None
        value = fn()
        value.backward()
        grads = [v.value.grad for v in variables]
    return float(to_numpy(value)), {v.path: to_numpy(g) for v, g in zip(variables, grads)}


def random_case(b=3, t=7, d=8, v=50, seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(b, t, d)).astype("float32")
    table = rng.normal(size=(v, d)).astype("float32")
    targets = rng.integers(0, v, (b, t)).astype("int32")
    weights = (rng.random((b, t)) > 0.3) * rng.uniform(0.5, 2.0, (b, t))
    return hidden, table, targets, weights.astype("float32")


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk_size", [4, 7, 1000])  # uneven (the last chunk overlaps), even, one chunk
def test_chunked_equals_full_cross_entropy(softcap, chunk_size):
    hidden, table, targets, weights = random_case()
    y, w = ops.convert_to_tensor(targets), ops.convert_to_tensor(weights)

    def full(h, e):
        logits = losses.head_logits(h, e, softcap)  # (b, t, v)
        return ops.sum(w * keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))

    def fused(h, e):
        token_losses, _ = losses.head_cross_entropy(
            h, e, y, softcap=softcap, weights=w, chunk_size=chunk_size, table_gradient=True
        )
        return ops.sum(w * token_losses)

    def rematerialized(h, e):
        return ops.sum(w * losses.token_cross_entropy(h, e, y, softcap=softcap, chunk_size=chunk_size))

    expected, (d_hidden, d_table) = value_and_gradients(full, [hidden, table])
    assert np.abs(d_table).max() > 0.1 and np.abs(d_hidden).max() > 0.1
    for fn in (fused, rematerialized):
        value, (h_grad, e_grad) = value_and_gradients(fn, [hidden, table])
        np.testing.assert_allclose(value, expected, rtol=TOLERANCE)
        np.testing.assert_allclose(h_grad, d_hidden, atol=TOLERANCE, rtol=TOLERANCE)
        np.testing.assert_allclose(e_grad, d_table, atol=TOLERANCE, rtol=TOLERANCE)


def test_hits_are_argmax_hits():
    hidden, table, targets, _ = random_case()
    targets[0] = np.argmax(hidden[0] @ table.T, axis=-1)  # row 0: all hits
    _, hits = losses.head_cross_entropy(hidden, table, targets, chunk_size=4)
    expected = np.argmax(hidden @ table.T, axis=-1) == targets
    np.testing.assert_array_equal(to_numpy(hits), expected.astype("float32"))


@pytest.fixture(scope="module")
def gemma2():
    hf_model = build_hf(gemma2_config())  # both soft-caps on
    return hf_model, ours_from_hf(hf_model)


@pytest.mark.parametrize("embedding_trainable", [True, False])
def test_fit_loss_and_gradients_equal_transformers(gemma2, embedding_trainable):
    hf_model, ours = gemma2
    ours.compile(loss=losses.CausalLMLoss(chunk_size=5, reduction="mean_with_sample_weight"))
    ours.backbone.token_embedding.trainable = embedding_trainable
    ids, mask = padded_batch(13)
    ids, mask = ids[:2], mask[:2]  # right padding only: transformers' positions count from the row's start
    targets = np.roll(ids, -1, axis=1)
    weights = (mask & np.roll(mask, -1, axis=1)).astype("float32")
    weights[:, -1] = 0
    x = {"token_ids": ids, "padding_mask": mask}

    def fit_loss():
        hidden = ours(x, training=True)  # what fit hands compute_loss
        assert hidden.shape[-1] == ours.config.hidden_dim
        return ours.compute_loss(x, ops.convert_to_tensor(targets), hidden, ops.convert_to_tensor(weights))

    value, grads = model_value_and_gradients(ours, fit_loss)
    ours.backbone.token_embedding.trainable = True

    labels = torch.tensor(np.where(mask, ids, -100)).long()
    hf_model.zero_grad()
    out = hf_model(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask.astype("int64")), labels=labels)
    out.loss.backward()
    np.testing.assert_allclose(value, out.loss.item(), rtol=TOLERANCE)
    hf_grads = {name: p.grad.numpy() for name, p in hf_model.named_parameters()}
    expected = canonical_weights(ours.config, hf_grads)
    variables = ours.backbone.weight_map()
    checked = 0
    for name, variable in variables.items():
        if variable.path in grads:
            np.testing.assert_allclose(grads[variable.path], np.asarray(expected[name]), atol=TOLERANCE, rtol=1e-4, err_msg=name)
            checked += 1
    assert checked == len(grads) == len(variables) - (not embedding_trainable)


def test_fit_with_the_default_loss_equals_full_cross_entropy():
    config = keras_gemma.GemmaConfig(
        vocabulary_size=50, num_layers=2, hidden_dim=16, num_query_heads=2, num_key_value_heads=1,
        head_dim=8, intermediate_dim=32, final_logit_softcap=5.0,
    )
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, (4, 9)).astype("int32")
    mask = np.ones((4, 9), bool)
    mask[1, -3:] = False
    x, y, w = {"token_ids": ids, "padding_mask": mask}, np.roll(ids, -1, axis=1), mask.astype("float32")
    runs = {}
    for name, loss in (("chunked", losses.CausalLMLoss(chunk_size=5)), ("full", keras.losses.SparseCategoricalCrossentropy(from_logits=True))):
        keras.utils.set_random_seed(0)
        model = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(config))
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss)
        history = model.fit(x, y, sample_weight=w, batch_size=4, epochs=3, verbose=0).history
        evaluation = model.evaluate(x, y, sample_weight=w, verbose=0, return_dict=True)
        runs[name] = history, evaluation, [to_numpy(v) for v in model.trainable_variables]
    (history, evaluation, weights), (full_history, full_evaluation, full_weights) = runs["chunked"], runs["full"]
    assert set(history) == {"loss", "sparse_categorical_accuracy"}
    for key in history:
        np.testing.assert_allclose(history[key], full_history[key], rtol=1e-5)
        np.testing.assert_allclose(evaluation[key], full_evaluation[key], rtol=1e-5)
    assert history["loss"][-1] < history["loss"][0]
    for a, b in zip(weights, full_weights):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_fit_with_another_metric_takes_the_full_logits():
    """A metric other than the chunked accuracy needs the full logits: `fit`
    then makes them (JAX's trainer holds no weights in `compute_metrics`),
    with the same loss as full cross-entropy."""
    config = keras_gemma.GemmaConfig(
        vocabulary_size=50, num_layers=1, hidden_dim=16, num_query_heads=2, num_key_value_heads=1,
        head_dim=8, intermediate_dim=32,
    )
    ids = np.random.default_rng(1).integers(0, 50, (2, 6)).astype("int32")
    x, y = {"token_ids": ids, "padding_mask": np.ones((2, 6), bool)}, np.roll(ids, -1, axis=1)
    runs = []
    for loss in ("auto", keras.losses.SparseCategoricalCrossentropy(from_logits=True)):
        keras.utils.set_random_seed(0)
        model = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(config))
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss, weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc")])
        runs.append(model.fit(x, y, batch_size=2, epochs=2, verbose=0).history)
    for key in ("loss", "acc"):
        np.testing.assert_allclose(runs[0][key], runs[1][key], rtol=1e-5)


def test_bad_chunk_size():
    with pytest.raises(ValueError, match="positive number of tokens"):
        losses.CausalLMLoss(chunk_size=0)
