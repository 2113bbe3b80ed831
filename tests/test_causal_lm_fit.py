"""`GemmaCausalLM.fit` on raw text: the preprocessor runs inside fit."""

import numpy as np

import keras
import keras_gemma
from keras_gemma.preprocessor import GemmaCausalLMPreprocessor
from tokenizer_fixtures import tiny_tokenizer  # noqa: F401 (fixture)


def tiny_lm(tokenizer, sequence_length=24):
    config = keras_gemma.GemmaConfig(
        vocabulary_size=tokenizer.vocabulary_size(), num_layers=2, hidden_dim=32,
        num_query_heads=2, num_key_value_heads=1, head_dim=16, intermediate_dim=64,
        layer_types=("local", "global"), sliding_window_size=8, use_post_norms=True, use_qk_norm=True,
    )
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=sequence_length)
    model = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(config), preprocessor=preprocessor)
    model.compile(optimizer=keras.optimizers.Adam(3e-2))
    return model


def test_fit_on_strings_pairs_and_conversations(tiny_tokenizer):
    model = tiny_lm(tiny_tokenizer)
    strings = ["the cat sat on the mat", "a dog ran in the park"] * 4
    history = model.fit(strings, batch_size=4, epochs=6, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.6 * losses[0]

    pairs = {"prompts": ["2 + 2 =", "3 + 3 ="] * 2, "responses": [" 4", " 6"] * 2}
    history = model.fit(pairs, batch_size=2, epochs=2, validation_data=pairs, verbose=0)
    assert np.isfinite(history.history["val_loss"]).all()

    conversations = [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}],
        [{"role": "user", "content": "bye"}, {"role": "model", "content": "see you"}],
    ]
    history = model.fit(conversations, batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


def test_fit_on_token_ids_passes_through(tiny_tokenizer):
    model = tiny_lm(tiny_tokenizer)
    x, y, w = model.preprocessor(["the cat sat on the mat"] * 2)
    history = model.fit(x, y, sample_weight=w, batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
