"""Generation: the cached decode loop against full forward passes, ragged
batches, stop tokens, text and chat in/out, streaming, scoring, bad input.

Tiny models only: the HF-matched Gemma 2 and Gemma 3 configs from
`hf_reference` (sliding window 4, so 40-token sequences wrap the ring cache
many times), and a tiny random model over a tiny SentencePiece vocabulary
for text.
"""

import ast
import inspect
import re
import warnings

import hf_reference
import keras
import numpy as np
import pytest
from conftest import ScriptedSampler, backend, to_numpy
from tokenizer_fixtures import _tiny_spm

import keras_gemma
from keras_gemma.backends import cpu
from keras_gemma.generation import compile as compile_module
from keras_gemma.generation import engine, samplers
from keras_gemma.generation import prompts as prompts_lib
from keras_gemma.layers import soft_cap
from keras_gemma.preprocessor import GemmaCausalLMPreprocessor
from keras_gemma.tokenizer import GemmaTokenizer

NEW_TOKENS = 30


# Small weights: with large ones the tied head echoes one token forever,
# which would make "same tokens" a weak check.
WEIGHT_SCALE = {"gemma3": 0.05, "gemma2": 0.02}


def _hf_lm(name):
    config = getattr(hf_reference, f"{name}_config")()
    return hf_reference.ours_from_hf(hf_reference.build_hf(config, scale=WEIGHT_SCALE[name]))


@pytest.fixture(scope="module", params=["gemma3", "gemma2"])
def hf_lm(request):
    return _hf_lm(request.param)


@pytest.fixture(scope="module")
def gemma3_lm():
    return _hf_lm("gemma3")


def _ragged_prompts(lengths=(3, 11, 7), seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(4, hf_reference.VOCAB, n).tolist() for n in lengths]


def _right_padded(prompts, width=None):
    width = width or max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        ids[i, : len(p)], mask[i, : len(p)] = p, True
    return {"token_ids": ids, "padding_mask": mask}


def _greedy_choices_without_cache(lm, sequence):
    """What greedy decoding without a cache picks after each prefix.

    One uncached forward pass over the whole row: by causality its logits at
    position j are those of a forward pass over `sequence[: j + 1]`, so if
    every pick below matches the row, repeated full forward passes from the
    prompt reproduce the row exactly (by induction over the steps).
    """
    logits = to_numpy(lm({"token_ids": np.array([sequence], np.int32)}))[0]  # (t, vocab)
    return logits.argmax(-1).tolist()


def _rows(output):
    return [ids[mask].tolist() for ids, mask in zip(output["token_ids"], output["padding_mask"])]


# -- exactness -----------------------------------------------------------------


def test_greedy_with_cache_equals_full_forward(hf_lm):
    """A ragged batch (left-padded inside) decodes each row exactly as
    repeated uncached forward passes over that row alone do, well past the
    sliding window (4) and through several ring-buffer wraps."""
    _check_greedy_equals_full_forward(hf_lm)


# Ragged prompts padded to 192 columns: chunks of 128 and 64 columns.
CHUNKED_LENGTHS = (150, 97, 181)


@pytest.mark.parametrize("traced", [False, True], ids=["first-calls", "traced"])
def test_chunked_prompt_equals_full_forward(hf_lm, traced, monkeypatch):
    """A prompt wider than a power of two runs as chunks, each attending to
    the cache so far; the sliding window (4) is far shorter than a chunk.
    PyTorch traces a chunk's shape only from its third call on."""
    if traced:
        monkeypatch.setattr(compile_module, "TRACE_CHUNK_AFTER", 0)
        hf_lm.compile(sampler="greedy")  # fresh compiled functions
    assert prompts_lib.chunks(prompts_lib.bucket(max(CHUNKED_LENGTHS))) == [(0, 128), (128, 64)]
    _check_greedy_equals_full_forward(hf_lm, _ragged_prompts(CHUNKED_LENGTHS, seed=2), new_tokens=12)


def test_chunk_wrapping_the_ring_equals_full_forward():
    """Chunks that wrap a ring cache partway (window 100: the 64-column
    chunk at column 256 fills slots 56-99 then 0-19) and chunks longer than
    the ring, in a ragged batch and alone."""
    hf_config = hf_reference.gemma3_config(sliding_window=100, max_position_embeddings=512)
    lm = hf_reference.ours_from_hf(hf_reference.build_hf(hf_config, seed=1, scale=WEIGHT_SCALE["gemma3"]))
    assert prompts_lib.chunks(320) == [(0, 256), (256, 64)]
    _check_greedy_equals_full_forward(lm, _ragged_prompts((300, 270)), new_tokens=12)
    _check_greedy_equals_full_forward(lm, _ragged_prompts((300,), seed=2), new_tokens=12)


def test_cache_shorter_than_padded_prompt_and_new_tokens(hf_lm):
    """The cache holds real tokens and new ones, not the left padding: 65-
    and 40-token prompts padded to 128 columns, 30 new tokens, 128 slots.
    The global layer's writes wrap onto slots that held padding only."""
    prompts = _ragged_prompts((65, 40), seed=4)
    assert prompts_lib.bucket(65) == 128 and prompts_lib.bucket(65 + NEW_TOKENS, prompts_lib.COARSE_BUCKET) == 128
    _check_greedy_equals_full_forward(hf_lm, prompts)


@pytest.mark.skipif(backend() not in ("tensorflow", "torch"), reason="JAX has one prefill for every length")
def test_long_prompt_prefill_equals_full_forward(gemma3_lm, monkeypatch):
    """TensorFlow prefills long prompts in a graph without XLA, PyTorch
    eagerly; every prompt and chunk takes that path here."""
    monkeypatch.setattr(compile_module, "LONG_PREFILL", 0)
    monkeypatch.setattr(compile_module, "LONG_PREFILL_TORCH", 0)
    _check_greedy_equals_full_forward(gemma3_lm)
    _check_greedy_equals_full_forward(gemma3_lm, _ragged_prompts(CHUNKED_LENGTHS, seed=2), new_tokens=12)


@pytest.mark.skipif(backend() != "torch", reason="PyTorch's tracing")
def test_torch_traces_short_prefills_only(gemma3_lm, monkeypatch):
    """A prompt wider than `LONG_PREFILL_TORCH` is prefilled without a trace
    (which would hold every intermediate tensor, per new width); a short one
    is traced, and decode steps always are."""
    import torch

    traced, trace = [], torch.jit.trace

    def counting_trace(fn, example_inputs, **kwargs):
        # Traced on (weights, *tensors): a prompt chunk's start with token
        # ids, the first token's with a hidden state (b, d), a step's with
        # the state's first cache array.
        first = example_inputs[1]
        kind = "prefill" if first.dtype == torch.int32 else "first" if first.ndim == 2 else "step"
        traced.append(kind)
        return trace(fn, example_inputs, **kwargs)

    monkeypatch.setattr(torch.jit, "trace", counting_trace)
    monkeypatch.setattr(compile_module, "LONG_PREFILL_TORCH", 100)
    rows = 5  # a batch size no other test traces
    # Padded to 32 and 128 (caches of 64 and 256 slots): the prompt chunk
    # traced, then not; the first token and the step traced for each cache.
    for width, expected in ((20, ["prefill", "first", "step"]), (70, ["first", "step"])):
        traced.clear()
        prompts = _right_padded(_ragged_prompts([width] * rows, seed=width))
        gemma3_lm.generate(prompts, max_new_tokens=3, stop_token_ids=None)
        assert traced == expected, width


@pytest.mark.skipif(backend() != "torch", reason="PyTorch's compiled decode step")
def test_torch_compiled_decode_equals_full_forward(monkeypatch):
    """The decode step PyTorch compiles on a GPU (`_TorchCompiled`: an FX
    graph written in place, `torch.compile`, the rows checked every
    `HOST_CHECK_EVERY` steps), forced here on the CPU: cached greedy
    equals uncached forward passes, stop tokens end rows mid-way between
    checks as on the traced path, a second call reuses the compiled step."""
    monkeypatch.setenv("KERAS_GEMMA_TORCH_COMPILE", "1")
    lm = _hf_lm("gemma3")
    lm.compile(sampler="greedy")
    assert type(lm._functions().compiler) is compile_module._TorchCompiled
    _check_greedy_equals_full_forward(lm, new_tokens=12)
    inputs = _right_padded(_ragged_prompts())
    free = lm.generate(inputs, max_new_tokens=12, stop_token_ids=None, strip_prompt=True)["token_ids"]
    stop = int(free[1, 5])  # ends row 1 after 6 tokens (or sooner), between two host checks
    monkeypatch.setenv("KERAS_GEMMA_TORCH_COMPILE", "0")
    traced = _hf_lm("gemma3")
    traced.compile(sampler="greedy")
    assert type(traced._functions().compiler) is compile_module._Torch
    for stop_ids in (None, [stop]):
        compiled = lm.generate(inputs, max_new_tokens=12, stop_token_ids=stop_ids)
        expected = traced.generate(inputs, max_new_tokens=12, stop_token_ids=stop_ids)
        assert _rows(compiled) == _rows(expected)


@pytest.mark.skipif(backend() != "torch", reason="PyTorch's compiled decode step")
def test_torch_writes_donated_updates_in_place():
    """`_write_in_place`: a slice update of a donated input goes to the
    input itself (no copy of a cache per step); one of an input that is
    read again afterwards, or not donated, stays a copy."""
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx

    def update(cache, other, row):
        return (
            keras.ops.slice_update(cache, (0, 1), row),
            keras.ops.slice_update(other, (0, 1), row) + other,
        )

    cache, other, row = torch.zeros(2, 4), torch.zeros(2, 4), torch.ones(2, 1)
    graph = make_fx(update)(cache, other, row)
    compile_module._write_in_place(graph, donated=[0, 1])
    clones = [n for n in graph.graph.nodes if n.target is torch.ops.aten.clone.default]
    assert len(clones) == 1  # `other`'s: it is read again after its update
    new_cache, new_other = graph(cache, other, row)
    assert new_cache.data_ptr() == cache.data_ptr()
    np.testing.assert_array_equal(cache.numpy()[:, 1], 1.0)
    np.testing.assert_array_equal(other.numpy(), 0.0)
    np.testing.assert_array_equal(new_other.numpy()[:, 1], 1.0)


def test_greedy_batch_of_one_equals_full_forward(hf_lm):
    """One row: on JAX a batch-1 decode step finds its token through the
    head's int8 screen (`backends/cpu.py`), which the uncached forward
    pass does not."""
    _check_greedy_equals_full_forward(hf_lm, _ragged_prompts(lengths=(5,)))


def _check_greedy_equals_full_forward(lm, prompts=None, new_tokens=NEW_TOKENS):
    prompts = prompts or _ragged_prompts()
    output = lm.generate(_right_padded(prompts), max_new_tokens=new_tokens, stop_token_ids=None)
    got = _rows(output)
    for prompt, row in zip(prompts, got):
        assert len(row) == len(prompt) + new_tokens
        assert row[: len(prompt)] == prompt
        picks = _greedy_choices_without_cache(lm, row)
        assert row[len(prompt):] == picks[len(prompt) - 1 : -1]
    # Not a degenerate echo: the rows use several distinct tokens.
    assert all(len(set(row[len(p):])) >= 3 for p, row in zip(prompts, got)), got


def test_one_new_token_is_the_prefill_token(gemma3_lm, monkeypatch):
    """With one new token per row, the prefill's token is the answer: the
    decode loop is not called, and the token is the one a longer run starts
    with."""
    prompts = _ragged_prompts()
    longer = _rows(gemma3_lm.generate(_right_padded(prompts), max_new_tokens=4, stop_token_ids=None))
    functions = gemma3_lm._functions()

    def no_loop(*args):
        raise AssertionError("the decode loop ran")

    monkeypatch.setattr(functions, "loop", no_loop)
    one = _rows(gemma3_lm.generate(_right_padded(prompts), max_new_tokens=1, stop_token_ids=None))
    assert one == [row[: len(p) + 1] for p, row in zip(prompts, longer)]


def test_streamed_tokens_equal_generate(gemma3_lm):
    prompts = _ragged_prompts()
    inputs = _right_padded(prompts)
    output = gemma3_lm.generate(inputs, max_new_tokens=12, stop_token_ids=None, strip_prompt=True)
    steps = list(gemma3_lm.stream_token_ids(inputs, max_new_tokens=12, stop_token_ids=None))
    assert np.stack(steps, axis=1).tolist() == output["token_ids"].tolist()


def test_padding_side_and_batch_do_not_change_tokens(gemma3_lm):
    prompts = _ragged_prompts()
    batched = _rows(gemma3_lm.generate(_right_padded(prompts), max_new_tokens=10, stop_token_ids=None))
    for prompt, row in zip(prompts, batched):
        alone = gemma3_lm.generate({"token_ids": np.array(prompt)}, max_new_tokens=10, stop_token_ids=None)
        assert alone["token_ids"].tolist() == row
    # Left padding in the input gives the same rows.
    width = max(map(len, prompts))
    left = {"token_ids": np.zeros((3, width), np.int32), "padding_mask": np.zeros((3, width), bool)}
    for i, p in enumerate(prompts):
        left["token_ids"][i, width - len(p):], left["padding_mask"][i, width - len(p):] = p, True
    assert _rows(gemma3_lm.generate(left, max_new_tokens=10, stop_token_ids=None)) == batched


def test_max_length_is_per_row_total(gemma3_lm):
    prompts = _ragged_prompts()
    output = gemma3_lm.generate(_right_padded(prompts), max_length=14, stop_token_ids=None)
    assert [len(row) for row in _rows(output)] == [14, 14, 14]
    both = gemma3_lm.generate(_right_padded(prompts), max_length=14, max_new_tokens=5, stop_token_ids=None)
    assert [len(row) for row in _rows(both)] == [8, 14, 12]
    # A prompt exactly max_length long gets nothing new.
    same = gemma3_lm.generate(_right_padded(prompts), max_length=11, stop_token_ids=None)
    assert [len(row) for row in _rows(same)] == [11, 11, 11]


# -- stop tokens -----------------------------------------------------------------


def test_stop_tokens_end_each_row_independently(gemma3_lm):
    prompts = _ragged_prompts()
    inputs = _right_padded(prompts)
    free = gemma3_lm.generate(inputs, max_new_tokens=NEW_TOKENS, stop_token_ids=None, strip_prompt=True)
    free_rows = free["token_ids"].tolist()
    # A token that row 0 emits, whose first appearance differs between rows.
    first = lambda row, t: row.index(t) if t in row else None
    candidates = [
        t for t in free_rows[0]
        if len({first(row, t) for row in free_rows}) == len(free_rows)
    ]
    assert candidates, "the tiny model should emit some token at different steps per row"
    stop = candidates[0]
    stopped = gemma3_lm.generate(inputs, max_new_tokens=NEW_TOKENS, stop_token_ids=[stop], strip_prompt=True)
    for row, free_row in zip(_rows(stopped), free_rows):
        index = first(free_row, stop)
        expected = free_row if index is None else free_row[: index + 1]
        assert row == expected  # cut after the stop token, the rest untouched
    assert len({len(row) for row in _rows(stopped)}) > 1


def test_auto_stop_ids_without_tokenizer(gemma3_lm):
    assert prompts_lib.resolve_stop_ids(gemma3_lm, "auto") == (1,)
    assert prompts_lib.resolve_stop_ids(gemma3_lm, None) == ()
    assert prompts_lib.resolve_stop_ids(gemma3_lm, [5, 3, 5]) == (3, 5)
    # Gemma 3's vocabulary size tells us <end_of_turn> without a tokenizer.
    config = gemma3_lm.config.replace(vocabulary_size=262_144)
    stand_in = type("LM", (), {"preprocessor": None, "config": config})()
    assert prompts_lib.resolve_stop_ids(stand_in, "auto") == (1, 106)


def test_stop_tokens_as_vocabulary_pieces(text_lm):
    tokenizer = text_lm.preprocessor.tokenizer
    turn, eos = tokenizer.token_to_id("<end_of_turn>"), tokenizer.eos_token_id
    assert prompts_lib.resolve_stop_ids(text_lm, ["<end_of_turn>", eos, "<eos>"]) == tuple(sorted({turn, eos}))
    free = [int(t[0]) for t in text_lm.stream_token_ids(["Hello"], max_new_tokens=12, stop_token_ids=None)]
    stop = free[4]
    by_piece = text_lm.stream_token_ids(["Hello"], max_new_tokens=12, stop_token_ids=[tokenizer.id_to_token(stop)])
    assert [int(t[0]) for t in by_piece] == free[: free.index(stop) + 1]
    for bad, message in (("no such piece", "not a piece"), (-1, r"\[0, "), (10**6, r"\[0, "), (1.5, r"\[0, ")):
        with pytest.raises(ValueError, match=message):
            text_lm.generate("Hello", max_new_tokens=2, stop_token_ids=[bad])


# -- text, chat, streaming ---------------------------------------------------------


@pytest.fixture(scope="module")
def text_lm():
    """A tiny random model over a tiny SentencePiece vocabulary whose turn
    markers are control tokens, as in Gemma's."""
    tokenizer = GemmaTokenizer(str(_tiny_spm("control")))
    keras.utils.set_random_seed(3)
    backbone = keras_gemma.GemmaBackbone(
        vocabulary_size=tokenizer.vocabulary_size(), num_layers=2, hidden_dim=32,
        num_query_heads=2, num_key_value_heads=1, head_dim=16, intermediate_dim=64,
        layer_types=("local", "global"), sliding_window_size=4, max_sequence_length=256,
    )
    return keras_gemma.GemmaCausalLM(backbone, GemmaCausalLMPreprocessor(tokenizer, sequence_length=64))


def test_text_in_text_out(text_lm):
    tokenizer = text_lm.preprocessor.tokenizer
    prompts = ["The quick brown fox", "Hello"]
    full = text_lm.generate(prompts, max_new_tokens=8, stop_token_ids=None)
    new = text_lm.generate(prompts, max_new_tokens=8, stop_token_ids=None, strip_prompt=True)
    assert isinstance(full, list) and len(full) == 2
    for prompt, text, reply in zip(prompts, full, new):
        assert text == prompt + reply
    # The same as the token-id path with <bos> prepended.
    ids = [[tokenizer.bos_token_id] + tokenizer.tokenize(p) for p in prompts]
    rows = text_lm.generate(_right_padded(ids), max_new_tokens=8, stop_token_ids=None, strip_prompt=True)
    assert new == [tokenizer.detokenize(r, skip_special_tokens=True) for r in _rows(rows)]
    single = text_lm.generate("Hello", max_new_tokens=8, stop_token_ids=None, strip_prompt=True)
    assert single == new[1]


def _reply_is_clean(text):
    return all(marker not in text for marker in ("<start_of_turn>", "<end_of_turn>", "<eos>", "<bos>"))


def test_chat_reply_and_stream(text_lm):
    tokenizer = text_lm.preprocessor.tokenizer
    messages = [{"role": "user", "content": "Hello world"}]
    # Force the stop behaviour: "auto" stops on <eos> and <end_of_turn>.
    assert prompts_lib.resolve_stop_ids(text_lm, "auto") == tuple(sorted((tokenizer.eos_token_id, tokenizer.end_of_turn_id)))
    reply = text_lm.chat(messages, max_new_tokens=24)
    assert isinstance(reply, str) and _reply_is_clean(reply)
    pieces = list(text_lm.chat(messages, max_new_tokens=24, stream=True))
    assert "".join(pieces) == reply
    assert "".join(text_lm.stream_chat("Hello world", max_new_tokens=24)) == reply
    # The reply is what generate() continues the rendered chat with.
    full = text_lm.generate(messages, max_new_tokens=24)
    assert full.startswith("<start_of_turn>user\nHello world<end_of_turn>\n<start_of_turn>model\n")
    assert full.endswith(reply)
    assert text_lm.generate(messages, max_new_tokens=24, strip_prompt=True) == reply


def test_chat_reply_drops_markers_and_stops_at_end_of_turn(text_lm):
    tokenizer = text_lm.preprocessor.tokenizer
    start, end = tokenizer.start_of_turn_id, tokenizer.end_of_turn_id
    words = tokenizer.tokenize("Hi there")
    script = [words[0], start, *words[1:], end, words[0]] + [words[0]] * 10
    text_lm.compile(sampler=ScriptedSampler(script))
    try:
        messages = [{"role": "user", "content": "Hello world"}]
        # A chat's reply ends where the model opens a new turn (issue 28)...
        reply = text_lm.chat(messages, max_new_tokens=20)
        assert reply == tokenizer.detokenize(words[:1])
        assert "".join(text_lm.chat(messages, max_new_tokens=20, stream=True)) == reply
        # ...generate's "auto" goes on past <start_of_turn> (dropped from the text) to <end_of_turn>.
        assert text_lm.generate(messages, max_new_tokens=20, strip_prompt=True) == tokenizer.detokenize(words)
        ids = np.concatenate(list(text_lm.stream_token_ids(messages, max_new_tokens=20)))
        assert ids.tolist() == script[: len(words) + 2]
        text_lm.compile(sampler=ScriptedSampler([*words, end] + [words[0]] * 10))
        reply = text_lm.chat(messages, max_new_tokens=20)
        assert reply == tokenizer.detokenize(words) and _reply_is_clean(reply)  # ends at <end_of_turn>
    finally:
        text_lm.compile(sampler="greedy")


def test_streamed_text_joins_to_generated_text(text_lm):
    prompts = ["Hello", "tabs\tand  spaces", "中文"]
    new = text_lm.generate(prompts, max_new_tokens=16, stop_token_ids=None, strip_prompt=True)
    joined = [""] * len(prompts)
    for pieces in text_lm.stream_generate(prompts, max_new_tokens=16, stop_token_ids=None):
        joined = [a + b for a, b in zip(joined, pieces)]
    assert joined == new


# -- score -------------------------------------------------------------------------


def test_score_matches_log_softmax(gemma3_lm):
    prompts = _ragged_prompts()
    inputs = _right_padded(prompts)
    scores = gemma3_lm.score(inputs)
    for prompt, row in zip(prompts, scores):
        logits = to_numpy(gemma3_lm({"token_ids": np.array([prompt], np.int32)}))[0].astype(np.float64)
        log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        expected = [log_probs[j - 1, prompt[j]] for j in range(1, len(prompt))]
        np.testing.assert_allclose(row[1 : len(prompt)], expected, atol=1e-4)
        assert row[0] == 0 and not row[len(prompt):].any()


def test_score_text(text_lm):
    out = text_lm.score(["Hello world", "Hi"])
    assert out["log_probs"].shape == out["token_ids"].shape
    assert (out["log_probs"] <= 0).all()
    single = text_lm.score("Hi")
    np.testing.assert_allclose(single["log_probs"], out["log_probs"][1][: len(single["log_probs"])], atol=1e-5)


# -- compile, recompiles, bad input ----------------------------------------------


def test_compile_sampler_and_fit_defaults(text_lm):
    text_lm.compile(sampler="top_k")
    assert type(text_lm.sampler).__name__ == "TopKSampler"
    assert isinstance(text_lm.loss, keras.losses.SparseCategoricalCrossentropy)
    x, y, sample_weight = text_lm.preprocessor(["The quick brown fox.", "Hello world!"])
    history = text_lm.fit(x, y, sample_weight=sample_weight, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert "sparse_categorical_accuracy" in history.history
    text_lm.compile(sampler="greedy")  # leave it as the other tests expect


def test_no_recompile_for_same_bucket(gemma3_lm, monkeypatch):
    traces = []
    original = engine.decode_step

    def counting(*args, **kwargs):
        traces.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "decode_step", counting)
    gemma3_lm.compile(sampler="greedy")  # fresh compiled functions
    gemma3_lm.generate({"token_ids": np.array(_ragged_prompts((40,))[0])}, max_new_tokens=6, stop_token_ids=None)
    first = len(traces)
    assert first > 0
    for lengths, new in (((50,), 10), ((33,), 3), ((58,), 6)):
        prompt = _ragged_prompts(lengths, seed=sum(lengths))[0]
        gemma3_lm.generate({"token_ids": np.array(prompt)}, max_new_tokens=new, stop_token_ids=None)
    assert len(traces) == first  # same prompt width (64) and cache length (64): no new trace/jit
    gemma3_lm.generate({"token_ids": np.arange(4, 74) % hf_reference.VOCAB}, max_new_tokens=3, stop_token_ids=None)
    assert len(traces) > first  # a longer cache (128) does compile anew


def test_new_prompt_widths_reuse_compiled_chunks(gemma3_lm, monkeypatch):
    """A chat's prompt widens every turn. Prompts run as power-of-two chunks
    into a coarsely bucketed cache, so a new prompt width whose chunks and
    cache length have run before compiles nothing: 192 columns (128 + 64),
    then 128, then 192 again, with different numbers of new tokens.
    (PyTorch runs a chunk shape's first calls eagerly; here it traces.)"""
    monkeypatch.setattr(compile_module, "TRACE_CHUNK_AFTER", 0)
    traces = []
    original = gemma3_lm.backbone.hidden_states

    def counting(*args, **kwargs):
        traces.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(gemma3_lm.backbone, "hidden_states", counting)
    gemma3_lm.compile(sampler="greedy")  # fresh compiled functions
    gemma3_lm.generate({"token_ids": np.array(_ragged_prompts((181,))[0])}, max_new_tokens=8, stop_token_ids=None)
    assert traces
    traces.clear()
    for length, new in ((100, 30), (160, 20), (130, 60)):  # cache length 256
        gemma3_lm.generate({"token_ids": np.array(_ragged_prompts((length,))[0])}, max_new_tokens=new, stop_token_ids=None)
    assert not traces
    assert prompts_lib.bucket(33 + 20, prompts_lib.COARSE_BUCKET) != 256
    gemma3_lm.generate({"token_ids": np.arange(4, 37)}, max_new_tokens=20, stop_token_ids=None)
    assert traces  # a 64-column prompt and a shorter cache: compiled anew


def test_bad_inputs(gemma3_lm, text_lm):
    with pytest.raises(ValueError, match="empty"):
        text_lm.generate("", max_new_tokens=4)
    with pytest.raises(ValueError, match="empty"):
        text_lm.generate(["fine", ""], max_new_tokens=4)
    with pytest.raises(ValueError, match="no real"):
        gemma3_lm.generate({"token_ids": np.zeros((2, 4), np.int32), "padding_mask": np.array([[1, 1, 0, 0], [0, 0, 0, 0]])}, max_new_tokens=4)
    with pytest.raises(ValueError, match="more than max_length"):
        gemma3_lm.generate({"token_ids": np.arange(4, 14)}, max_length=5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gemma3_lm.generate({"token_ids": np.arange(4, 14)}, max_new_tokens=-1)
    with pytest.raises(ValueError, match="tokenizer"):
        gemma3_lm.generate("text needs a tokenizer", max_new_tokens=4)
    with pytest.raises(ValueError, match="max_sequence_length"):
        gemma3_lm.generate({"token_ids": np.arange(4, 14)}, max_new_tokens=10_000)
    with pytest.raises(ValueError, match="stop_token_ids"):
        gemma3_lm.generate({"token_ids": np.arange(4, 14)}, max_new_tokens=2, stop_token_ids="eos")
    with pytest.raises(ValueError, match="roles must alternate"):
        text_lm.chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    # Zero new tokens is allowed: the prompt comes back.
    out = gemma3_lm.generate({"token_ids": np.arange(4, 14)}, max_new_tokens=0)
    assert out["token_ids"].tolist() == list(range(4, 14))


def test_bucket():
    assert [prompts_lib.bucket(n) for n in (1, 16, 17, 33, 64, 65, 200)] == [16, 16, 32, 64, 64, 128, 256]


def test_generation_state_is_named(gemma3_lm):
    """The compiled functions pass named tuples (`engine.DecodeState`,
    `BeamState`, `Constants`), and get them back from a compiled step and
    loop on every backend (PyTorch's traces take and give plain tuples)."""
    prompts, limits, stop_ids = gemma3_lm._prepare({"token_ids": np.array([[5, 6, 7], [8, 9, 10]])}, None, 3, None)
    functions, _, state, constants = gemma3_lm._start(prompts, limits, stop_ids)
    assert engine.DecodeState._fields == ("cache", "token", "step", "done", "out")
    assert isinstance(state, engine.DecodeState) and isinstance(constants, engine.Constants)
    state = functions.step(state, constants)
    assert isinstance(state, engine.DecodeState) and int(to_numpy(state.step)) == 2
    state = functions.loop(state, constants)
    assert isinstance(state, engine.DecodeState) and int(to_numpy(state.step)) == 3
    assert to_numpy(state.out).shape[0] == 2 and to_numpy(state.done).all()
    gemma3_lm.compile(sampler=samplers.BeamSampler(num_beams=2))
    try:
        functions, _, state, constants = gemma3_lm._start(prompts, limits, stop_ids)
        assert isinstance(state, engine.BeamState) and to_numpy(state.best).shape[0] == 4
        state = functions.loop(state, constants)
        assert isinstance(state, engine.BeamState) and to_numpy(state.best_filled).any(axis=1).all()
    finally:
        gemma3_lm.compile(sampler="greedy")


def test_prompt_handling_is_host_only():
    """Text, stop ids, budgets and batches live in `prompts.py`, which
    imports neither the engine nor the compiler; `engine.py` keeps the math."""
    host = ("normalize_inputs", "Prompts", "token_arrays", "resolve_stop_ids", "new_token_limits", "Batch",
            "finish_rows", "detokenize", "format_outputs", "TextStream", "tokenizer_of", "render_chat",
            "encode_text", "bucket", "chunks")
    assert all(hasattr(prompts_lib, name) and not hasattr(engine, name) for name in host)
    tree = ast.parse(inspect.getsource(prompts_lib))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {
        f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names
    }
    assert not [name for name in imported if "generation" in name or "products" in name], imported


def _screened_and_full(table, x, k, cap=None, dtype="float32"):
    """`cpu.screened_logits` and the full head, float32 numpy; with
    `dtype="bfloat16"` the table and logits in bfloat16 (as a bfloat16
    model's head gives them, so near-equal logits round to ties)."""
    kernel = keras.ops.cast(keras.ops.convert_to_tensor(table), dtype)
    x = keras.ops.convert_to_tensor(x)

    def finish(raw):
        return soft_cap(keras.ops.cast(keras.ops.cast(raw, dtype), "float32"), cap)

    def full():
        return finish(keras.ops.matmul(x, keras.ops.transpose(keras.ops.cast(kernel, "float32"))))

    screened = cpu.screened_logits(x, kernel, cpu.screen_table(kernel), k, finish, full)
    return to_numpy(screened), to_numpy(full())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("k", [1, 5])
def test_screened_logits_hold_the_top_k_exactly(k, dtype, monkeypatch):
    """The int8 screen of the head (JAX's batch-1 decode step) recomputes a
    few rows exactly and -inf elsewhere, and those rows hold the top k
    (ties taken by the lower index, as over the full head)."""
    monkeypatch.setattr(cpu, "SCREEN_ROWS", 16)
    rng = np.random.default_rng(k)
    table = rng.standard_normal((2048, 64)).astype(np.float32)
    screened = 0
    for trial in range(8):
        x = rng.standard_normal((1, 64)).astype(np.float32)
        got, want = _screened_and_full(table, x, k, dtype=dtype)
        kept = np.isfinite(got[0])
        assert kept.sum() == 16 or kept.all(), trial  # screened, or the full head
        screened += kept.sum() == 16
        np.testing.assert_allclose(got[0, kept], want[0, kept], rtol=1e-6, atol=1e-6)
        top = np.argsort(-want[0], kind="stable")[:k]
        assert kept[top].all()
        assert np.argsort(-got[0], kind="stable")[:k].tolist() == top.tolist()
    assert screened >= 4


def test_screened_logits_fall_back_to_the_full_head(monkeypatch):
    """Where the screen cannot show that the kept rows hold the top k, the
    full head is used: ties beyond the kept rows, rows closer than the
    int8 screen can tell apart, and a soft cap that saturates (distinct raw
    logits, equal capped ones)."""
    monkeypatch.setattr(cpu, "SCREEN_ROWS", 16)
    rng = np.random.default_rng(0)
    table = rng.standard_normal((2048, 64)).astype(np.float32)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    best = int(np.argmax(x @ table.T))
    tied = table.copy()
    tied[rng.choice(2048, 40, replace=False)] = table[best]  # 41 rows with the top logit
    for table_, x_, cap in ((tied, x, None), (table, 30 * x, 1.0)):
        got, want = _screened_and_full(table_, x_, 1, cap)
        assert np.isfinite(got).all()  # the full head, not -inf outside kept rows
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)  # raw logits ~100 with x30
        assert to_numpy(samplers.first_argmax(got)) == to_numpy(samplers.first_argmax(want))
    # Clusters of 32 rows within 1e-3 of each other, closer than int8
    # tells apart: the best row is often not among the 16 kept.
    near = np.repeat(table[:64], 32, axis=0) + 1e-3 * rng.standard_normal((2048, 64)).astype(np.float32)
    for _ in range(20):
        got, want = _screened_and_full(near, rng.standard_normal((1, 64)).astype(np.float32), 1)
        assert to_numpy(samplers.first_argmax(got)) == to_numpy(samplers.first_argmax(want))


@pytest.mark.skipif(backend() != "jax", reason="JAX's batch-1 decode step screens the head")
def test_screened_decoding_equals_full_forward(hf_lm, monkeypatch):
    """Batch-1 greedy and top-k decoding through the head's int8 screen
    (2 kept rows of 96, so that both the screened and the full-head
    branches run): greedy tokens, generated and streamed, equal uncached
    forward passes; top-k draws equal those without the screen. New
    embeddings make a new screen."""
    monkeypatch.setattr(cpu, "SCREEN_ROWS", 2)
    assert isinstance(hf_lm._functions().tuning, cpu.JaxCpu)
    prompt = _ragged_prompts(lengths=(5,))
    _check_greedy_equals_full_forward(hf_lm, prompt)
    inputs = _right_padded(prompt)
    output = hf_lm.generate(inputs, max_new_tokens=12, stop_token_ids=None, strip_prompt=True)
    steps = list(hf_lm.stream_token_ids(inputs, max_new_tokens=12, stop_token_ids=None))  # screened steps
    assert np.stack(steps, axis=1).tolist() == output["token_ids"].tolist()
    functions = hf_lm._functions()
    table = hf_lm.backbone.token_embedding.embeddings
    assert functions.tuning._screen[0]() is table.value
    old = to_numpy(table.value)
    try:
        table.assign(old[np.random.default_rng(3).permutation(len(old))])
        _check_greedy_equals_full_forward(hf_lm, prompt)
        assert functions.tuning._screen[0]() is table.value
    finally:
        table.assign(old)
    sampler = hf_lm.sampler
    try:
        draws = []
        for screens in (True, False):
            if not screens:
                monkeypatch.setattr(cpu.JaxCpu, "extras", lambda self, sampler, batch: ())
            hf_lm.compile(sampler=keras_gemma.samplers.TopKSampler(k=3, seed=7))
            draws.append(_rows(hf_lm.generate(_right_padded(prompt), max_new_tokens=20, stop_token_ids=None)))
        assert draws[0] == draws[1]
    finally:
        hf_lm.compile(sampler=sampler)


@pytest.mark.skipif(backend() != "jax", reason="JAX's batch-1 decode step screens the head")
def test_first_token_goes_through_the_screen(hf_lm, monkeypatch):
    """The prompt's first new token is found through the head's screen as
    the decode steps' are (its tokens: `test_screened_decoding_equals_full_forward`)."""
    monkeypatch.setattr(cpu, "SCREEN_ROWS", 2)  # the tiny vocabulary gets screened
    calls = []
    screened = cpu.screened_logits
    monkeypatch.setattr(cpu, "screened_logits", lambda *args: calls.append(1) or screened(*args))
    sampler = hf_lm.sampler
    try:
        hf_lm.compile(sampler="greedy")  # new functions, traced anew
        hf_lm.generate(_right_padded(_ragged_prompts(lengths=(5,))), max_new_tokens=1, stop_token_ids=None)
    finally:
        hf_lm.compile(sampler=sampler)
    assert calls


@pytest.mark.skipif(backend() != "jax", reason="JAX's batch-1 decode step screens the head")
def test_screened_bfloat16_decoding_equals_full_head(monkeypatch):
    """A bfloat16 model's screened steps pick what its full head picks
    (its bfloat16 logits tie often; ties go to the lower index either way)."""
    monkeypatch.setattr(cpu, "SCREEN_ROWS", 2)
    config = hf_reference.gemma2_config()
    lm = hf_reference.ours_from_hf(hf_reference.build_hf(config, scale=WEIGHT_SCALE["gemma2"]), dtype="bfloat16")
    prompt = _right_padded(_ragged_prompts(lengths=(5,)))
    rows = []
    for screens in (True, False):
        if not screens:
            monkeypatch.setattr(cpu.JaxCpu, "extras", lambda self, sampler, batch: ())
        rows.append(_rows(lm.generate(prompt, max_new_tokens=NEW_TOKENS, stop_token_ids=None)))
    assert rows[0] == rows[1]
    assert len(set(rows[0][0][5:])) >= 3, rows  # not one token echoed


@pytest.mark.parametrize("equation, form", [
    ("btd,df->btf", "matrix"),
    ("btf,fd->btd", "matrix"),
    ("ij,jk->ik", "matrix"),
    ("btd,ndh->btnh", "heads"),
    ("bsd,kdh->bskh", "heads"),
    ("btNh,Nhd->btd", "flat"),
    ("bkhs,btkgh->bkgts", None),  # attention
    ("bkgts,bkhs->btkgh", None),
    ("ij,kj->ik", "transposed"),  # the output head
    ("bd,dd->bd", None),
    ("...d,df->...f", None),
])
def test_einsum_forms_read_equations(equation, form):
    assert cpu.einsum_form(equation) == form


@pytest.mark.skipif(backend() != "torch", reason="PyTorch's traced generation functions only")
def test_traced_products_go_to_onednn():
    """While tracing, float32 products by a weight (matmul; einsums by a
    matrix, or over heads and features at once) are recorded as oneDNN's
    inner product where this CPU has it, with the same values; other
    products (a per-head kernel not stored (n, h, d)) are recorded as they are."""
    import torch

    rng = np.random.default_rng(0)
    x = torch.tensor(rng.standard_normal((2, 3, 40)), dtype=torch.float32)
    w = torch.tensor(rng.standard_normal((40, 24)), dtype=torch.float32)
    q = torch.tensor(rng.standard_normal((2, 5, 7)), dtype=torch.float32)

    heads = torch.tensor(rng.standard_normal((2, 40, 8)), dtype=torch.float32)  # (n, d, h)
    rows = torch.tensor(rng.standard_normal((2, 128, 40)), dtype=torch.float32)

    def fn(x, w, q, heads, rows):
        per_head = torch.einsum("btd,ndh->btnh", rows, heads)
        flat = torch.einsum("btnh,nhd->btd", per_head, heads.transpose(1, 2))
        return (
            torch.matmul(x, w), torch.einsum("btd,df->btf", x, w), torch.einsum("bik,bjk->bij", q, q),
            per_head, flat,
            torch.einsum("btd,ndh->btnh", x, heads),  # too few rows: left to matmul
        )

    with torch.inference_mode(), cpu.onednn_products(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.trace. is deprecated")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # as compile.py does
        traced = torch.jit.trace(fn, (x, w, q, heads, rows), check_trace=False)
    graph = str(traced.graph)
    onednn = cpu._onednn_linear() is not None
    # matmul, "btd,df->btf", the flat product.
    assert graph.count("keras_gemma::onednn_linear") == (3 if onednn else 0), graph
    with torch.inference_mode():
        got = traced(x, w, q, heads, rows)

    def f64(eq, *ops):
        return torch.einsum(eq, *(o.double() for o in ops)).float().numpy()

    per_head = f64("btd,ndh->btnh", rows, heads)
    expected = [
        f64("btd,df->btf", x, w), f64("btd,df->btf", x, w), f64("bik,bjk->bij", q, q), per_head,
        f64("btnh,nhd->btd", torch.tensor(per_head), heads.transpose(1, 2)), f64("btd,ndh->btnh", x, heads),
    ]
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(backend() != "torch", reason="PyTorch's traced generation functions only")
def test_traced_few_row_products_by_out_in_ordered_weights():
    """While tracing, one row by a float32 weight stored in (out, in) memory
    order (as the layers store theirs on PyTorch) is recorded as a batched
    matrix-vector product over row blocks, not oneDNN, with the same values;
    so are a per-head einsum by a kernel stored (n, h, d) and the output
    einsum by one stored (d, n, h). So are 2 to `FEW_ROWS` rows by such a
    weight with at most `FEW_ROWS_MAX_IN` inputs; a longer input and more
    rows go to oneDNN (the per-head einsum as one product over all heads)."""
    import torch

    rng = np.random.default_rng(0)

    def tensor(*shape):
        return torch.tensor(rng.standard_normal(shape), dtype=torch.float32)

    x, rows = tensor(1, 1, 40), tensor(2, 3, 40)
    few = tensor(1, cpu.FEW_ROWS, 40)
    long_in = cpu.FEW_ROWS_MAX_IN + 16
    few_long, w_long = tensor(1, 2, long_in), tensor(32, long_in).T
    w = tensor(24, 40).T  # (i, o) in (o, i) order
    heads = tensor(2, 8, 40).transpose(1, 2)  # (n, d, h) in (n, h, d) order
    out = tensor(40, 2, 8).permute(1, 2, 0)  # (n, h, d) in (d, n, h) order
    z = tensor(1, 1, 2, 8)
    assert w.T.is_contiguous() and heads.transpose(1, 2).is_contiguous() and out.permute(2, 0, 1).is_contiguous()

    def fn(x, rows, w, heads, out, z, few, few_long, w_long):
        return (
            torch.matmul(x, w), torch.einsum("btd,ndh->btnh", x, heads), torch.einsum("btNh,Nhd->btd", z, out),
            torch.einsum("btd,ndh->btnh", rows, heads), torch.matmul(few, w), torch.matmul(few_long, w_long),
            torch.matmul(x.reshape(1, 1, 40).expand(2, 1, 40), heads),  # `Attention._query`'s per-head form
        )

    args = (x, rows, w, heads, out, z, few, few_long, w_long)
    with torch.inference_mode(), cpu.onednn_products(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.trace. is deprecated")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(fn, args, check_trace=False)
    graph = str(traced.graph)
    if cpu._onednn_linear() is not None:
        assert graph.count("aten::bmm") == 5 and graph.count("keras_gemma::onednn_linear") == 2, graph
    with torch.inference_mode():
        got = traced(*args)

    def f64(eq, *ops):
        return torch.einsum(eq, *(o.double() for o in ops)).float().numpy()

    expected = [
        f64("btd,df->btf", x, w), f64("btd,ndh->btnh", x, heads), f64("btnh,nhd->btd", z, out),
        f64("btd,ndh->btnh", rows, heads), f64("btd,df->btf", few, w), f64("btd,df->btf", few_long, w_long),
        f64("btd,ndh->nth", x, heads),
    ]
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(backend() != "torch", reason="PyTorch's traced generation functions only")
def test_torch_traced_graphs_run_without_the_profiling_executor(gemma3_lm):
    """The traced graphs run as traced: no profiling run that a later call
    would then optimize (that second call paid ~0.9 s for a 16-token
    prompt's prefill, see `compile._torch`), and TorchScript's global
    setting is the user's again afterwards."""
    import torch

    assert torch._C._get_graph_executor_optimize()
    prompt = {"token_ids": np.array([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]])}
    for _ in range(2):
        gemma3_lm.generate(prompt, max_new_tokens=2)
        kinds = {node.kind() for node in torch.jit.last_executed_optimized_graph().nodes()}
        assert "prim::profile" not in kinds, kinds
        assert "keras_gemma::onednn_linear" in kinds or "aten::bmm" in kinds  # a traced decode step ran
    assert torch._C._get_graph_executor_optimize()


def _compiled_loop(dtype, new_tokens):
    """A tiny local+global model, its prompt, the decode loop's start state
    and the loop's optimized HLO (JAX or TensorFlow)."""
    config = keras_gemma.GemmaConfig(
        vocabulary_size=96, num_layers=2, hidden_dim=40, num_query_heads=2, num_key_value_heads=1,
        head_dim=8, intermediate_dim=48, layer_types=("local", "global"), sliding_window_size=4,
    )
    lm = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(config, dtype=dtype))
    prompt = {"token_ids": np.array([[5, 6, 7]]), "padding_mask": np.ones((1, 3), bool)}
    prompts, limits, stop_ids = lm._prepare(prompt, None, new_tokens, None)
    functions, _, state, constants = lm._start(prompts, limits, stop_ids)
    if backend() == "tensorflow":
        hlo = functions._loop.experimental_get_compiler_ir(state, constants, ())(stage="optimized_hlo")
    else:
        values = [v.value for v in functions.variables]
        hlo = functions._loop.jitted.lower(values, state, constants, ()).compile().as_text()
    return lm, prompt, state, hlo


def _copied_cache_arrays(state, hlo, in_entry):
    """Cache shapes that the loop's optimized HLO copies: anywhere, or
    `in_entry=False` only inside the loop, where a copy is paid on every
    step (TensorFlow copies its arguments, which it does not donate, once
    per call in the entry computation)."""
    cache_shapes = {tuple(a.shape) for layer in state.cache for a in layer}
    assert len(cache_shapes) == 4  # keys/values and positions, ring and global
    computations = hlo.split("\n\n")
    inner = "\n\n".join(c for c in computations if in_entry or not c.lstrip().startswith("ENTRY"))
    copied = [tuple(int(d) for d in dims.split(",")) for dims in re.findall(r"= \w+\[([\d,]+)\]\{[\d,]*\} copy\(", inner)]
    assert "while(" in hlo
    return sorted(cache_shapes & set(copied))


@pytest.mark.skipif(backend() != "jax", reason="inspects the compiled JAX decode loop")
def test_jax_float32_decode_loop_copies_no_cache():
    """A decode step reads each layer's cache and writes one slot in place:
    the compiled loop copies no cache array (`compile._jax_loop_options`).
    That the read still comes before the write is what
    `test_greedy_with_cache_equals_full_forward` checks."""
    _, _, state, hlo = _compiled_loop("float32", 20)
    assert not _copied_cache_arrays(state, hlo, in_entry=True)


def test_public_signatures_carry_no_device_tuning():
    """The CPU tuning (`backends/cpu.py`) is chosen by the compiler: the
    model's, the engine's and the samplers' signatures do not carry it."""
    assert list(inspect.signature(keras_gemma.GemmaCausalLM.decode_logits).parameters) == ["self", "hidden"]
    for fn in (engine.decode_step, engine.decode_loop):
        assert list(inspect.signature(fn).parameters) == ["lm", "sampler", "state", "constants"]
    assert list(inspect.signature(engine.first_token).parameters) == ["lm", "sampler", "hidden", "out", "constants"]
    assert not hasattr(samplers.Sampler, "top_logits")


@pytest.mark.skipif(backend() != "torch", reason="PyTorch's CPU tuning")
def test_torch_cpu_tuning_stores_kernels_out_in_with_the_same_values(gemma3_lm):
    """Generating on PyTorch on CPU stores float32 kernels in (out, in)
    memory order (what oneDNN and MKL read fastest); values unchanged."""
    backbone = gemma3_lm.backbone
    before = [to_numpy(w) for w in backbone.weights]
    gemma3_lm.generate({"token_ids": np.array([[5, 6, 7]])}, max_new_tokens=2)
    assert isinstance(gemma3_lm._functions().tuning, cpu.TorchCpu)
    gate = backbone.blocks[0].feed_forward.gate._kernel.value  # (d, f) stored as (f, d)
    query = backbone.blocks[0].attention.query_dense._kernel.value  # (n, d, h) stored as (n, h, d)
    output = backbone.blocks[0].attention.output_dense._kernel.value  # (n, h, d) stored as (d, n, h)
    assert gate.T.is_contiguous() and query.transpose(1, 2).is_contiguous() and output.permute(2, 0, 1).is_contiguous()
    for old, new in zip(before, backbone.weights):
        np.testing.assert_array_equal(old, to_numpy(new))


@pytest.mark.skipif(keras.config.backend() != "jax", reason="JAX's CPU decode tuning")
def test_row_blocks_split_one_row_products_and_keep_their_values():
    import jax
    import jax.numpy as jnp

    from keras_gemma.backends import cpu

    def fn(x, w, n):  # a loop of one-row products, as a decode loop is
        return jax.lax.fori_loop(0, n, lambda i, y: jnp.tanh(jnp.einsum("btd,df->btf", y, w)), x)

    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((1, 1, 512)).astype("float32"), (rng.standard_normal((512, 512)) / 20).astype("float32")
    split = jax.jit(cpu.row_blocks(fn))
    np.testing.assert_allclose(split(x, w, 3), jax.jit(fn)(x, w, 3), atol=1e-5)
    assert f"f32[{cpu.XLA_ROW_BLOCKS},1,512]" in split.lower(x, w, 3).compile().as_text()

    # A product with a custom gradient (as Keras' quantized ones are) is
    # inlined, and split as well: it cannot be bound again from its jaxpr.
    @jax.custom_vjp
    def product(y, w):
        return jnp.einsum("btd,df->btf", y, w)

    product.defvjp(lambda y, w: (product(y, w), (y, w)), lambda saved, g: (g @ saved[1].T, None))

    def custom(x, w, n):
        return jax.lax.fori_loop(0, n, lambda i, y: jnp.tanh(product(y, w)), x)

    split = jax.jit(cpu.row_blocks(custom))
    np.testing.assert_allclose(split(x, w, 3), jax.jit(fn)(x, w, 3), atol=1e-5)
    assert f"f32[{cpu.XLA_ROW_BLOCKS},1,512]" in split.lower(x, w, 3).compile().as_text()
