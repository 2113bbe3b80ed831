"""Sequence packing: several samples per row with segment ids give the same
logits and loss as the samples unpacked, one per row."""

import numpy as np
import pytest

import keras
import keras_gemma
from conftest import to_numpy
from keras_gemma.preprocessor import GemmaCausalLMPreprocessor, to_fit_data
from test_lora import tiny_config as lora_config
from tokenizer_fixtures import tiny_tokenizer  # noqa: F401 (fixture)

PROMPTS = ["The quick brown fox", "Hello", "Add one and two", "A", "Jumps over the lazy dog today"]
RESPONSES = [" jumps", " there, friend", " three", " b c d e f", " and sleeps"]


def tiny_config(**overrides):
    # test_lora's (soft-caps, QK-norm, a window of 3 so every masking path bites), the tokenizer's vocabulary.
    return lora_config(**{"vocabulary_size": 448, "sliding_window_size": 3, **overrides})


def samples(packing, sequence_length, tokenizer):
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=sequence_length, packing=packing)
    return preprocessor({"prompts": PROMPTS, "responses": RESPONSES})


def mean_loss(logits, labels, weights):
    """Weighted mean next-token cross-entropy, in float64 numpy."""
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    token_losses = -np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
    return (token_losses * weights).sum() / weights.sum()


def test_packed_rows_hold_each_sample_whole(tiny_tokenizer):
    x, y, w = samples(False, 24, tiny_tokenizer)
    px, py, pw = samples(True, 24, tiny_tokenizer)
    assert px["token_ids"].shape == px["segment_ids"].shape == py.shape == pw.shape
    assert px["token_ids"].shape[0] < x["token_ids"].shape[0]  # fewer rows
    found = []
    for row in range(px["token_ids"].shape[0]):
        segments = px["segment_ids"][row]
        np.testing.assert_array_equal(px["padding_mask"][row], segments > 0)
        for segment in range(1, segments.max() + 1):
            where = segments == segment
            found.append((px["token_ids"][row][where], py[row][where], pw[row][where]))
    assert len(found) == len(PROMPTS)
    for i, (ids, labels, weights) in enumerate(found):  # in order, as unpacked
        n = int(x["padding_mask"][i].sum()) - 1  # the eos is an input unpacked, never packed
        np.testing.assert_array_equal(ids, x["token_ids"][i, :n])
        np.testing.assert_array_equal(labels, y[i, :n])
        np.testing.assert_array_equal(weights, w[i, :n])
        assert w[i, n:].sum() == 0


@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_packed_logits_and_loss_equal_unpacked(variant, tiny_tokenizer):
    overrides = {"gemma2": dict(use_qk_norm=False, attention_logit_softcap=50.0), "gemma3": {}}[variant]
    model = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(tiny_config(**overrides)))
    x, y, w = samples(False, 24, tiny_tokenizer)
    px, py, pw = samples(True, 24, tiny_tokenizer)
    logits = to_numpy(model(x))
    packed_logits = to_numpy(model(px))
    sample = 0
    for row in range(px["token_ids"].shape[0]):
        segments = px["segment_ids"][row]
        for segment in range(1, segments.max() + 1):
            where = segments == segment
            np.testing.assert_allclose(
                packed_logits[row][where], logits[sample, : where.sum()], atol=1e-4, err_msg=f"sample {sample}"
            )
            sample += 1
    expected = mean_loss(logits, y, w)
    assert abs(mean_loss(packed_logits, py, pw) - expected) < 1e-5 * expected
    # Keras' loss summed over tokens too (its default mean divides by all positions, padding included).
    summed = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
    np.testing.assert_allclose(to_numpy(summed(py, packed_logits, pw)), to_numpy(summed(y, logits, w)), rtol=1e-5)
    # Without segment ids the samples would see each other.
    crossed = to_numpy(model({"token_ids": px["token_ids"], "padding_mask": px["padding_mask"]}))
    assert np.abs(crossed - packed_logits).max() > 1e-2


def test_fit_on_packed_text(tiny_tokenizer):
    preprocessor = GemmaCausalLMPreprocessor(tiny_tokenizer, sequence_length=32, packing=True)
    model = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(tiny_config()), preprocessor=preprocessor)
    data = to_fit_data(preprocessor, PROMPTS, RESPONSES)
    assert data["x"]["segment_ids"].max() > 1
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    losses = model.fit(PROMPTS, RESPONSES, epochs=3, verbose=0).history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_bad_packing_says_what_is_wrong(tiny_tokenizer):
    preprocessor = GemmaCausalLMPreprocessor(tiny_tokenizer, sequence_length=4, packing=True)
    before = preprocessor.num_dropped_samples
    with pytest.raises(ValueError, match=r"Sample 1 has \d+ tokens, more than sequence_length \+ 1 = 5"):
        preprocessor(["a", "The quick brown fox jumps over the lazy dog"])
    assert preprocessor.num_dropped_samples == before
    backbone = keras_gemma.GemmaBackbone(tiny_config())
    ids = np.ones((1, 4), "int32")
    with pytest.raises(ValueError, match="cannot be used with a cache"):
        backbone.hidden_states(ids, segment_ids=np.ones((1, 4), "int32"), cache=backbone.init_cache(1, 8))


@pytest.mark.skipif(keras.config.backend() != "tensorflow", reason="tf.data runs under the TensorFlow backend")
def test_packed_tf_data(tiny_tokenizer):
    import tensorflow as tf

    preprocessor = GemmaCausalLMPreprocessor(tiny_tokenizer, sequence_length=32, packing=True)
    pairs = tf.data.Dataset.from_tensor_slices({"prompts": PROMPTS, "responses": RESPONSES}).batch(5)
    x, y, weights = next(iter(to_fit_data(preprocessor, pairs)["x"]))
    expected = preprocessor({"prompts": PROMPTS, "responses": RESPONSES})
    for key in ("token_ids", "padding_mask", "segment_ids"):
        np.testing.assert_array_equal(x[key].numpy(), expected[0][key])
    np.testing.assert_array_equal(weights.numpy(), expected[2])
