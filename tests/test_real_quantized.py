"""int8 and int4 on the real Gemma 3 270M (issue 6): parameter memory, top-1
agreement with float32 over ~300 tokens of English, a coherent greedy
continuation, and the quantized preset round trip.

The session's float model (`real_270m`) is shared with other tests, so it is
never quantized: each mode quantizes a float copy built from its
`weight_map()`, one copy alive at a time (about 1 GB). Thresholds: measured
values (benchmarks/quantize.py --real; see README) minus a margin.
"""

import numpy as np
import pytest

import keras
import keras_gemma
from conftest import to_numpy
from keras_gemma.quantization import parameter_bytes
from real_model import AGREEMENT_TEXT, GREEDY_PROMPT, real_270m, real_gguf_path  # noqa: F401

pytestmark = pytest.mark.large
GREEDY_STEPS = 6
# mode -> (parameter memory / float32 range, minimum top-1 agreement).
# Measured (JAX): int8 0.252 of float32, agreement 0.948; int4 (groups of
# 128) 0.135, agreement 0.615 over 270 predictions.
EXPECTED = {"int8": ((0.25, 0.26), 0.92), "int4": ((0.125, 0.145), 0.55)}
# The base 270M continues "The capital of France is" with " the capital of
# the country of France. It is the largest" (no "Paris" within 12 tokens), so
# int8 is held to float32's own greedy tokens and int4 to staying on topic
# (measured: " the largest country in Europe. The country is").
ON_TOPIC = ("Paris", "France", "capital", "country")


def text_inputs(tokenizer):
    ids = np.array([[tokenizer.bos_token_id] + tokenizer(AGREEMENT_TEXT)], "int32")
    return {"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}


def next_token_predictions(model, inputs):
    return to_numpy(keras.ops.argmax(model(inputs)[0, :-1], axis=-1))


def greedy(model, prompt_ids, steps):
    """Greedy continuation by the definition (one full forward per token, no
    cache), right-padded to one length so JAX compiles each op once."""
    length = len(prompt_ids) + steps
    ids = np.zeros((1, length), "int32")
    ids[0, : len(prompt_ids)] = prompt_ids
    for n in range(len(prompt_ids), length):
        mask = np.arange(length)[None] < n
        logits = model({"token_ids": ids, "padding_mask": mask})
        ids[0, n] = int(to_numpy(logits[0, n - 1]).argmax())
    return ids[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module")
def float_reference(real_270m):
    inputs = text_inputs(real_270m.tokenizer)
    assert inputs["token_ids"].shape[1] > 250
    tokenizer = real_270m.tokenizer
    return {
        "inputs": inputs,
        "predictions": next_token_predictions(real_270m.model, inputs),
        "bytes": parameter_bytes(real_270m.model),
        "prompt": [tokenizer.bos_token_id] + tokenizer(GREEDY_PROMPT),
        "greedy": greedy(real_270m.model, [tokenizer.bos_token_id] + tokenizer(GREEDY_PROMPT), GREEDY_STEPS),
    }


def quantized_copy(source, mode):
    """A quantized copy of the session's float model (which stays float)."""
    backbone = keras_gemma.GemmaBackbone(source.config)
    weights = source.backbone.weight_map()
    for name, variable in backbone.weight_map().items():
        variable.assign(weights[name])
    model = keras_gemma.GemmaCausalLM(backbone, preprocessor=source.preprocessor)
    model.quantize(mode)
    return model


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized(request, real_270m):
    yield request.param, quantized_copy(real_270m.model, request.param)
    assert real_270m.model.backbone.quantization is None


def test_real_quantized_memory_agreement_and_greedy(quantized, float_reference, real_270m):
    mode, model = quantized
    (low, high), min_agreement = EXPECTED[mode]
    ratio = parameter_bytes(model) / float_reference["bytes"]
    agreement = float(np.mean(next_token_predictions(model, float_reference["inputs"]) == float_reference["predictions"]))
    tokens = greedy(model, float_reference["prompt"], GREEDY_STEPS)
    text = real_270m.tokenizer.detokenize(tokens)
    print(
        f"{mode}: parameter memory {ratio:.3f} of float32, top-1 agreement {agreement:.3f}, "
        f"greedy {text!r} (float32: {real_270m.tokenizer.detokenize(float_reference['greedy'])!r})"
    )
    assert low <= ratio < high
    assert agreement >= min_agreement
    if mode == "int8":
        assert tokens == float_reference["greedy"]
    else:
        assert any(word in text for word in ON_TOPIC), text


def test_real_int8_preset_round_trip(float_reference, real_270m, tmp_path):
    """An int8 real model saved and loaded back: the same logits at every
    position (int4 round trips are covered on tiny models, test_quantized_presets)."""
    model = quantized_copy(real_270m.model, "int8")
    with pytest.warns(UserWarning, match="keras-hub and transformers cannot"):
        model.save_to_preset(tmp_path / "int8")
    restored = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path / "int8"))
    ids = np.array([float_reference["prompt"] + float_reference["greedy"]], "int32")
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}
    np.testing.assert_array_equal(to_numpy(restored(inputs)), to_numpy(model(inputs)))
