"""`GemmaCausalLM.classify`: ShieldGemma's yes/no probability.

The reference is the model card's own computation, prompt by prompt, on
transformers' `Gemma2ForCausalLM` with the same weights and SentencePiece
itself for the ids: `softmax(logits[0, -1, [vocab[yes], vocab[no]]])`. The
tiny Gemma 2 has a final soft-cap that bites, and the prompts have
different lengths, so batching pads them.
"""

import numpy as np
import pytest
import torch

import keras_gemma
from hf_reference import build_hf, gemma2_config, ours_from_hf
from tokenizer_fixtures import _tiny_spm, tiny_tokenizer  # noqa: F401 (fixture)

TOLERANCE = 1e-5

# ShieldGemma's prompt shape (model card), shortened.
PROMPTS = [
    "You are a policy expert.\n\n<start_of_turn>\nHuman Question: Hello world<end_of_turn>\n\n"
    "Does the human question violate the policy? Your answer must start with 'Yes' or 'No'.",
    "Hello",
    "<start_of_turn>user\nThe quick brown fox<end_of_turn>\n<start_of_turn>model\n",
]
LABELS = ("user", "Hello")  # one piece each in the tiny vocabulary


@pytest.fixture(scope="module")
def sp():
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(_tiny_spm("user_defined")))


@pytest.fixture(scope="module")
def models(tiny_tokenizer):  # noqa: F811
    hf_model = build_hf(gemma2_config(vocab_size=tiny_tokenizer.vocabulary_size()), seed=5)
    ours = ours_from_hf(hf_model)
    ours.preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tiny_tokenizer)
    return hf_model, ours


def model_card_probabilities(hf_model, sp, prompt, labels):
    """ShieldGemma's model card, with SentencePiece's ids and `<bos>` first."""
    ids = torch.tensor([[2] + sp.encode(prompt)])
    with torch.no_grad():
        logits = hf_model(input_ids=ids).logits
    selected = logits[0, -1, [sp.piece_to_id(label) for label in labels]]
    return torch.softmax(selected, dim=0).numpy()


def test_matches_the_model_card_computation(models, sp):
    hf_model, ours = models
    assert ours.config.final_logit_softcap is not None
    for label in LABELS:
        assert ours.preprocessor.tokenizer.tokenize(label) == [sp.piece_to_id(label)]
    expected = np.stack([model_card_probabilities(hf_model, sp, p, LABELS) for p in PROMPTS])
    actual = ours.classify(PROMPTS, labels=LABELS)  # batched: three lengths
    assert actual.shape == (3, 2) and actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, atol=TOLERANCE, rtol=TOLERANCE)
    np.testing.assert_allclose(actual.sum(axis=-1), 1.0, atol=1e-6)
    assert np.ptp(actual[:, 0]) > 1e-3  # the prompts give different answers
    # One prompt: no batch axis, the same numbers as in the batch.
    np.testing.assert_allclose(ours.classify(PROMPTS[1], labels=LABELS), expected[1], atol=TOLERANCE, rtol=TOLERANCE)
    # Token ids as labels, and three labels.
    ids = tuple(sp.piece_to_id(label) for label in LABELS)
    np.testing.assert_allclose(ours.classify(PROMPTS, labels=ids), expected, atol=TOLERANCE, rtol=TOLERANCE)
    three = LABELS + ("a",)
    np.testing.assert_allclose(
        ours.classify(PROMPTS, labels=three),
        np.stack([model_card_probabilities(hf_model, sp, p, three) for p in PROMPTS]),
        atol=TOLERANCE, rtol=TOLERANCE,
    )


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_token_ids_use_each_rows_last_real_token(models, sp, side):
    hf_model, ours = models
    rows = [[2] + sp.encode(p) for p in PROMPTS]
    width = max(len(r) for r in rows) + 2
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        where = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[i, where], mask[i, where] = row, True
    expected = np.stack([model_card_probabilities(hf_model, sp, p, LABELS) for p in PROMPTS])
    actual = ours.classify({"token_ids": ids, "padding_mask": mask}, labels=LABELS)
    np.testing.assert_allclose(actual, expected, atol=TOLERANCE, rtol=TOLERANCE)


def test_labels_must_be_single_tokens(models):
    _, ours = models
    assert len(ours.preprocessor.tokenizer.tokenize("Yes")) == 2  # in the tiny vocabulary
    with pytest.raises(ValueError, match=r"Label 'Yes' is 2 tokens .*not one"):
        ours.classify(PROMPTS, labels=("Yes", "user"))
    with pytest.raises(ValueError, match="two or more labels"):
        ours.classify(PROMPTS, labels=("user",))
    with pytest.raises(ValueError, match="two or more labels"):
        ours.classify(PROMPTS, labels="Yes")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.classify(PROMPTS, labels=(1, 10_000))
    with pytest.raises(TypeError, match="text or a token id"):
        ours.classify(PROMPTS, labels=(1.5, 2))
