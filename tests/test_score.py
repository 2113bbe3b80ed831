"""`GemmaCausalLM.score` against keras-hub's `score` and transformers.

keras-hub's modes (`"logits"`, `"loss"`, `layer_intercept_fn`) on the same
weights give keras-hub's numbers (Gemma 1 and 2: keras-hub 0.32 has no
`score` for Gemma 3). Intercepted activations are transformers'
`output_hidden_states`; an intercept that changes the embeddings acts as
transformers' `inputs_embeds` (keras-hub drops what it returns there), and
gradients through it are transformers' autograd gradients, on every
backend.
"""

import numpy as np
import pytest
import torch

from keras import ops

import keras_gemma
from conftest import backend, to_numpy
from hf_reference import build_hf, gemma3_config, ours_from_hf, padded_batch, positions_of
from tokenizer_fixtures import train_tiny_spm

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    return str(train_tiny_spm(tmp_path_factory.mktemp("spm") / "tokenizer.model", "control"))


@pytest.fixture(scope="module")
def gemma3():
    hf_model = build_hf(gemma3_config())
    return hf_model, ours_from_hf(hf_model)


def halve_block_1(x, i):
    return x * 0.5 if i == 1 else x


@pytest.mark.parametrize("generation", ["gemma", "gemma2"])
def test_logits_and_loss_modes_match_keras_hub(generation, spm_path, tmp_path):
    pytest.importorskip("keras_hub")
    from test_checkpoints_keras_hub import keras_hub_task

    theirs = keras_hub_task(generation, spm_path)
    theirs.save_to_preset(str(tmp_path / "preset"))
    ours = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path / "preset"))
    ids, mask = padded_batch(13)
    ids, mask = ids[:2], mask[:2]  # keras-hub counts left padding in its positions
    targets = np.roll(ids, -1, axis=1)
    for intercept in (None, halve_block_1):
        expected = to_numpy(theirs.score(ids, mask, scoring_mode="loss", target_ids=targets, layer_intercept_fn=intercept))
        actual = to_numpy(ours.score(ids, mask, "loss", intercept, targets))  # keras-hub's argument order
        np.testing.assert_allclose(actual[mask], expected[mask], atol=TOLERANCE, rtol=TOLERANCE)
        expected = to_numpy(theirs.score(ids, mask, scoring_mode="logits", layer_intercept_fn=intercept))
        actual = to_numpy(ours.score(token_ids=ids, padding_mask=mask, scoring_mode="logits", layer_intercept_fn=intercept))
        np.testing.assert_allclose(actual[mask], expected[mask], atol=TOLERANCE, rtol=TOLERANCE)
    assert actual.shape == (2, 13, ours.config.vocabulary_size)
    # The intercept mattered, and the default mode is the loss's negative, shifted.
    plain = to_numpy(ours.score(ids, mask, scoring_mode="logits"))
    assert np.abs(plain - actual)[mask].max() > 0.1
    loss = to_numpy(ours.score(ids, mask, scoring_mode="loss", target_ids=targets))
    log_probs = ours.score(ids, mask)
    real = mask[:, 1:] & mask[:, :-1]
    np.testing.assert_allclose(log_probs[:, 1:][real], -loss[:, :-1][real], atol=1e-5)


def hf_forward(hf_model, ids, mask, inputs_embeds=None):
    kwargs = dict(
        attention_mask=torch.tensor(mask.astype("int64")),
        position_ids=torch.tensor(positions_of(mask), dtype=torch.long),
        output_hidden_states=True,
    )
    if inputs_embeds is None:
        kwargs["input_ids"] = torch.tensor(ids, dtype=torch.long)
    else:
        kwargs["inputs_embeds"] = inputs_embeds
    return hf_model(**kwargs)


def test_intercepted_activations_are_transformers_hidden_states(gemma3):
    hf_model, ours = gemma3
    ids, mask = padded_batch(13)
    seen = {}

    def record(x, i):
        seen[i] = to_numpy(x)
        return x

    ours.score(ids, mask, scoring_mode="logits", layer_intercept_fn=record)
    with torch.no_grad():
        hidden = [h.numpy() for h in hf_forward(hf_model, ids, mask).hidden_states]
    layers = ours.config.num_layers
    assert sorted(seen) == list(range(-1, layers))
    # transformers: the scaled embeddings, each block's output but the last, the final norm's.
    scale = np.float32(ours.config.hidden_dim**0.5)
    np.testing.assert_allclose((seen[-1] * scale)[mask], hidden[0][mask], atol=TOLERANCE, rtol=TOLERANCE)
    for i in range(layers - 1):
        np.testing.assert_allclose(seen[i][mask], hidden[i + 1][mask], atol=TOLERANCE, rtol=TOLERANCE)
    final = to_numpy(ours.backbone.final_norm(seen[layers - 1]))
    np.testing.assert_allclose(final[mask], hidden[layers][mask], atol=TOLERANCE, rtol=TOLERANCE)


def embeddings_and_steer(ours, ids, seed=0):
    table = to_numpy(ours.backbone.token_embedding.embeddings)
    steer = np.random.default_rng(seed).normal(0.0, 0.1, table[ids].shape).astype("float32")
    return table[ids], steer


def test_intercepted_embeddings_act_as_transformers_inputs_embeds(gemma3):
    hf_model, ours = gemma3
    ids, mask = padded_batch(13)
    embeddings, steer = embeddings_and_steer(ours, ids)
    added = ops.convert_to_tensor(steer)
    actual = to_numpy(ours.score(ids, mask, scoring_mode="logits", layer_intercept_fn=lambda x, i: x + added if i < 0 else x))
    scale = np.float32(ours.config.hidden_dim**0.5)
    with torch.no_grad():
        expected = hf_forward(hf_model, ids, mask, torch.tensor((embeddings + steer) * scale)).logits.numpy()
    np.testing.assert_allclose(actual[mask], expected[mask], atol=TOLERANCE, rtol=TOLERANCE)
    plain = to_numpy(ours.score(ids, mask, scoring_mode="logits"))
    assert np.abs(plain - actual)[mask].max() > 0.1  # the steer was used, not dropped


def gradient(f, x):
    """df/dx of a scalar backend function at numpy x, on this backend."""
    if backend() == "jax":
        import jax

        return np.asarray(jax.grad(f)(jax.numpy.asarray(x)))
    if backend() == "tensorflow":
        import tensorflow as tf

        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = f(x)
        return tape.gradient(y, x).numpy()
    x = torch.tensor(x, requires_grad=True)
    f(x).backward()
    return x.grad.numpy()


def test_loss_gradients_through_the_intercept_match_transformers(gemma3):
    hf_model, ours = gemma3
    ids, mask = padded_batch(13)
    targets = np.roll(ids, -1, axis=1)
    weights = (mask & np.roll(mask, -1, axis=1)).astype("float32")
    embeddings, steer = embeddings_and_steer(ours, ids)

    def total_loss(delta):
        loss = ours.score(
            ids, mask, scoring_mode="loss", target_ids=targets, layer_intercept_fn=lambda x, i: x + delta if i < 0 else x
        )
        return ops.sum(ops.multiply(loss, weights))

    actual = gradient(total_loss, steer)
    scale = np.float32(ours.config.hidden_dim**0.5)
    inputs_embeds = torch.tensor((embeddings + steer) * scale, requires_grad=True)
    logits = hf_forward(hf_model, ids, mask, inputs_embeds).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.tensor(targets).long().flatten(), reduction="none")
    (loss * torch.tensor(weights).flatten()).sum().backward()
    expected = inputs_embeds.grad.numpy() * scale
    assert np.abs(expected[mask]).max() > 0.1
    np.testing.assert_allclose(actual[mask], expected[mask], atol=1e-4, rtol=1e-3)


def test_score_bad_arguments(gemma3):
    _, ours = gemma3
    ids, mask = padded_batch(5)
    with pytest.raises(ValueError, match="needs `target_ids`"):
        ours.score(ids, mask, scoring_mode="loss")
    with pytest.raises(ValueError, match="'log_probs', 'logits' or 'loss'"):
        ours.score(ids, mask, scoring_mode="perplexity")
    with pytest.raises(ValueError, match="once"):
        ours.score(ids, token_ids=ids)
    with pytest.raises(ValueError, match="shape of `token_ids`"):
        ours.score(ids, mask, scoring_mode="loss", target_ids=ids[:, :-1])
    with pytest.raises(ValueError, match="takes token ids"):
        ours.score("some text", scoring_mode="logits")
