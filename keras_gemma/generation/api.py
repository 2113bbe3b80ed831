"""`compile(sampler=...)`, `generate`, `chat`, streaming and `score` for
`GemmaCausalLM` (a mixin, so the model file stays about the model)."""

import warnings

import numpy as np

import keras
from keras import ops

from keras_gemma import losses, precision
from keras_gemma.generation import engine
from keras_gemma.generation import prompts as prompts_lib
from keras_gemma.generation import samplers as samplers_lib
from keras_gemma.generation.compile import GenerateFunctions

SCORE_CHUNK = 256  # positions per logits chunk in `score` (vocab is 256k wide)


class GenerationMixin:
    """Generation methods of `GemmaCausalLM`; see each method's docstring."""

    def compile(self, optimizer="auto", loss="auto", *, weighted_metrics="auto", sampler="greedy", **kwargs):
        """Configures training and generation.

        As keras-hub's `CausalLM.compile`: `"auto"` gives Adam(2e-5), a
        `SparseCategoricalCrossentropy(from_logits=True)` loss and a
        `SparseCategoricalAccuracy` weighted metric (pass the padding mask as
        `sample_weight`), so `fit` works out of the box.

        Args:
            sampler: how `generate` picks tokens: `"greedy"`, `"random"`,
                `"top_k"`, `"top_p"`, `"beam"`, a `keras_gemma.samplers.Sampler`
                (e.g. `TopKSampler(k=40, temperature=0.8, seed=1)`), or a
                keras-hub sampler of one of those kinds.
            **kwargs: anything else `keras.Model.compile` takes.

        Example:
        ```python
        lm.compile(sampler=keras_gemma.samplers.TopPSampler(p=0.9, seed=0))
        lm.generate("The sky is", max_new_tokens=20)
        ```
        """
        if optimizer == "auto":
            optimizer = keras.optimizers.Adam(2e-5)
        if loss == "auto":
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        if weighted_metrics == "auto":
            weighted_metrics = [keras.metrics.SparseCategoricalAccuracy()]
        super().compile(optimizer=optimizer, loss=loss, weighted_metrics=weighted_metrics, **kwargs)
        self._generation = _GenerationState(samplers_lib.get(sampler))

    @property
    def sampler(self):
        """The `Sampler` that `generate` uses (greedy until `compile` says otherwise)."""
        return self._generation_state().sampler

    def _generation_state(self):
        state = getattr(self, "_generation", None)
        if state is None:
            state = self._generation = _GenerationState(samplers_lib.GreedySampler())
        return state

    def _functions(self):
        state = self._generation_state()
        if state.functions is None or not state.functions.matches(self, state.sampler):
            state.functions = GenerateFunctions(self, state.sampler)
        return state.functions

    # -- generate --------------------------------------------------------------

    def _prepare(self, inputs, max_length, max_new_tokens, stop_token_ids, tools=None):
        prompts = prompts_lib.normalize_inputs(self, inputs, tools)
        limits = prompts_lib.new_token_limits(self, prompts, max_length, max_new_tokens)
        stop_ids = prompts_lib.resolve_stop_ids(self, stop_token_ids)
        return prompts, limits, stop_ids

    def _start(self, prompts, limits, stop_ids):
        functions = self._functions()
        batch = prompts_lib.Batch(prompts, limits, stop_ids, functions.sampler.next_seed())
        beams = functions.beams or 1
        constants = engine.Constants(
            prompt_lengths=ops.convert_to_tensor(np.repeat(batch.lengths, beams)),
            limits=ops.convert_to_tensor(np.repeat(batch.limits, beams)),
            stop_ids=ops.convert_to_tensor(batch.stop_row),
            seed=ops.convert_to_tensor(batch.seed),
            prefill_width=ops.convert_to_tensor(np.int32(batch.width)),
        )
        (_, width), *later = prompts_lib.chunks(batch.width)
        cache, hidden = functions.start(batch.cache_length)(
            ops.convert_to_tensor(batch.token_ids[:, :width]), ops.convert_to_tensor(batch.padding_mask[:, :width])
        )
        for start, width in later:
            columns = slice(start, start + width)
            cache, hidden = functions.chunk(
                *(ops.convert_to_tensor(a[:, columns]) for a in (batch.token_ids, batch.padding_mask, batch.positions)),
                ops.convert_to_tensor(np.int32(start)),
                cache,
            )
        if functions.beams:
            cache, hidden = functions.repeat_beams(cache, hidden)
            out = ops.zeros((len(prompts.ids) * functions.beams, batch.new), "int32")
            return functions, batch, functions.first_token(hidden, cache, out, constants), constants
        out = ops.zeros((len(prompts.ids), batch.new), "int32")
        state = functions.first_token(hidden, out, constants)._replace(cache=cache)
        return functions, batch, state, constants

    def generate(
        self, inputs, max_length=None, max_new_tokens=None, stop_token_ids="auto", strip_prompt=False, tools=None
    ):
        """Continues prompts with the sampler from `compile` (greedy by default).

        Args:
            inputs: a string, a list of strings (any lengths), a
                conversation (a list of `{"role", "content"}` dicts; the chat
                template is applied), a list of conversations, or
                pre-tokenized `{"token_ids": (b, t), "padding_mask": (b, t)}`
                (either padding side; works without a preprocessor).
            max_length: the most tokens a row may hold, prompt included
                (keras-hub's meaning). Defaults to the preprocessor's
                `sequence_length`, else 1024, when `max_new_tokens` is not
                given either.
            max_new_tokens: the most tokens each row may add.
            stop_token_ids: `"auto"` (`<eos>` and `<end_of_turn>`; Gemma 4
                also `<|tool_response>`), None
                (never stop early), or a list of ids and vocabulary pieces
                (`[108, "<end_of_turn>"]`). Each row stops on its own; the
                stop token ends the row.
            strip_prompt: return only the new text/tokens.
            tools: Gemma 4: functions a conversation's model may call
                (`chat_template.apply_chat_template`'s `tools`); None: the
                preprocessor's `tools`.

        Returns:
            Text in, text out (a string, or a list for a batch); token ids in,
            `{"token_ids", "padding_mask"}` out, right-padded, each row the
            prompt's real tokens then the new ones (stop token included).

        Raises:
            ValueError: an empty prompt, a prompt longer than `max_length`, a
                negative `max_new_tokens`, text without a tokenizer, a stop
                token outside the vocabulary.

        Example:
        ```python
        lm.generate(["The capital of France is", "1, 2, 3,"], max_new_tokens=16)
        lm.generate([{"role": "user", "content": "Hi!"}], strip_prompt=True)
        lm.generate({"token_ids": ids, "padding_mask": mask}, max_new_tokens=8)
        ```
        """
        prompts, limits, stop_ids = self._prepare(inputs, max_length, max_new_tokens, stop_token_ids, tools)
        if limits.max() == 0:
            rows = [[] for _ in prompts.ids]
        else:
            functions, batch, state, constants = self._start(prompts, limits, stop_ids)
            if limits.max() > 1:  # else the prefill's token is all there is
                state = functions.loop(state, constants)
            if functions.beams:  # each prompt's best finished beam
                out = ops.convert_to_numpy(state.best)[:: functions.beams]
            else:
                out = ops.convert_to_numpy(state.out)
            rows = prompts_lib.finish_rows(out, limits, stop_ids)
        return prompts_lib.format_outputs(self, prompts, rows, strip_prompt)

    def stream_token_ids(self, inputs, max_length=None, max_new_tokens=None, stop_token_ids="auto", tools=None):
        """Yields each step's new token ids: `(b,)` int arrays, -1 for rows
        already finished. Takes what `generate` takes."""
        if getattr(self.sampler, "num_beams", None):
            raise ValueError(
                "Beam search cannot stream: a later step may replace any earlier token. "
                "Call `generate`, or compile with another sampler to stream."
            )
        prompts, limits, stop_ids = self._prepare(inputs, max_length, max_new_tokens, stop_token_ids, tools)
        if limits.max() == 0:
            return
        functions, batch, state, constants = self._start(prompts, limits, stop_ids)
        finished = limits <= 0
        max_steps = int(limits.max())
        for step in range(max_steps):
            if step:
                state = functions.step(state, constants)
            token = ops.convert_to_numpy(state.token).astype(np.int64)
            done = np.array(ops.convert_to_numpy(state.done))  # copies: `step` donates state
            yield np.where(finished, -1, token)
            finished = finished | done
            if finished.all():
                return

    def stream_generate(self, inputs, max_length=None, max_new_tokens=None, stop_token_ids="auto", tools=None):
        """Yields the new text piece by piece as it is decoded.

        For one prompt (a string or a conversation) each item is a string;
        for a batch, a list of strings (empty for rows with nothing new).
        The pieces of a row join to `generate(..., strip_prompt=True)`.

        Example:
        ```python
        for piece in lm.stream_generate("Once upon a time", max_new_tokens=64):
            print(piece, end="", flush=True)
        ```
        """
        prompts = prompts_lib.normalize_inputs(self, inputs, tools)
        if prompts.form != "text":
            raise ValueError("`stream_generate` streams text; use `stream_token_ids` for token ids.")
        streams = [prompts_lib.TextStream(self) for _ in prompts.ids]
        for tokens in self.stream_token_ids(inputs, max_length, max_new_tokens, stop_token_ids, tools):
            pieces = [stream.push(t) if t >= 0 else "" for stream, t in zip(streams, tokens)]
            if any(pieces):
                yield pieces[0] if prompts.scalar else pieces
        pieces = [stream.finish() for stream in streams]
        if any(pieces):
            yield pieces[0] if prompts.scalar else pieces

    # -- chat ------------------------------------------------------------------

    def chat(self, messages, max_new_tokens=None, max_length=None, stop_token_ids="auto", stream=False, tools=None):
        """The model's reply to a conversation, as text.

        A base (pretrained, not instruction-tuned) model has never seen the
        chat format: the first `chat` on one warns once and names the
        instruct preset of its size.

        Args:
            messages: a list of `{"role": "user"|"assistant"|"system",
                "content": str}` dicts, or one user message as a string.
            max_new_tokens, max_length: as in `generate`.
            stop_token_ids: as in `generate`, except that `"auto"` also
                ends the reply where the model opens a new turn, as well as
                on `<end_of_turn>` (Gemma 4: `<turn|>`) and `<eos>`: on
                `<start_of_turn>` (Gemma 4: `<|turn>`), or a
                turn header written as text (the piece "user" or "model",
                then a newline), as a base model writes it. One
                conversation's reply is decoded step by step so that it
                stops there; a batch of conversations, or beam search, runs
                `generate` (stop tokens only).
            stream: return a generator of text pieces instead (see
                `stream_chat`).
            tools: Gemma 4: functions the model may call, as in `generate`.
                A reply that calls them keeps its `<|tool_call>...<tool_call|>`
                text (`tool_calls.parse_tool_calls` reads it) and ends where
                the model yields to the tool (`<|tool_response>`).

        Returns:
            The reply text, without turn markers. The conversation is written
            in the tokenizer's chat format; for Gemma 4's thinking set
            `lm.preprocessor.enable_thinking = True`, and the reply keeps its
            thought markers (`chat_template.split_thinking` separates them).

        Example:
        ```python
        history = [{"role": "user", "content": "Name a colour."}]
        reply = lm.chat(history, max_new_tokens=32)
        history += [{"role": "assistant", "content": reply},
                    {"role": "user", "content": "Another?"}]
        for piece in lm.chat(history, stream=True):
            print(piece, end="")
        ```
        """
        messages = _as_conversation(messages)
        _warn_once_if_base_model(self)
        if stream:
            return self.stream_chat(messages, max_new_tokens, max_length, stop_token_ids, tools)
        if getattr(self.sampler, "num_beams", None) or not _is_one_conversation(messages):
            return self.generate(
                messages, max_length=max_length, max_new_tokens=max_new_tokens,
                stop_token_ids=_chat_stop_ids(self, stop_token_ids), strip_prompt=True, tools=tools,
            )
        return "".join(self.stream_chat(messages, max_new_tokens, max_length, stop_token_ids, tools))

    def stream_chat(self, messages, max_new_tokens=None, max_length=None, stop_token_ids="auto", tools=None):
        """Yields the reply to a conversation piece by piece; the pieces join
        to what `chat` returns (same stop tokens, same base-model warning)."""
        messages = _as_conversation(messages)
        _warn_once_if_base_model(self)
        stop_ids = _chat_stop_ids(self, stop_token_ids)
        if not _is_one_conversation(messages):
            return self.stream_generate(messages, max_length, max_new_tokens, stop_ids, tools)
        return _stream_reply(self, messages, max_length, max_new_tokens, stop_ids, _is_auto(stop_token_ids), tools)

    # -- score -----------------------------------------------------------------

    def score(
        self,
        inputs=None,
        padding_mask=None,
        scoring_mode="log_probs",
        layer_intercept_fn=None,
        target_ids=None,
        *,
        token_ids=None,
    ):
        """Scores tokens: log-probabilities by default, or keras-hub's
        `"logits"` and `"loss"` modes (same arguments, in the same order).

        Args:
            inputs: text (a string or list of strings; `<bos>` is added), or
                token ids `(b, t)` / `{"token_ids", "padding_mask"}` with
                either padding side (`token_ids=` as a keyword too).
            padding_mask: with token ids as an array, 1 for real tokens.
            scoring_mode:
                - `"log_probs"`: the log-probability of every token given the
                  real tokens before it (below), as numpy.
                - `"logits"`: float32 logits `(b, t, vocab)`, position j's
                  for the token after j (token ids only).
                - `"loss"`: `(b, t)` cross-entropy of `target_ids[:, j]`
                  under position j's logits (token ids only; padding is not
                  masked out).
                `"logits"` and `"loss"` return backend tensors, so gradients
                flow through them (to what `layer_intercept_fn` touches).
            layer_intercept_fn: `fn(x, i) -> x`, called on the token
                embeddings (`i = -1`, before their `sqrt(hidden_dim)`
                scaling) and on each decoder block's output (`i = 0, 1,
                ...`); what it returns goes on (for `i = -1` too, which
                keras-hub drops). To read or steer activations.
            target_ids: `(b, t)` int, for `"loss"`.

        Returns:
            `"log_probs"` with token ids: float32 `(b, t)`, entry `[i, j]`
            the natural-log probability of `token_ids[i, j]` after the real
            tokens before it; 0 for padding and for each row's first token
            (nothing predicts it). With text: `{"token_ids",
            "padding_mask", "log_probs"}` (right-padded). A single prompt
            drops the batch axis.

        Rotary positions count real tokens only, so a left-padded row
        scores as it would alone (keras-hub counts the padding).

        Example:
        ```python
        out = lm.score(["The sky is blue.", "The sky is cheese."])
        total = out["log_probs"].sum(axis=-1)  # higher: more likely
        loss = lm.score(ids, mask, scoring_mode="loss", target_ids=np.roll(ids, -1, axis=1))
        ```
        """
        if token_ids is not None:
            if inputs is not None:
                raise ValueError("Pass the tokens to `score` once: as `inputs` or as `token_ids`, not both.")
            inputs = token_ids
        if inputs is None:
            raise ValueError("`score` needs text or token ids to score.")
        if scoring_mode not in ("log_probs", "logits", "loss"):
            raise ValueError(f"`scoring_mode` must be 'log_probs', 'logits' or 'loss', got {scoring_mode!r}.")
        if scoring_mode == "loss" and target_ids is None:
            raise ValueError("`scoring_mode='loss'` needs `target_ids`: the ids each position's loss is taken against.")
        tokens = isinstance(inputs, dict) or hasattr(inputs, "shape")
        if tokens and not isinstance(inputs, dict):
            inputs = {"token_ids": inputs, "padding_mask": padding_mask}
        if scoring_mode != "log_probs":
            if not tokens:
                raise ValueError(
                    f"`scoring_mode={scoring_mode!r}` takes token ids, as keras-hub's does; "
                    "text is scored in the default 'log_probs' mode."
                )
            return self._score_logits(inputs, scoring_mode, layer_intercept_fn, target_ids)
        if tokens:
            ids, mask, scalar = prompts_lib.token_arrays(inputs)
            log_probs = self._score(ids, mask, layer_intercept_fn)
            return log_probs[0] if scalar else log_probs
        prompts = prompts_lib.normalize_inputs(self, inputs)
        if prompts.form != "text":
            raise ValueError("`score` takes text or token ids.")
        width = max(len(row) for row in prompts.ids)
        ids = np.zeros((len(prompts.ids), width), np.int32)
        mask = np.zeros((len(prompts.ids), width), bool)
        for i, row in enumerate(prompts.ids):
            ids[i, : len(row)], mask[i, : len(row)] = row, True
        log_probs = self._score(ids, mask, layer_intercept_fn)
        result = {"token_ids": ids, "padding_mask": mask, "log_probs": log_probs}
        return {k: v[0] for k, v in result.items()} if prompts.scalar else result

    def _score(self, token_ids, mask, layer_intercept_fn=None):
        hidden, _ = self.backbone.hidden_states(token_ids.astype(np.int32), mask, layer_intercept_fn=layer_intercept_fn)
        targets = ops.convert_to_tensor(token_ids[:, 1:].astype(np.int32))
        chunks = []
        for start in range(0, token_ids.shape[1] - 1, SCORE_CHUNK):
            end = min(start + SCORE_CHUNK, token_ids.shape[1] - 1)
            logits = self.logits(hidden[:, start:end])  # (b, chunk, vocab), float32
            log_probs = ops.log_softmax(logits, axis=-1)
            picked = ops.take_along_axis(log_probs, targets[:, start:end, None], axis=-1)[..., 0]
            chunks.append(ops.convert_to_numpy(picked))
        scores = np.zeros(token_ids.shape, np.float32)
        if chunks:
            scores[:, 1:] = np.concatenate(chunks, axis=1)
        scores[:, 1:] *= mask[:, 1:] & mask[:, :-1]
        return scores

    def _score_logits(self, inputs, scoring_mode, layer_intercept_fn, target_ids):
        """`score`'s keras-hub modes, as backend tensors (differentiable);
        `"loss"` without the full logits (`losses.token_cross_entropy`)."""
        token_ids = ops.cast(inputs["token_ids"], "int32")
        if len(ops.shape(token_ids)) != 2:
            raise ValueError(f"`token_ids` must be (batch, length), got shape {tuple(ops.shape(token_ids))}.")
        hidden, _ = self.backbone.hidden_states(
            token_ids, inputs.get("padding_mask"), layer_intercept_fn=layer_intercept_fn
        )
        if scoring_mode == "logits":
            return self.logits(hidden)
        target_ids = ops.cast(target_ids, "int32")
        if tuple(ops.shape(target_ids)) != tuple(ops.shape(token_ids)):
            raise ValueError(
                f"`target_ids` must have the shape of `token_ids`, {tuple(ops.shape(token_ids))}; "
                f"got {tuple(ops.shape(target_ids))}."
            )
        with precision.matmul_precision(self.backbone.compute_dtype):
            table = self.backbone.token_embedding.table(hidden.dtype)
            return losses.token_cross_entropy(hidden, table, target_ids, softcap=self.config.final_logit_softcap)


class _GenerationState:
    """The sampler and its compiled functions (a plain object Keras leaves alone)."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.functions = None


def _as_conversation(messages):
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if isinstance(messages, (list, tuple)) and not messages:
        raise ValueError(
            "The conversation is empty: pass at least one user message, e.g. "
            '`lm.chat([{"role": "user", "content": "Hi!"}])` or `lm.chat("Hi!")`.'
        )
    return messages


def _is_one_conversation(messages):
    return isinstance(messages, (list, tuple)) and all(isinstance(m, dict) for m in messages)


def _stream_reply(lm, messages, max_length, max_new_tokens, stop_ids, end_at_written_turn, tools=None):
    """One conversation's reply, piece by piece. With `end_at_written_turn`,
    it also ends where the model writes a turn header as plain text: the
    piece "user" or "model" (no leading space) followed by a newline, which is
    how a base model that never learnt the `<start_of_turn>` token opens the
    user's next turn ("Hello mendatanguser\nHello ..." on the base 270M)."""
    tokenizer = prompts_lib.tokenizer_of(lm)
    stream = prompts_lib.TextStream(lm)
    roles, newline = set(), None
    if end_at_written_turn and hasattr(tokenizer, "token_to_id"):
        unk = getattr(tokenizer, "unk_token_id", None)
        roles = {tokenizer.token_to_id(role) for role in ("user", "model")} - {unk}
        newline = tokenizer.token_to_id("\n")
        newline = None if newline == unk else newline
    held = None  # a role piece, until the next token shows whether a newline follows
    for tokens in lm.stream_token_ids(messages, max_length, max_new_tokens, stop_ids, tools):
        token = int(tokens[0])
        if token < 0:
            break
        if held is not None:
            if token == newline:
                held = None
                break  # the model opened the next turn
            piece, held = stream.push(held), None
            if piece:
                yield piece
        if token in roles and newline is not None:
            held = token
            continue
        piece = stream.push(token)
        if piece:
            yield piece
    if held is not None:
        stream.push(held)
    piece = stream.finish()
    if piece:
        yield piece


def _is_auto(stop_token_ids):
    return isinstance(stop_token_ids, str) and stop_token_ids == "auto"


def _chat_stop_ids(lm, stop_token_ids):
    """`"auto"` for a chat: `generate`'s (`<eos>`, `<end_of_turn>`; Gemma 4
    also `<|tool_response>`, where the model yields to a tool) and
    `<start_of_turn>` (a reply also ends where the model opens the next turn)."""
    if not _is_auto(stop_token_ids):
        return stop_token_ids
    tokenizer = prompts_lib.tokenizer_of(lm)
    ids = [getattr(tokenizer, name, None) for name in ("eos_token_id", "end_of_turn_id", "start_of_turn_id")]
    if tokenizer is None or None in ids:
        return stop_token_ids  # no tokenizer to ask: `generate`'s "auto"
    return sorted(set(prompts_lib.resolve_stop_ids(lm, "auto")) | {tokenizer.start_of_turn_id})


def base_model_warning(lm):
    """The warning `chat` gives on a base (not instruction-tuned) model, or
    None: for a model built from a config, or where instruct or not is unknown."""
    handle = getattr(lm, "preset_handle", None)
    if handle is None or _is_instruct(handle) is not False:
        return None
    instruct = _instruct_presets_like(lm.config)
    advice = f"an instruction-tuned checkpoint ({', '.join(instruct)})" if instruct else "an instruction-tuned checkpoint"
    return (
        f"{handle} is a base (pretrained) model, not instruction-tuned: it has never seen the chat "
        f"format, so its replies ramble or go on to write the user's next turn. For chat, load "
        f"{advice}, or teach this one with LoRA (examples/finetune.py)."
    )


def _warn_once_if_base_model(lm):
    """Warns on a base model's first `chat`."""
    if getattr(lm, "_chat_kind_checked", False):
        return
    lm._chat_kind_checked = True
    message = base_model_warning(lm)
    if message:
        warnings.warn(message, UserWarning, stacklevel=3)


def _is_instruct(handle):
    """True or False where the handle's preset or GGUF metadata says, else None.

    A built-in name or Kaggle handle: the registry's `instruct`. A GGUF file:
    llama.cpp writes `general.finetune` ("it") for instruction-tuned Gemma,
    and the name carries "it"/"instruct"; without either it is taken as base.
    Other directories and `hf://` names: "-it"/"instruct" in the name, else
    unknown (None).
    """
    import os
    import re

    from keras_gemma.presets import PRESETS

    handle = os.fspath(handle)
    name = handle.rstrip("/").split("/")
    if handle.startswith("kaggle://") and len(name) >= 6:  # kaggle://owner/model/keras/<variation>/<version>
        variation = name[5]
    else:
        variation = handle
    if variation in PRESETS:
        return PRESETS[variation].instruct
    instruct_words = re.compile(r"(^|[-_. ])(it|instruct)([-_. ]|$)", re.IGNORECASE)
    words = [os.path.basename(handle.rstrip("/"))]
    path = os.path.expanduser(handle)
    if path.endswith(".gguf") and os.path.isfile(path):
        try:
            from keras_gemma.checkpoints import gguf_format

            metadata = gguf_format.open_reader(path).metadata
            words += [str(metadata[key]) for key in ("general.finetune", "general.name") if key in metadata]
        except Exception:  # unreadable metadata: decide from the file name alone
            pass
        return any(instruct_words.search(w) for w in words)
    return True if any(instruct_words.search(w) for w in words) else None


def _instruct_presets_like(config):
    """Names of the instruct presets with `config`'s architecture."""
    from keras_gemma.presets import PRESETS

    key = (config.num_layers, config.hidden_dim, config.vocabulary_size)
    return [
        p.name for p in PRESETS.values()
        if p.instruct and (p.config.num_layers, p.config.hidden_dim, p.config.vocabulary_size) == key
        and "shieldgemma" not in p.name and "code_gemma" not in p.name
    ]
