"""Samplers: greedy, random, top-k and top-p on crafted distributions, seeds,
and the counter-based noise they share (the same on every backend)."""

import numpy as np
import pytest

import keras

from conftest import to_numpy
from keras_gemma import samplers
from keras_gemma.generation.samplers import gumbel_noise

ROWS = 4000  # one call samples every row independently: many draws at once


def _sample(sampler, logits, seed=0, step=0):
    key = keras.ops.convert_to_tensor(np.array([seed, step], np.int32))
    return to_numpy(sampler(keras.ops.convert_to_tensor(np.asarray(logits, np.float32)), key))


def _rows_of(probs, rows=ROWS):
    return np.tile(np.log(np.asarray(probs, np.float32))[None], (rows, 1))


def _lowbias32(x):
    x = np.asarray(x, np.uint32)
    x ^= x >> np.uint32(16)
    x = (x * np.uint32(0x7FEB352D)).astype(np.uint32)
    x ^= x >> np.uint32(15)
    x = (x * np.uint32(0x846CA68B)).astype(np.uint32)
    x ^= x >> np.uint32(16)
    return x


def test_noise_is_the_reference_hash():
    """int32 keras.ops with wraparound reproduce a uint32 NumPy hash, so the
    same seed gives the same draws on JAX, TensorFlow and PyTorch."""
    seed, step, rows, n = 123456789, 7, 3, 1000
    with np.errstate(over="ignore"):
        inner = _lowbias32(np.uint32(seed) + _lowbias32(np.uint32(step)))
        x = (inner ^ (np.arange(rows, dtype=np.uint32)[:, None] * np.uint32(n))) + np.arange(n, dtype=np.uint32)[None]
        x = _lowbias32(_lowbias32(x) + np.uint32(step))
    u = ((x >> np.uint32(8)).astype(np.float32) + 0.5) / float(1 << 24)
    expected = -np.log(-np.log(u))
    got = to_numpy(gumbel_noise(keras.ops.convert_to_tensor(np.array([seed, step], np.int32)), (rows, n)))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert abs(got.mean() - 0.5772) < 0.05 and abs(got.std() - 1.2825) < 0.05


def test_greedy_is_argmax():
    logits = np.random.default_rng(0).standard_normal((16, 50))
    assert (_sample(samplers.GreedySampler(), logits) == logits.argmax(-1)).all()


def test_random_follows_softmax():
    probs = np.array([0.5, 0.25, 0.15, 0.1])
    tokens = _sample(samplers.RandomSampler(seed=0), _rows_of(probs))
    frequencies = np.bincount(tokens, minlength=4) / ROWS
    np.testing.assert_allclose(frequencies, probs, atol=0.03)
    # Temperature sharpens: at 0.25, p^4 renormalised.
    cold = np.bincount(_sample(samplers.RandomSampler(temperature=0.25), _rows_of(probs)), minlength=4) / ROWS
    np.testing.assert_allclose(cold, probs**4 / (probs**4).sum(), atol=0.03)


def test_top_k_stays_in_top_k():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((512, 100)) * 3
    allowed = np.argsort(-logits, axis=-1)[:, :5]
    sampler = samplers.TopKSampler(k=5, seed=0)
    seen = set()
    for step in range(20):
        tokens = _sample(sampler, logits, step=step)
        assert all(t in row for t, row in zip(tokens, allowed))
        seen |= {(i, t) for i, t in enumerate(tokens)}
    # ...and is random within them (not always the top one).
    assert len(seen) > 512 * 3


def test_top_p_respects_p():
    # Sorted mass: 0.5, 0.8, 0.95, 1.0. p=0.7 keeps the first two (the
    # smallest set reaching 0.7), renormalised to 5/8 and 3/8.
    probs = np.array([0.15, 0.5, 0.05, 0.3])
    tokens = _sample(samplers.TopPSampler(p=0.7, seed=3), _rows_of(probs))
    assert set(tokens.tolist()) == {1, 3}
    np.testing.assert_allclose((tokens == 1).mean(), 0.625, atol=0.03)
    # p just above 0.8 also admits the third most likely token; tiny p keeps only the top one.
    wider = _sample(samplers.TopPSampler(p=0.81, seed=3), _rows_of(probs))
    assert set(wider.tolist()) == {0, 1, 3}
    assert set(_sample(samplers.TopPSampler(p=0.01), _rows_of(probs)).tolist()) == {1}
    # With k, only the k most likely are looked at.
    assert set(_sample(samplers.TopPSampler(p=1.0, k=2), _rows_of(probs)).tolist()) == {1, 3}


def test_seeds_reproduce_and_differ():
    logits = np.zeros((64, 1000), np.float32)
    a = _sample(samplers.RandomSampler(), logits, seed=5, step=2)
    assert (a == _sample(samplers.RandomSampler(), logits, seed=5, step=2)).all()
    assert (a != _sample(samplers.RandomSampler(), logits, seed=6, step=2)).mean() > 0.9
    assert (a != _sample(samplers.RandomSampler(), logits, seed=5, step=3)).mean() > 0.9
    # Per-call seeds: a fresh sampler with the same seed repeats the sequence.
    first, second = samplers.TopKSampler(seed=9), samplers.TopKSampler(seed=9)
    calls = [first.next_seed() for _ in range(3)]
    assert calls == [second.next_seed() for _ in range(3)]
    assert len(set(calls)) == 3


def test_seeded_generation_is_reproducible():
    import keras_gemma

    backbone = keras_gemma.GemmaBackbone(
        vocabulary_size=64, num_layers=2, hidden_dim=16, num_query_heads=2,
        num_key_value_heads=1, head_dim=8, intermediate_dim=32,
    )
    lm = keras_gemma.GemmaCausalLM(backbone)
    prompt = {"token_ids": np.array([[2, 5, 9, 11], [2, 7, 0, 0]]), "padding_mask": np.array([[1, 1, 1, 1], [1, 1, 0, 0]])}

    def run(sampler):
        lm.compile(sampler=sampler)
        return [lm.generate(prompt, max_new_tokens=12, stop_token_ids=None)["token_ids"].tolist() for _ in range(2)]

    first = run(samplers.RandomSampler(temperature=2.0, seed=42))
    assert first == run(samplers.RandomSampler(temperature=2.0, seed=42))
    assert first[0] != first[1]  # successive calls draw new numbers
    assert first != run(samplers.RandomSampler(temperature=2.0, seed=43))


def test_get():
    assert isinstance(samplers.get("greedy"), samplers.GreedySampler)
    assert samplers.get("top_k").k == 5 and samplers.get("top_p").p == 0.1
    assert samplers.get({"class_name": "top_p", "config": {"p": 0.9, "seed": 1}}).p == 0.9
    custom = samplers.TopKSampler(k=3, temperature=0.5, seed=2)
    assert samplers.get(custom) is custom
    with pytest.raises(ValueError, match="Valid names"):
        samplers.get("contrastive")
    with pytest.raises(ValueError):
        samplers.TopPSampler(p=0)
    with pytest.raises(ValueError):
        samplers.RandomSampler(temperature=0)


def test_keras_hub_samplers_are_understood():
    keras_hub = pytest.importorskip("keras_hub")
    converted = samplers.get(keras_hub.samplers.TopKSampler(k=7, seed=4, temperature=0.5))
    assert isinstance(converted, samplers.TopKSampler)
    assert (converted.k, converted.seed, converted.temperature) == (7, 4, 0.5)
    assert isinstance(samplers.get(keras_hub.samplers.GreedySampler()), samplers.GreedySampler)
    assert samplers.get(keras_hub.samplers.TopPSampler(p=0.3)).p == 0.3
