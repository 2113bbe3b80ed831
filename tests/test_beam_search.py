"""Beam search (`samplers.BeamSampler`) against transformers' beam search on
the same weights, and against a brute-force search over uncached forward
passes where stop tokens finish beams.

Tiny HF-matched models (`hf_reference`, sliding window 4: prompts and
continuations run past it), ragged batches padded on both sides.
"""

import numpy as np
import pytest
import torch

import hf_reference
import keras_gemma
from conftest import to_numpy
from keras_gemma.generation import samplers

BEAMS = 4
NEW = 8


@pytest.fixture(scope="module", params=["gemma3", "gemma2"])
def models(request):
    config = getattr(hf_reference, f"{request.param}_config")()
    hf_model = hf_reference.build_hf(config, scale=0.1)
    return hf_model, hf_reference.ours_from_hf(hf_model)


def prompts(lengths=(3, 11, 7), seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(4, hf_reference.VOCAB, n).tolist() for n in lengths]


def padded(rows):
    """Rows 0 and 2 right-padded, row 1 left-padded (`generate` takes either)."""
    width = max(len(row) for row in rows) + 2
    ids, mask = np.zeros((len(rows), width), np.int32), np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        start = width - len(row) if i == 1 else 0
        ids[i, start : start + len(row)], mask[i, start : start + len(row)] = row, True
    return {"token_ids": ids, "padding_mask": mask}


def generated(lm, rows, **kwargs):
    out = lm.generate(padded(rows), strip_prompt=True, **kwargs)
    return [row[keep].tolist() for row, keep in zip(out["token_ids"], out["padding_mask"])]


def test_beam_search_equals_transformers(models):
    hf_model, ours = models
    rows = prompts()
    ours.compile(sampler=samplers.BeamSampler(num_beams=BEAMS))
    beams = generated(ours, rows, max_new_tokens=NEW, stop_token_ids=None)
    for row, actual in zip(rows, beams):
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([row]), attention_mask=torch.ones(1, len(row), dtype=torch.long), do_sample=False,
                num_beams=BEAMS, max_new_tokens=NEW, min_new_tokens=NEW, length_penalty=0.0, eos_token_id=None,
                pad_token_id=0,
            )
        assert actual == out[0, len(row):].tolist()
    ours.compile(sampler="greedy")
    greedy = generated(ours, rows, max_new_tokens=NEW, stop_token_ids=None)
    assert beams != greedy  # the search mattered


def log_softmax(logits):
    logits = logits.astype(np.float64)
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def brute_force_beams(lm, row, beams, new, stop_ids):
    """Beam search as `BeamSampler` defines it, each candidate scored by an
    uncached forward pass: a beam that emits a stop token (or fills its
    budget) keeps its score and competes to the end."""
    live = [([], 0.0, False)]
    for step in range(new):
        candidates = [beam for beam in live if beam[2]]
        going = [beam for beam in live if not beam[2]]
        if going:  # one pass for the unfinished beams, one shape for every pass
            ids = np.zeros((beams, len(row) + new), np.int32)
            ids[: len(going), : len(row) + step] = [row + tokens for tokens, _, _ in going]
            mask = np.arange(ids.shape[1]) < len(row) + step
            mask = np.broadcast_to(mask, ids.shape)
            logits = to_numpy(lm({"token_ids": ids, "padding_mask": mask}))[:, len(row) + step - 1]
            for (tokens, score, _), row_logits in zip(going, logits):
                for token, log_prob in enumerate(log_softmax(row_logits)):
                    finished = token in stop_ids or step + 1 == new
                    candidates.append((tokens + [token], score + log_prob, finished))
        live = sorted(candidates, key=lambda c: -c[1])[:beams]
    return live[0][0]


def test_stop_tokens_finish_beams_as_a_brute_force_search_does(models):
    _, ours = models
    rows = prompts()
    ours.compile(sampler=samplers.BeamSampler(num_beams=3))
    free = generated(ours, rows, max_new_tokens=6, stop_token_ids=None)
    # Row 0's second likeliest first token, which its best beam does not
    # start with: a beam that stops on it at once keeps a high score.
    first = to_numpy(ours({"token_ids": np.array([rows[0]], np.int32)}))[0, -1]
    stop = next(int(t) for t in np.argsort(-first) if int(t) != free[0][0])
    actual = generated(ours, rows, max_new_tokens=6, stop_token_ids=[stop])
    for row, tokens in zip(rows, actual):
        assert tokens == brute_force_beams(ours, row, 3, 6, {stop})
    assert actual[0] == [stop] and actual != free  # a finished beam won
    ours.compile(sampler="greedy")


def test_beam_sampler_names_and_limits(models):
    _, ours = models
    ours.compile(sampler="beam")
    assert isinstance(ours.sampler, samplers.BeamSampler) and ours.sampler.num_beams == 5
    # One beam is greedy search.
    ours.compile(sampler=samplers.BeamSampler(num_beams=1))
    rows = prompts()
    one = generated(ours, rows, max_new_tokens=5, stop_token_ids=None)
    ours.compile(sampler="greedy")
    assert one == generated(ours, rows, max_new_tokens=5, stop_token_ids=None)
    ours.compile(sampler=samplers.BeamSampler(num_beams=2))
    with pytest.raises(ValueError, match="cannot stream"):
        list(ours.stream_token_ids(padded(rows), max_new_tokens=3))
    with pytest.raises(ValueError, match="num_beams"):
        samplers.BeamSampler(num_beams=0)
    ours.compile(sampler="greedy")


def test_keras_hub_beam_sampler_stands_in():
    keras_hub = pytest.importorskip("keras_hub")
    sampler = samplers.get(keras_hub.samplers.BeamSampler(num_beams=3))
    assert isinstance(sampler, samplers.BeamSampler) and sampler.num_beams == 3
    with pytest.raises(ValueError, match="return_all_beams"):
        samplers.get(keras_hub.samplers.BeamSampler(num_beams=3, return_all_beams=True))
    assert keras_gemma.samplers.get({"class_name": "beam", "config": {"num_beams": 2}}).num_beams == 2
