"""Generation as small functions over a fixed-shape cache (gpt-fast style).

The math lives in `keras.ops` functions that `compile.py` compiles per
backend: `prefill_start` (the prompt's first chunk through
`backbone.hidden_states` into an empty cache), `prefill_chunk` (a later
chunk, attending to the cache so far), `first_token` (logits at the
prompt's last position only, the first token sampled), `decode_step` (one
token per row through the same `hidden_states`, written at cache slot
`index % slots`), and `decode_loop` (`decode_step` in `ops.while_loop`
until every row is done); beam search has its own `beam_first`,
`beam_step` and `beam_loop`.

What they carry between calls are named tuples (pytrees on every backend,
as google-deepmind/gemma's `SamplingState`): `DecodeState`, `BeamState`,
and the per-call `Constants`.

Ragged batches are LEFT padded: every row's prompt ends at the same index,
so one cache index serves the whole batch, and rotary positions count real
tokens only, so a padded row decodes exactly as it would alone. A prompt
runs as power-of-two chunks (`prompts.chunks`); the first chunk, the
largest, attends to itself alone, so a prompt of a power-of-two width runs
as one pass with no attention over empty slots.

Turning text into prompts and the output buffer back into text is host
work, in `prompts.py`.
"""

from typing import Any
from typing import NamedTuple

from keras import ops

from keras_gemma.generation.prompts import PAD_ID


class Constants(NamedTuple):
    """What every step of one `generate` call reads, all int32 tensors."""

    prompt_lengths: Any  # (b,) real tokens in each prompt
    limits: Any  # (b,) each row's budget of new tokens
    stop_ids: Any  # (s,) stop tokens, padded with -1
    seed: Any  # () the sampler's seed for this call
    prefill_width: Any  # () the padded prompt width: the first decode step's cache index


class DecodeState(NamedTuple):
    """The decode loop's state (`first_token`, `decode_step`)."""

    cache: Any  # per layer, the backbone's cache arrays (`backbone.init_cache`)
    token: Any  # (b,) int32, the token sampled last
    step: Any  # () int32, how many tokens each row has sampled
    done: Any  # (b,) bool, rows that hit a stop token or their budget
    out: Any  # (b, n) int32, sampled tokens so far (PAD_ID once a row is done)


class BeamState(NamedTuple):
    """Beam search's state (`beam_first`, `beam_step`): the running beams as
    `DecodeState`'s fields over `num_beams` rows per prompt, then each
    prompt's finished beams."""

    cache: Any
    token: Any  # (b * beams,)
    step: Any
    done: Any  # (b * beams,) the rows of prompts that have nothing left to gain
    out: Any  # (b * beams, n)
    scores: Any  # (b * beams,) float32, the running beams' summed log-probabilities
    best: Any  # (b * beams, n) int32, each prompt's best finished beams
    best_scores: Any  # (b, beams) float32, their length-penalised scores
    best_filled: Any  # (b, beams) bool, which of them hold a beam
    open: Any  # (b,) bool, whether a prompt's running beams may still beat its finished ones


def _while(cond, body, state):
    """`ops.while_loop` over one named state: Keras unpacks a tuple of loop
    variables into arguments (and a NamedTuple is a tuple), so the state
    goes in as the only one."""
    return ops.while_loop(cond, lambda state: (body(state),), (state,))[0]


def _is_stop(token, stop_ids):
    return ops.any(token[:, None] == stop_ids[None, :], axis=-1)  # (b,)


def prefill_start(lm, cache_length, token_ids, padding_mask):
    """The prompt's first chunk into an empty cache of `cache_length` slots.

    Args:
        token_ids, padding_mask: (b, w) the first w columns of the
            left-padded prompts.

    Returns:
        `(cache, hidden (b, d) at the chunk's last column)`. The cache is
        made here (`init_cache`): inside the compiled function it costs no
        dispatch, where eagerly each cache array was an op of its own (54
        for Gemma 3 270M; on JAX 25 ms of a 512-token prompt's first token
        on the 2-core CPU).
    """
    cache = lm.backbone.init_cache(token_ids.shape[0], cache_length)
    hidden, cache = lm.backbone.hidden_states(token_ids, padding_mask, cache=cache, last_only=True)
    return cache, hidden[:, -1, :]


def prefill_chunk(lm, token_ids, padding_mask, positions, cache_index, cache):
    """A later chunk of the prompts, from column `cache_index` on, into the
    cache; `positions` (b, w) are its rotary positions (real tokens before
    each, counted over the whole prompt). Returns what `prefill_start` does."""
    hidden, cache = lm.backbone.hidden_states(
        token_ids, padding_mask, positions=positions, cache=cache, cache_index=cache_index, last_only=True
    )
    return cache, hidden[:, -1, :]


def first_token(lm, sampler, hidden, out, constants):
    """Samples the first new token from the prompt's last hidden state.

    Args:
        hidden: (b, d) at the last column of the left-padded prompts, every
            row's last prompt token (so only it needs logits, not every
            position over a 256k vocabulary).
        out: (b, n) int32 zeros, the buffer for new tokens.
        constants: see `decode_step`.

    Returns:
        A `DecodeState` without its cache (`cache=None`: the caller holds
        the prefilled cache and puts it in, `state._replace(cache=cache)`).
    """
    logits = lm.decode_logits(hidden[:, None, :])  # (b, vocab) float32
    step = ops.zeros((), "int32")
    token = ops.cast(sampler(logits, ops.stack([constants.seed, step])), "int32")
    token = ops.where(constants.limits > 0, token, PAD_ID)
    out = ops.slice_update(out, (0, 0), token[:, None])
    done = ops.logical_or(constants.limits <= 1, _is_stop(token, constants.stop_ids))
    return DecodeState(cache=None, token=token, step=step + 1, done=done, out=out)


def decode_step(lm, sampler, state, constants):
    """Feeds the last token of each row, samples the next into `out[:, step]`.

    Args:
        state: a `DecodeState`, its cache after the prompt and `step - 1`
            decode steps, its `token` at index `p + step - 1`.
        constants: the call's `Constants`.

    Returns:
        The next `DecodeState`.
    """
    hidden, cache = _feed(lm, state, constants)
    logits = lm.decode_logits(hidden)  # (b, vocab)
    token = ops.cast(sampler(logits, ops.stack([constants.seed, state.step])), "int32")
    token = ops.where(state.done, PAD_ID, token)
    out = ops.slice_update(state.out, (ops.zeros((), "int32"), state.step), token[:, None])
    stopped = ops.logical_or(_is_stop(token, constants.stop_ids), state.step + 1 >= constants.limits)
    done = ops.logical_or(state.done, stopped)
    return DecodeState(cache=cache, token=token, step=state.step + 1, done=done, out=out)


def _feed(lm, state, constants):
    """Each row's last token (index `p + step - 1`) through the decoder into
    the cache: `(hidden (b, 1, d), cache)`."""
    positions = (constants.prompt_lengths + state.step - 1)[:, None]  # (b, 1) real tokens before
    cache_index = constants.prefill_width + state.step - 1
    return lm.backbone.hidden_states(
        state.token[:, None], None, positions=positions, cache=state.cache, cache_index=cache_index
    )


def _unfinished(state, constants):
    """The loops' condition: steps left in the budget and the buffer, and a row not done."""
    max_steps = ops.minimum(ops.max(constants.limits), state.out.shape[1])
    return ops.logical_and(state.step < max_steps, ops.logical_not(ops.all(state.done)))


def decode_loop(lm, sampler, state, constants):
    """`decode_step` until every row is done (or `out` is full)."""
    return _while(
        lambda state: _unfinished(state, constants),
        lambda state: decode_step(lm, sampler, state, constants),
        state,
    )


# Beam search (`samplers.BeamSampler`), transformers' algorithm
# (`GenerationMixin._beam_search`, `early_stopping=False`) in fixed shapes:
# each prompt runs as `num_beams` consecutive rows of the batch, its state a
# `BeamState`. A finished beam is one that emitted a stop token or filled
# its budget.

NOT_A_BEAM = -1.0e9  # transformers' score for what may not be chosen


def repeat_beams(beams, cache, hidden):
    """The prefilled cache and last hidden states with each row repeated
    `beams` times (the prompt is run once, not once per beam)."""
    cache = [tuple(ops.repeat(array, beams, axis=0) for array in layer) for layer in cache]
    return cache, ops.repeat(hidden, beams, axis=0)


def beam_first(lm, sampler, hidden, cache, out, constants):
    """The first beam step, from the prompts' last hidden states. Every
    beam of a prompt is the same prompt, so all but the first start at
    `NOT_A_BEAM`, and the first's best tokens become the beams."""
    beams = sampler.num_beams
    prompts = ops.shape(hidden)[0] // beams
    first = ops.reshape(ops.one_hot(ops.zeros((1,), "int32"), beams), (1, beams))
    scores = ops.reshape(ops.broadcast_to((1.0 - first) * NOT_A_BEAM, (prompts, beams)), (-1,))
    state = BeamState(
        cache=cache, token=None, step=ops.zeros((), "int32"), done=None, out=out, scores=scores,
        best=ops.zeros_like(out), best_scores=ops.full((prompts, beams), NOT_A_BEAM, "float32"),
        best_filled=ops.zeros((prompts, beams), "bool"), open=ops.ones((prompts,), "bool"),
    )
    return _beam_select(sampler, lm.decode_logits(hidden[:, None, :]), state, constants)


def beam_step(lm, sampler, state, constants):
    """Feeds each running beam's last token, then `_beam_select`."""
    hidden, cache = _feed(lm, state, constants)
    return _beam_select(sampler, lm.decode_logits(hidden), state._replace(cache=cache), constants)


def _beam_select(sampler, logits, state, constants):
    """One step of transformers' beam search from the running beams' next-token logits."""
    step, stop_ids = state.step, constants.stop_ids
    rows, vocabulary = ops.shape(logits)
    beams = sampler.num_beams
    prompts = rows // beams
    # Enough candidates that `beams` of them are not stopped (each beam can
    # stop on each stop id at most once).
    keep = max(2, 1 + ops.shape(stop_ids)[0]) * beams
    log_probs = ops.log_softmax(sampler.scaled(logits), axis=-1) + state.scores[:, None]
    candidate_scores, index = ops.top_k(ops.reshape(log_probs, (prompts, beams * vocabulary)), keep)
    first_row = ops.arange(prompts, dtype="int32")[:, None] * beams
    parents = ops.reshape(first_row + ops.cast(ops.floor_divide(index, vocabulary), "int32"), (-1,))  # (b * keep,)
    tokens = ops.reshape(ops.cast(ops.mod(index, vocabulary), "int32"), (-1,))
    candidates = ops.slice_update(ops.take(state.out, parents, axis=0), (ops.zeros((), "int32"), step), tokens[:, None])
    row_limits = ops.take(constants.limits, parents, axis=0)
    stopped = ops.reshape(ops.logical_or(_is_stop(tokens, stop_ids), step + 1 >= row_limits), (prompts, keep))
    # The best `beams` candidates that did not stop run on.
    scores, chosen = ops.top_k(candidate_scores + ops.cast(stopped, "float32") * NOT_A_BEAM, beams)
    chosen = ops.reshape(chosen + ops.arange(prompts, dtype="int32")[:, None] * keep, (-1,))
    chosen_parents = ops.take(parents, chosen)
    cache = [tuple(ops.take(array, chosen_parents, axis=0) for array in layer) for layer in state.cache]
    out, token = ops.take(candidates, chosen, axis=0), ops.take(tokens, chosen)
    # Stopped candidates among the best `beams` join the finished ones, scored per token.
    per_length = ops.cast(step + 1, "float32") ** sampler.length_penalty
    finished = ops.logical_and(stopped, ops.arange(keep)[None, :] < beams)
    penalised = candidate_scores / per_length
    penalised = penalised + ops.cast(ops.logical_not(state.open), "float32")[:, None] * NOT_A_BEAM
    penalised = penalised + ops.cast(ops.logical_not(finished), "float32") * NOT_A_BEAM
    merged = ops.concatenate([state.best_scores, penalised], axis=1)  # (b, beams + keep)
    best_scores, picked = ops.top_k(merged, beams)
    best_filled = ops.take_along_axis(ops.concatenate([state.best_filled, finished], axis=1), picked, axis=1)
    merged_rows = ops.concatenate([state.best, candidates], axis=0)  # finished rows, then candidate rows
    from_best = first_row + picked
    from_candidates = rows + ops.arange(prompts, dtype="int32")[:, None] * keep + picked - beams
    best = ops.take(merged_rows, ops.reshape(ops.where(picked < beams, from_best, from_candidates), (-1,)), axis=0)
    # Whether the best running beam, scored at this length, beats the worst finished one.
    worst = ops.where(best_filled, ops.min(best_scores, axis=1, keepdims=True), NOT_A_BEAM)
    hopeful = ops.any(scores[:, :1] / per_length > worst, axis=1)
    still_open = ops.logical_and(state.open, hopeful)
    prompt_done = ops.logical_or(ops.logical_not(still_open), ops.all(stopped, axis=1))
    return BeamState(
        cache=cache, token=token, step=step + 1, done=ops.repeat(prompt_done, beams, axis=0), out=out,
        scores=ops.reshape(scores, (-1,)), best=best, best_scores=best_scores, best_filled=best_filled,
        open=still_open,
    )


def beam_loop(lm, sampler, state, constants):
    """`beam_step` until every prompt is done (or `out` is full)."""
    return _while(
        lambda state: _unfinished(state, constants),
        lambda state: beam_step(lm, sampler, state, constants),
        state,
    )
