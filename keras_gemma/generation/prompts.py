"""Host-side prompt handling: what goes into the compiled engine and what
comes out of it.

Strings, conversations and token arrays become `Prompts` (token-id lists);
`new_token_limits` and `resolve_stop_ids` give each row its budget and stop
tokens; `Batch` left-pads the prompts to a bucketed width. The engine's
output buffer comes back through `finish_rows` and `format_outputs`, or
piece by piece through `TextStream`.

Shapes are bucketed so that compiled functions get reused: the prompt width
to 16, 32, 64, then multiples of 64; the cache length (real prompt and new
tokens, also the new-token buffer's) coarsely, to powers of two up to 512
and then multiples of 512. A padded prompt runs as chunks whose widths are
powers of two (`chunks`: 448 = 256 + 128 + 64), so a growing chat, whose
prompt widens by a bucket or more every turn, reuses the same few chunk
functions and the same decode loop instead of compiling new ones per turn.

Only numpy and the tokenizer here; nothing is compiled.
"""

import numpy as np

from keras import ops

from keras_gemma import chat_template

PAD_ID = 0
EOS_ID = 1
BUCKET = 64
COARSE_BUCKET = 512  # cache length and new-token buffer
STOP_SLOTS = 4  # stop-id vector padded to a multiple of this (fewer shapes)
DEFAULT_MAX_LENGTH = 1024
# <end_of_turn> where there is no tokenizer to ask, known from the vocabulary
# size: 107 in Gemma 1/2's 256k vocabulary, 106 in Gemma 3's 262k one (where
# Gemma 4 keeps its <turn|>).
END_OF_TURN_BY_VOCABULARY = {256_000: 107, 262_144: 106}


def bucket(n, multiple=BUCKET):
    """A static size for `n`: 16, 32 or 64, then a multiple of `multiple`.

    Few enough sizes that compiled functions get reused, fine enough that
    padding wastes little (a 16-token prompt is not run as 64).
    """
    if n <= multiple:
        return max(16, 1 << (max(n, 1) - 1).bit_length())
    return -(-n // multiple) * multiple


def chunks(width):
    """`(start, size)` of the chunks a padded prompt width runs as: the
    largest power of two first, then what is left as decreasing powers of
    two (each start a multiple of its size)."""
    out, start = [], 0
    while start < width:
        size = 1 << ((width - start).bit_length() - 1)
        out.append((start, size))
        start += size
    return out


def tokenizer_of(lm):
    """The tokenizer behind `lm.preprocessor` (or a tokenizer set there), or None."""
    preprocessor = getattr(lm, "preprocessor", None)
    if preprocessor is None:
        return None
    return getattr(preprocessor, "tokenizer", preprocessor)


def _need_tokenizer(lm, what):
    tokenizer = tokenizer_of(lm)
    if tokenizer is None or not hasattr(tokenizer, "tokenize"):
        raise ValueError(
            f"{what} needs a tokenizer: build the model with "
            "`preprocessor=GemmaCausalLMPreprocessor(tokenizer)`, or pass "
            "pre-tokenized `{'token_ids': ..., 'padding_mask': ...}`."
        )
    return tokenizer


def _allow_system(lm):
    preprocessor = getattr(lm, "preprocessor", None)
    return getattr(preprocessor, "allow_system", True)


def render_chat(lm, messages, tools=None):
    """A conversation as prompt text in the tokenizer's chat format, `<bos>`
    left to `encode_text`; `tools` (None: the preprocessor's) declared."""
    chat_format = getattr(tokenizer_of(lm), "chat_format", chat_template.GEMMA)
    if tools is None:
        tools = getattr(lm.preprocessor, "tools", None)
    return chat_template.apply_chat_template(
        messages, add_generation_prompt=True, bos_token="",
        allow_system=_allow_system(lm), chat_format=chat_format,
        enable_thinking=getattr(lm.preprocessor, "enable_thinking", False), tools=tools,
    )


def encode_text(lm, texts):
    """Token ids of each text with `<bos>` first (not doubled if present)."""
    tokenizer = _need_tokenizer(lm, "Text input")
    bos = tokenizer.bos_token_id
    ids = [list(row) for row in tokenizer.tokenize(list(texts))]
    if not getattr(lm.preprocessor, "add_start_token", True):
        return ids
    return [row if row[:1] == [bos] else [bos] + row for row in ids]


class Prompts:
    """Prompts as host lists, and how to give results back.

    Attributes:
        ids: list of token-id lists (real tokens only).
        texts: the prompt texts (text input) or None.
        form: "text" or "tokens".
        scalar: the input was one prompt, not a batch.
    """

    def __init__(self, ids, texts, form, scalar):
        self.ids, self.texts, self.form, self.scalar = ids, texts, form, scalar


def normalize_inputs(lm, inputs, tools=None):
    """Strings, conversations (with `tools` declared, None: the
    preprocessor's), or `{"token_ids", "padding_mask"}` as `Prompts`."""
    if isinstance(inputs, (str, bytes)):
        inputs, scalar = [inputs], True
    elif chat_template.is_conversation(inputs):
        inputs, scalar = [inputs], True
    elif isinstance(inputs, dict):
        return _token_prompts(inputs)
    elif hasattr(inputs, "shape") and not isinstance(inputs, (list, tuple)):
        return _token_prompts({"token_ids": inputs})
    elif isinstance(inputs, (list, tuple)) and inputs and all(
        isinstance(x, (str, bytes)) or chat_template.is_conversation(x) for x in inputs
    ):
        inputs, scalar = list(inputs), False
    else:
        raise ValueError(
            "`inputs` must be a string, a list of strings, a conversation "
            "(list of {'role', 'content'} dicts), a list of conversations, or "
            f"a dict of 'token_ids' and 'padding_mask'; got {inputs!r:.200}."
        )
    texts = []
    for i, item in enumerate(inputs):
        if isinstance(item, bytes):
            item = item.decode("utf-8")
        if isinstance(item, str):
            if not item:
                raise ValueError(f"Prompt {i} is an empty string: give the model some text to continue.")
            texts.append(item)
        else:
            texts.append(render_chat(lm, item, tools))
    return Prompts(encode_text(lm, texts), texts, "text", scalar)


def token_arrays(inputs):
    """`(token_ids (b, t), padding_mask (b, t) bool, scalar)` as numpy from
    `{"token_ids", "padding_mask"}` (a missing mask: every token real)."""
    token_ids = np.asarray(ops.convert_to_numpy(inputs["token_ids"]))
    mask = inputs.get("padding_mask")
    mask = np.ones(token_ids.shape, bool) if mask is None else np.asarray(ops.convert_to_numpy(mask)).astype(bool)
    scalar = token_ids.ndim == 1
    if scalar:
        token_ids, mask = token_ids[None], mask[None]
    return token_ids, mask, scalar


def _token_prompts(inputs):
    if "token_ids" not in inputs:
        raise ValueError(f"A dict input needs 'token_ids' (and optionally 'padding_mask'); got keys {sorted(inputs)}.")
    token_ids, mask, scalar = token_arrays(inputs)
    if token_ids.ndim != 2 or mask.shape != token_ids.shape:
        raise ValueError(
            "'token_ids' must be (batch, length) or (length,), with a "
            f"'padding_mask' of the same shape; got {token_ids.shape} and {mask.shape}."
        )
    if not np.issubdtype(token_ids.dtype, np.integer):
        raise ValueError(f"'token_ids' must be integers, got {token_ids.dtype}.")
    ids = [row[keep].astype(int).tolist() for row, keep in zip(token_ids, mask)]
    return Prompts(ids, None, "tokens", scalar)


def resolve_stop_ids(lm, stop_token_ids):
    """"auto": `<eos>` and `<end_of_turn>` (Gemma 4: `<turn|>` and
    `<|tool_response>`); None: never stop; or the given ids and vocabulary
    pieces (`["<end_of_turn>", 108]`)."""
    if stop_token_ids is None:
        return ()
    if isinstance(stop_token_ids, str):
        if stop_token_ids != "auto":
            raise ValueError(
                f'`stop_token_ids` must be "auto", None or a list of ids or pieces, got {stop_token_ids!r}.'
            )
        tokenizer = tokenizer_of(lm)
        if tokenizer is not None and hasattr(tokenizer, "eos_token_id"):
            ids = (
                tokenizer.eos_token_id,
                getattr(tokenizer, "end_of_turn_id", None),
                getattr(tokenizer, "tool_response_id", None),
            )
        else:
            ids = (EOS_ID, END_OF_TURN_BY_VOCABULARY.get(lm.config.vocabulary_size))
        return tuple(sorted({i for i in ids if i is not None}))
    if isinstance(stop_token_ids, (int, np.integer)):
        stop_token_ids = [stop_token_ids]
    vocabulary = lm.config.vocabulary_size
    ids = set()
    for item in stop_token_ids:
        if isinstance(item, str):
            ids.add(_piece_id(lm, item))
        elif isinstance(item, (int, np.integer)) and not isinstance(item, bool) and 0 <= item < vocabulary:
            ids.add(int(item))
        else:
            raise ValueError(
                f"`stop_token_ids` holds {item!r}: each must be a token id in [0, {vocabulary}) "
                'or a vocabulary piece such as "<end_of_turn>".'
            )
    return tuple(sorted(ids))


def _piece_id(lm, piece):
    """The id of one vocabulary piece (a stop token given as text)."""
    tokenizer = _need_tokenizer(lm, f"A stop token given as text ({piece!r})")
    token_id = int(tokenizer.token_to_id(piece))  # unknown pieces give <unk>'s id
    if tokenizer.id_to_token(token_id) != piece:
        raise ValueError(
            f"Stop token {piece!r} is not a piece of the vocabulary; give its id, or a piece "
            'such as "<end_of_turn>" (`lm.preprocessor.tokenizer.get_vocabulary()` lists them).'
        )
    return token_id


def new_token_limits(lm, prompts, max_length, max_new_tokens):
    """How many tokens each row may add (a row stops early on a stop token)."""
    lengths = np.array([len(row) for row in prompts.ids])
    for i, row in enumerate(prompts.ids):
        if not row:
            raise ValueError(f"Prompt {i} is empty: it has no real (unpadded) tokens.")
    for name, value in (("max_length", max_length), ("max_new_tokens", max_new_tokens)):
        if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool)):
            raise ValueError(f"`{name}` must be an integer or None, got {value!r}.")
    if max_new_tokens is not None and max_new_tokens < 0:
        raise ValueError(f"`max_new_tokens` must be >= 0, got {max_new_tokens}.")
    if max_length is not None and max_length < 1:
        raise ValueError(f"`max_length` must be positive, got {max_length}.")
    if max_length is None and max_new_tokens is None:
        max_length = getattr(getattr(lm, "preprocessor", None), "sequence_length", None) or DEFAULT_MAX_LENGTH
        max_length = min(max_length, lm.config.max_sequence_length)
        if lengths.max() >= max_length:
            raise ValueError(
                f"The longest prompt has {lengths.max()} tokens, which leaves no room "
                f"under the default max_length={max_length}: pass `max_new_tokens` or a larger `max_length`."
            )
    limits = np.full(len(lengths), np.iinfo(np.int32).max, np.int64)
    if max_length is not None:
        too_long = np.flatnonzero(lengths > max_length)
        if too_long.size:
            i = int(too_long[0])
            raise ValueError(
                f"Prompt {i} has {lengths[i]} tokens, more than max_length={max_length} "
                "(prompt and generated tokens together)."
            )
        limits = np.minimum(limits, max_length - lengths)
    if max_new_tokens is not None:
        limits = np.minimum(limits, max_new_tokens)
    needed = int((lengths + limits).max())
    if needed > lm.config.max_sequence_length:
        raise ValueError(
            f"Prompt and new tokens need {needed} positions, more than the "
            f"model's max_sequence_length={lm.config.max_sequence_length}."
        )
    return limits.astype(np.int32)


class Batch:
    """Left-padded prompts and the buffers one compiled call needs."""

    def __init__(self, prompts, limits, stop_ids, seed):
        lengths = np.array([len(row) for row in prompts.ids], np.int32)
        self.width = bucket(int(lengths.max()))  # p
        # Slots for the longest prompt's real tokens and every new token:
        # indices run to `width + max(limits) - 2` (the last token is never
        # fed), and an index past the cache's end lands on the slot of one
        # `cache_length` earlier, which no row holds a real token at (all
        # are left padding there). So a chat with a fixed `max_length` keeps
        # one cache length (and one decode loop) however its prompt is
        # padded.
        self.cache_length = bucket(int(lengths.max()) + int(limits.max()), COARSE_BUCKET)
        # The new-token buffer (n) as long as the cache: one decode loop per
        # cache length, whatever the budget (int32, 4 bytes a slot and row).
        self.new = self.cache_length
        batch = len(lengths)
        self.token_ids = np.full((batch, self.width), PAD_ID, np.int32)
        self.padding_mask = np.zeros((batch, self.width), bool)
        for i, row in enumerate(prompts.ids):
            self.token_ids[i, self.width - len(row):] = row
            self.padding_mask[i, self.width - len(row):] = True
        # Rotary positions, as `backbone.hidden_states` counts them.
        self.positions = np.maximum(np.cumsum(self.padding_mask, axis=1, dtype=np.int32) - 1, 0)
        size = max(STOP_SLOTS, -(-len(stop_ids) // STOP_SLOTS) * STOP_SLOTS)
        # What the compiled functions take (`engine.Constants`), as numpy.
        self.lengths = lengths
        self.limits = limits.astype(np.int32)
        self.stop_row = np.array(list(stop_ids) + [-1] * (size - len(stop_ids)), np.int32)  # -1: no stop
        self.seed = np.array(seed, np.int32)
        self.stop_ids = stop_ids


def finish_rows(out, limits, stop_ids):
    """Host: each row's new tokens, cut after its first stop token (kept)."""
    rows = []
    for tokens, limit in zip(np.asarray(out), limits):
        tokens = tokens[: int(limit)].tolist()
        for j, token in enumerate(tokens):
            if token in stop_ids:
                tokens = tokens[: j + 1]
                break
        rows.append(tokens)
    return rows


def detokenize(lm, ids):
    """Text of new tokens: control tokens (stop tokens, turn markers) dropped,
    except the chat format's thought and tool-call markers (Gemma 4's
    `<|channel>`, `<channel|>`, `<|tool_call>`, `<tool_call|>`, `<|"|>`), so
    that `chat_template.split_thinking` and `tool_calls.parse_tool_calls` can
    read a reply."""
    tokenizer = _need_tokenizer(lm, "Text output")
    markers = getattr(getattr(tokenizer, "chat_format", None), "reply_markers", None) or ()
    keep = {tokenizer.token_to_id(marker) for marker in markers} - {tokenizer.unk_token_id}
    if not keep:
        return tokenizer.detokenize(list(ids), skip_special_tokens=True)
    text, run = [], []
    for token in ids:
        if int(token) in keep:
            text += [tokenizer.detokenize(run, skip_special_tokens=True), tokenizer.id_to_token(int(token))]
            run = []
        else:
            run.append(int(token))
    return "".join(text) + tokenizer.detokenize(run, skip_special_tokens=True)


def format_outputs(lm, prompts, rows, strip_prompt):
    """Text in, text out; tokens in, `{"token_ids", "padding_mask"}` out."""
    if prompts.form == "text":
        texts = [detokenize(lm, row) for row in rows]
        if not strip_prompt:
            texts = [prompt + text for prompt, text in zip(prompts.texts, texts)]
        return texts[0] if prompts.scalar else texts
    sequences = rows if strip_prompt else [p + r for p, r in zip(prompts.ids, rows)]
    width = max(1, max(len(s) for s in sequences))
    token_ids = np.full((len(sequences), width), PAD_ID, np.int32)
    padding_mask = np.zeros((len(sequences), width), bool)
    for i, sequence in enumerate(sequences):
        token_ids[i, : len(sequence)] = sequence
        padding_mask[i, : len(sequence)] = True
    if prompts.scalar:
        token_ids, padding_mask = token_ids[0], padding_mask[0]
    return {"token_ids": token_ids, "padding_mask": padding_mask}


class TextStream:
    """Turns token ids into text pieces as they come.

    Decodes the whole reply so far each time and hands out what is new, but
    holds text back while it ends in an incomplete UTF-8 byte sequence (a
    byte-fallback character split over tokens) or while a later token
    rewrote it, so the pieces always join to the final text.
    """

    def __init__(self, lm):
        self.lm = lm
        self.ids = []
        self.sent = ""

    def push(self, token_id):
        self.ids.append(int(token_id))
        text = detokenize(self.lm, self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece

    def finish(self):
        text = detokenize(self.lm, self.ids)
        piece, self.sent = text[len(self.sent):], text
        return piece
