"""Beam search (`samplers.BeamSampler`) against transformers' beam search on
the same weights: with and without stop tokens, with length penalties.

Tiny HF-matched models (`hf_reference`, sliding window 4: prompts and
continuations run past it), ragged batches padded on both sides.
"""

import numpy as np
import pytest
import torch

import hf_reference
import keras_gemma
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


def hf_beams(hf_model, row, stops, length_penalty, new=NEW):
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([row]), attention_mask=torch.ones(1, len(row), dtype=torch.long), do_sample=False,
            num_beams=BEAMS, max_new_tokens=new, length_penalty=length_penalty, eos_token_id=stops or None,
            pad_token_id=0,
        )
    tokens = out[0, len(row):].tolist()
    if stops:  # cut after the first stop token, as `generate` returns it
        ends = [j for j, t in enumerate(tokens) if t in stops]
        tokens = tokens[: ends[0] + 1] if ends else tokens
    return tokens


def test_beam_search_equals_transformers(models):
    hf_model, ours = models
    rows = prompts()
    ours.compile(sampler=samplers.BeamSampler(num_beams=BEAMS, length_penalty=0.0))
    free = generated(ours, rows, max_new_tokens=NEW, stop_token_ids=None)
    # Stop tokens that the searches meet: finished beams then compete with
    # running ones, by length-penalised scores.
    cases = [(1.0, []), (0.0, []), (1.0, [free[0][1]]), (0.0, [free[0][1]]), (2.0, [free[1][3], free[2][2]])]
    stopped_early = False
    for length_penalty, stops in cases:
        ours.compile(sampler=samplers.BeamSampler(num_beams=BEAMS, length_penalty=length_penalty))
        beams = generated(ours, rows, max_new_tokens=NEW, stop_token_ids=stops or None)
        for row, actual in zip(rows, beams):
            assert actual == hf_beams(hf_model, row, stops, length_penalty), (length_penalty, stops)
            stopped_early |= len(actual) < NEW
    assert stopped_early  # some finished beam won before the budget
    ours.compile(sampler="greedy")
    greedy = generated(ours, rows, max_new_tokens=NEW, stop_token_ids=None)
    assert free != greedy  # the search mattered


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
