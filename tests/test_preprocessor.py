"""GemmaCausalLMPreprocessor: packing, loss weights, truncation, generation, fit."""

import warnings

import keras
import numpy as np
import pytest

from keras_gemma.chat_template import apply_chat_template
from keras_gemma.preprocessor import (
    DroppedSampleWarning,
    GemmaCausalLMPreprocessor,
    PreprocessedPyDataset,
    to_fit_data,
)
from tokenizer_fixtures import (  # noqa: F401 (fixtures)
    gemma3_tokenizer,
    tiny_spm_user_defined,
    tiny_tokenizer,
)

CONVERSATION = [
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "Add 1 and 2"},
    {"role": "model", "content": "3"},
]


@pytest.fixture
def preprocessor(tiny_tokenizer):
    return GemmaCausalLMPreprocessor(tiny_tokenizer, sequence_length=24)


def real_tokens(x):
    return x["token_ids"][x["padding_mask"]].tolist()


def test_plain_strings(preprocessor, tiny_tokenizer):
    x, y, weights = preprocessor(["The quick fox", "Hello"])
    assert x["token_ids"].shape == x["padding_mask"].shape == y.shape == weights.shape == (2, 24)
    assert (x["token_ids"].dtype, x["padding_mask"].dtype) == (np.int32, np.bool_)
    assert (y.dtype, weights.dtype) == (np.int32, np.float32)
    ids = tiny_tokenizer("The quick fox")
    packed = [2] + ids + [1]
    n = len(packed)
    np.testing.assert_array_equal(x["token_ids"][0, : n - 1], packed[:-1])
    np.testing.assert_array_equal(y[0, : n - 1], packed[1:])
    # The eos is an input too (as in keras-hub); its label is padding.
    assert real_tokens({k: v[:1] for k, v in x.items()}) == packed
    # Weight on every real next token (the text and its eos), nothing else.
    np.testing.assert_array_equal(weights[0], [1.0] * (n - 1) + [0.0] * (24 - n + 1))
    assert (x["token_ids"][0, n:] == 0).all() and (y[0, n - 1 :] == 0).all()


def test_single_string_is_unbatched(preprocessor):
    x, y, weights = preprocessor("Hello")
    assert x["token_ids"].shape == y.shape == weights.shape == (24,)
    batched, _, _ = preprocessor(["Hello"])
    np.testing.assert_array_equal(x["token_ids"], batched["token_ids"][0])


def test_numpy_and_bytes_inputs(preprocessor):
    expected, _, _ = preprocessor(["ab", "cd"])
    for inputs in (np.array(["ab", "cd"]), np.array([[b"ab"], [b"cd"]], dtype=object)):
        x, _, _ = preprocessor(inputs)
        np.testing.assert_array_equal(x["token_ids"], expected["token_ids"])


def test_start_and_end_tokens_optional(tiny_tokenizer):
    layer = GemmaCausalLMPreprocessor(
        tiny_tokenizer, sequence_length=16, add_start_token=False, add_end_token=False
    )
    x, y, _ = layer(["Hello world"])
    ids = tiny_tokenizer("Hello world")
    assert real_tokens(x) == ids
    assert y[0, : len(ids) - 1].tolist() == ids[1:]


def test_pairs_weight_only_the_response(preprocessor, tiny_tokenizer):
    x, y, weights = preprocessor({"prompts": ["2 + 2 =", "Say hi"], "responses": [" 4", " hi"]})
    prompt, response = tiny_tokenizer("2 + 2 ="), tiny_tokenizer(" 4")
    packed = [2] + prompt + response + [1]
    assert real_tokens({k: v[:1] for k, v in x.items()}) == packed
    labels = y[0, : len(packed) - 1].tolist()
    assert labels == packed[1:]
    # Label position t predicts token t + 1: trained iff that is a response
    # token or the eos.
    expected = [0.0] * len(prompt) + [1.0] * (len(response) + 1)
    assert weights[0, : len(packed) - 1].tolist() == expected
    assert weights[0, len(packed) - 1 :].sum() == 0
    # The same through y=.
    x2, _, w2 = preprocessor(["2 + 2 =", "Say hi"], [" 4", " hi"])
    np.testing.assert_array_equal(x2["token_ids"], x["token_ids"])
    np.testing.assert_array_equal(w2, weights)


def test_conversation_weights_token_by_token(preprocessor, tiny_tokenizer):
    layer = GemmaCausalLMPreprocessor(tiny_tokenizer, sequence_length=64)
    x, y, weights = layer(CONVERSATION)
    t = tiny_tokenizer
    sot, eot, nl = t.start_of_turn_id, t.end_of_turn_id, t("\n")

    def seg(text, trained):
        ids = t(text) if isinstance(text, str) else text
        return [(i, trained) for i in ids]

    expected = (
        seg([2], False)
        + seg([sot], False) + seg("user\nHello", False) + seg([eot], False) + seg(nl, False)
        + seg([sot], False) + seg("model\n", False) + seg("Hi there", True) + seg([eot], True)
        + seg(nl, False)
        + seg([sot], False) + seg("user\nAdd 1 and 2", False) + seg([eot], False) + seg(nl, False)
        + seg([sot], False) + seg("model\n", False) + seg("3", True) + seg([eot], True)
        + seg(nl, False)
    )
    tokens = [i for i, _ in expected]
    n = len(tokens)
    assert x["token_ids"].tolist()[: n - 1] == tokens[:-1]
    assert y.tolist()[: n - 1] == tokens[1:]
    # Weight of label t is whether token t + 1 is trained.
    assert weights.tolist()[: n - 1] == [float(trained) for _, trained in expected[1:]]
    assert weights[n - 1 :].sum() == 0
    # Exactly the two model texts and their <end_of_turn> are trained.
    trained = y[weights > 0].tolist()
    assert trained == t("Hi there") + [eot] + t("3") + [eot]


@pytest.mark.parametrize("vocabulary", ["tiny", "gemma3"])
def test_conversation_ids_equal_whole_chat_text(vocabulary, tiny_tokenizer, gemma3_tokenizer):
    tokenizer = tiny_tokenizer if vocabulary == "tiny" else gemma3_tokenizer
    layer = GemmaCausalLMPreprocessor(tokenizer, sequence_length=96)
    conversations = [
        CONVERSATION,
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": " Hi\n"},
         {"role": "assistant", "content": "\n\nYo  \t"}],
        [{"role": "user", "content": "code:"},
         {"role": "model", "content": "def f():\n\treturn 1\n"}],
    ]
    x, _, _ = layer(conversations)
    for row, conversation in enumerate(conversations):
        text = apply_chat_template(conversation, add_generation_prompt=False)
        assert real_tokens({k: v[row : row + 1] for k, v in x.items()}) == tokenizer(text)[:96]


def test_truncation_keeps_the_start(tiny_tokenizer):
    layer = GemmaCausalLMPreprocessor(tiny_tokenizer, sequence_length=5)
    x, y, weights = layer(["one two three four five six seven"])
    ids = [2] + tiny_tokenizer("one two three four five six seven")
    assert x["token_ids"][0].tolist() == ids[:5]
    assert y[0].tolist() == ids[1:6]
    assert weights[0].tolist() == [1.0] * 5  # the eos was cut off


def test_truncated_pair_without_response_is_dropped(tiny_tokenizer):
    layer = GemmaCausalLMPreprocessor(tiny_tokenizer, sequence_length=8)
    long_prompt = "a long prompt " * 10
    with pytest.warns(DroppedSampleWarning, match=r"indices \[1\]"):
        x, y, weights = layer({"prompts": ["short", long_prompt, "ok"], "responses": ["yes", "no", "!"]})
    assert layer.dropped_samples == [1]
    assert x["token_ids"].shape == (2, 8) and (weights.sum(axis=1) > 0).all()
    # A prompt that leaves room for part of the response keeps that part.
    prompt = tiny_tokenizer("abc de")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, _, weights = layer({"prompts": ["abc de"], "responses": ["a long response " * 5]})
    assert weights.sum() == 8 - len(prompt)
    assert layer.num_dropped_samples == 1
    with pytest.raises(ValueError, match="No sample has a trained token"):
        layer({"prompts": [long_prompt], "responses": ["no"]})
    assert layer.num_dropped_samples == 2


def test_conversation_cut_before_model_turn_is_dropped(tiny_tokenizer):
    layer = GemmaCausalLMPreprocessor(tiny_tokenizer, sequence_length=24)
    long_user = [{"role": "user", "content": "word " * 30}, {"role": "model", "content": "ok"}]
    ends_with_user = [{"role": "user", "content": "hi"}]
    with pytest.warns(DroppedSampleWarning, match=r"indices \[0, 2\]"):
        x, _, _ = layer([long_user, CONVERSATION[:2], ends_with_user])
    assert x["token_ids"].shape[0] == 1


def test_bad_conversation_names_sample_and_message(preprocessor):
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ValueError, match="Conversation 1: Message 1"):
        preprocessor([CONVERSATION, bad])


def test_bad_inputs(preprocessor):
    with pytest.raises(ValueError, match="responses"):
        preprocessor({"prompts": ["a"]})
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        preprocessor({"prompts": ["a", "b"], "responses": ["c"]})
    with pytest.raises(ValueError, match="empty"):
        preprocessor([])
    with pytest.raises(ValueError, match="sample_weight"):
        preprocessor(["a"], sample_weight=np.ones(1))


def test_generate_preprocess_and_postprocess(tiny_tokenizer):
    layer = GemmaCausalLMPreprocessor(tiny_tokenizer, sequence_length=32)
    out = layer.generate_preprocess(["Hello world", "Hi"], sequence_length=12)
    ids = [2] + tiny_tokenizer("Hello world")
    assert out["token_ids"].shape == (2, 12) and out["padding_mask"].dtype == np.bool_
    assert real_tokens({k: v[:1] for k, v in out.items()}) == ids  # bos + prompt, no eos
    assert layer.generate_preprocess("Hi")["token_ids"].shape == (32,)

    conversation = CONVERSATION[:3]
    chat = layer.generate_preprocess([conversation], sequence_length=64)
    text = apply_chat_template(conversation, add_generation_prompt=True)
    assert real_tokens(chat) == tiny_tokenizer(text)
    assert text.endswith("<start_of_turn>model\n")

    # Postprocess drops pad, bos, eos and end_of_turn.
    generated = np.array([[2] + tiny_tokenizer("Hi") + tiny_tokenizer(" there")
                          + [tiny_tokenizer.end_of_turn_id, 1, 0, 0]])
    mask = generated != 0
    assert layer.generate_postprocess({"token_ids": generated, "padding_mask": mask}) == ["Hi there"]
    assert layer.generate_postprocess(generated[0]) == "Hi there"
    assert layer.generate_postprocess(keras.ops.convert_to_tensor(generated)) == ["Hi there"]
    with pytest.raises(ValueError, match="Prompt 0 has"):
        layer.generate_preprocess(["word " * 40], sequence_length=8)


def test_chat_template_on_preprocessor(preprocessor):
    assert preprocessor.apply_chat_template(CONVERSATION) == apply_chat_template(CONVERSATION)


def test_config_round_trip(preprocessor, tmp_path):
    config = keras.saving.serialize_keras_object(preprocessor)
    restored = keras.saving.deserialize_keras_object(config)
    assert restored.sequence_length == 24
    restored.tokenizer.load_assets(_saved_assets(preprocessor, tmp_path))
    for a, b in zip(keras.tree.flatten(restored(CONVERSATION)), keras.tree.flatten(preprocessor(CONVERSATION))):
        np.testing.assert_array_equal(a, b)


def _saved_assets(preprocessor, path):
    preprocessor.tokenizer.save_assets(str(path))
    return str(path)


# -- fit ------------------------------------------------------------------------


class TinyLM(keras.Model):
    """Embedding + Dense: {"token_ids", "padding_mask"} -> (B, L, vocab) logits."""

    def __init__(self, vocabulary_size, **kwargs):
        super().__init__(**kwargs)
        self.embedding = keras.layers.Embedding(vocabulary_size, 8)
        self.head = keras.layers.Dense(vocabulary_size)

    def call(self, inputs):
        mask = keras.ops.cast(inputs["padding_mask"], "float32")[..., None]
        return self.head(self.embedding(inputs["token_ids"]) * mask)


def fit(tokenizer, data):
    model = TinyLM(tokenizer.vocabulary_size())
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(**data, epochs=2, verbose=0)
    losses = history.history["loss"]
    assert np.isfinite(losses).all()
    return losses


class RawBatches(keras.utils.PyDataset):
    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, index):
        return self.batches[index]


TEXTS = ["the quick brown fox", "jumps over the lazy dog", "hello world", "12345 and 678"]


@pytest.mark.parametrize(
    "make",
    [
        lambda: dict(x=TEXTS),
        lambda: dict(x=np.array(TEXTS)),
        lambda: dict(x={"prompts": TEXTS[:2], "responses": TEXTS[2:]}),
        lambda: dict(x=TEXTS[:2], y=TEXTS[2:]),
        lambda: dict(x=[CONVERSATION, CONVERSATION[:2]]),
    ],
    ids=["list", "numpy", "pairs", "x_y", "conversations"],
)
def test_fit_in_memory(make, tiny_tokenizer):
    layer = GemmaCausalLMPreprocessor(tiny_tokenizer, sequence_length=32)
    data = to_fit_data(layer, batch_size=2, **make())
    assert isinstance(data["x"]["token_ids"], np.ndarray)
    fit(tiny_tokenizer, data)


def test_fit_py_dataset(tiny_tokenizer):
    layer = GemmaCausalLMPreprocessor(tiny_tokenizer, sequence_length=32)
    source = RawBatches([TEXTS[:2], (TEXTS[2:], ["a", "b"]), [CONVERSATION]])
    data = to_fit_data(layer, source)
    assert isinstance(data["x"], PreprocessedPyDataset) and len(data["x"]) == 3
    losses = fit(tiny_tokenizer, data)
    assert losses[-1] < losses[0]


@pytest.mark.skipif(keras.config.backend() != "tensorflow", reason="tf.data runs under the TensorFlow backend")
def test_fit_tf_data(tiny_tokenizer):
    import tensorflow as tf

    layer = GemmaCausalLMPreprocessor(tiny_tokenizer, sequence_length=32)
    unbatched = tf.data.Dataset.from_tensor_slices(TEXTS)
    fit(tiny_tokenizer, to_fit_data(layer, unbatched, batch_size=2))
    pairs = tf.data.Dataset.from_tensor_slices({"prompts": TEXTS[:2], "responses": TEXTS[2:]}).batch(2)
    data = to_fit_data(layer, pairs)
    x, y, weights = next(iter(data["x"]))
    expected = layer({"prompts": TEXTS[:2], "responses": TEXTS[2:]})
    np.testing.assert_array_equal(x["token_ids"].numpy(), expected[0]["token_ids"])
    np.testing.assert_array_equal(weights.numpy(), expected[2])
    fit(tiny_tokenizer, data)
