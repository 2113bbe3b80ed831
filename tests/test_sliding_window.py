"""A sliding window chosen at load time (`from_preset(...,
sliding_window_size=)`, `set_sliding_window`): the Gemma 2 report's
inference-time lever, against transformers with the same override."""

import numpy as np
import pytest
from conftest import to_numpy
from hf_reference import build_hf, gemma1_config, gemma2_config, gemma3_config, hf_logits, ours_from_hf, padded_batch

import keras_gemma
import test_generation

# Rows of 24 tokens: windows of 4 (the configs'), 7 and 9 all bite.
SEQ_LEN = 24


@pytest.mark.parametrize("make_config", [gemma2_config, gemma3_config], ids=["gemma2", "gemma3"])
def test_a_new_window_equals_transformers_with_it(make_config):
    """Logits with the window set to 7 on a model built with 4 equal
    transformers' with `sliding_window=7` on the same weights; the window
    moves them."""
    ids, mask = padded_batch(SEQ_LEN)
    ours = ours_from_hf(build_hf(make_config(), seed=3))
    before = to_numpy(ours({"token_ids": ids, "padding_mask": mask}))
    ours.set_sliding_window(7)
    assert ours.backbone.config.sliding_window_size == 7
    actual = to_numpy(ours({"token_ids": ids, "padding_mask": mask}))
    expected = hf_logits(build_hf(make_config(sliding_window=7), seed=3), ids, mask)
    np.testing.assert_allclose(actual[mask], expected[mask], atol=1e-4, rtol=1e-4)
    assert np.abs(actual[mask] - before[mask]).max() > 1e-2


def test_from_preset_takes_a_window_and_generation_follows_it(tmp_path):
    """`from_preset(..., sliding_window_size=)` gives the model that
    `set_sliding_window` does; cached greedy decoding, compiled before and
    after the change, equals uncached forward passes at each window (the
    ring caches are resized)."""
    lm = test_generation._hf_lm("gemma3")
    lm.backbone.export_to_transformers(tmp_path)
    loaded = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path), sliding_window_size=9)
    assert loaded.backbone.config.sliding_window_size == 9
    test_generation._check_greedy_equals_full_forward(lm, new_tokens=12)
    lm.set_sliding_window(9)
    ids, mask = padded_batch(SEQ_LEN)
    np.testing.assert_allclose(
        to_numpy(loaded({"token_ids": ids, "padding_mask": mask})),
        to_numpy(lm({"token_ids": ids, "padding_mask": mask})), atol=1e-5, rtol=1e-5,
    )
    test_generation._check_greedy_equals_full_forward(lm, new_tokens=12)
    assert lm._functions().config.sliding_window_size == 9


def test_bad_windows_are_refused():
    lm = test_generation._hf_lm("gemma3")
    for size in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            lm.set_sliding_window(size)
    assert lm.backbone.config.sliding_window_size == 4  # nothing changed
    gemma1 = ours_from_hf(build_hf(gemma1_config()))
    with pytest.raises(ValueError, match="no sliding-window layers"):
        gemma1.set_sliding_window(8)
