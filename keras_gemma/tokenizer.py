"""Gemma's SentencePiece tokenizer as a Keras layer, in pure Python.

Runs on the `sentencepiece` library alone, so it never imports TensorFlow:
tokenizing is host-side work that every backend shares. Ids match Hugging Face
transformers (checked in `tests/test_tokenizer.py`), including its one habit
that plain SentencePiece lacks: control tokens written in text, such as
`<start_of_turn>` or `<eos>`, come out as their single ids.
"""

import os
import re

import keras
import numpy as np
import sentencepiece

from keras_gemma import chat_template
from keras_gemma.checkpoints import preset

VOCABULARY_FILENAME = "vocabulary.spm"  # keras-hub's name, under assets/tokenizer/


def _as_text(value):
    """A Python str from str, bytes or a numpy string scalar."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, str):
        return value
    if hasattr(value, "item"):  # numpy scalar or 0-d array
        return _as_text(value.item())
    raise TypeError(f"Expected a string, got {type(value).__name__}: {value!r}")


def _is_batch(inputs):
    return not isinstance(inputs, (str, bytes)) and not (
        hasattr(inputs, "ndim") and inputs.ndim == 0
    )


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaTokenizer(keras.layers.Layer):
    """Gemma's SentencePiece tokenizer.

    Turns strings into lists of token ids and back. No `<bos>` is added here;
    `GemmaCausalLMPreprocessor` adds it. Control tokens written as text (the
    turn markers `<start_of_turn>`/`<end_of_turn>`, Gemma 4's `<|turn>`,
    `<turn|>`, `<|think|>`, `<|channel>`, `<channel|>`, `<bos>`, `<eos>`,
    `<pad>`, ...) become their single ids, as in transformers and llama.cpp.

    The tokenizer carries its chat format (`chat_format`, a
    `chat_template.ChatFormat`): Gemma 4's where the vocabulary holds
    `<|turn>`/`<turn|>`, Gemma 1-3's otherwise. `start_of_turn_id` and
    `end_of_turn_id` are that format's turn markers, so generation stops on
    the right one; Gemma 4's also has `tool_response_id` (`<|tool_response>`,
    where the model stops after its tool calls; None in Gemma 1-3's format).

    Args:
        proto: a path to a SentencePiece model (`tokenizer.model`,
            `vocabulary.spm`) or its serialized bytes. May be `None` for a
            tokenizer whose vocabulary comes later through `load_assets()`.
        chat_format: `"gemma"`, `"gemma4"`, `"gemma4_e"` (Gemma 4 E2B/E4B)
            or None (the default: read from the vocabulary, which cannot tell
            Gemma 4's E models from the others; `from_preset` of a Hugging
            Face checkpoint reads its chat template instead).

    Example:

    ```python
    tokenizer = keras_gemma.GemmaTokenizer("tokenizer.model")
    ids = tokenizer("<start_of_turn>user\\nHi<end_of_turn>")  # list of ints
    tokenizer.detokenize(ids)
    tokenizer(["a batch", "of strings"])  # list of lists
    tokenizer.start_of_turn_id, tokenizer.end_of_turn_id  # 106, 107 (Gemma 1/2)
    tokenizer.chat_format.name  # "gemma", or "gemma4" for Gemma 4's vocabulary
    ```
    """

    file_assets = [VOCABULARY_FILENAME]

    def __init__(self, proto=None, chat_format=None, **kwargs):
        # keras-hub configs carry these; they do not apply here.
        for key in (
            "sequence_length", "add_bos", "add_eos", "config_file",
            "has_vision_tokens", "has_audio_tokens", "has_video_tokens",  # Gemma4Tokenizer
        ):
            kwargs.pop(key, None)
        kwargs.setdefault("dtype", "int32")
        super().__init__(**kwargs)
        # Inputs are Python strings: keep Keras from converting them.
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True
        self.built = True
        self.proto = None
        self._processor = None
        self._chat_format_name = chat_format
        self.chat_format = (
            chat_template.GEMMA if chat_format is None else chat_template.get_chat_format(chat_format)
        )
        if proto is not None:
            self.set_proto(proto)

    # -- vocabulary -----------------------------------------------------------

    def set_proto(self, proto):
        """Loads a SentencePiece model from a path or serialized bytes."""
        if isinstance(proto, (str, os.PathLike)):
            with open(proto, "rb") as f:
                proto = f.read()
        if not isinstance(proto, bytes):
            raise TypeError(
                "`proto` must be a path or the serialized model as bytes, "
                f"got {type(proto).__name__}."
            )
        processor = sentencepiece.SentencePieceProcessor()
        processor.LoadFromSerializedProto(proto)
        self.proto = proto
        self._processor = processor

        size = processor.GetPieceSize()
        self._pieces = [processor.IdToPiece(i) for i in range(size)]
        self._piece_ids = {piece: i for i, piece in enumerate(self._pieces)}
        # Control and unknown pieces are never matched in text by
        # SentencePiece; we match them ourselves, as transformers does.
        self._special_ids = {
            piece: i
            for i, piece in enumerate(self._pieces)
            if processor.IsControl(i) or processor.IsUnknown(i)
        }
        self._special_pattern = _special_token_pattern(self._special_ids)
        self._special_id_set = frozenset(self._special_ids.values())

        def lookup(piece):
            return self._piece_ids.get(piece)

        self.pad_token_id = lookup("<pad>")
        self.bos_token_id = lookup("<bos>")
        self.eos_token_id = lookup("<eos>")
        self.unk_token_id = processor.unk_id()
        if self._chat_format_name is None:
            self.chat_format = chat_template.chat_format_for_vocabulary(self._piece_ids)
        self.start_of_turn_id = lookup(self.chat_format.start_of_turn)
        self.end_of_turn_id = lookup(self.chat_format.end_of_turn)
        # Gemma 4's model ends a turn of tool calls on `<|tool_response>`.
        tools = self.chat_format.tools
        self.tool_response_id = lookup(tools.response[0]) if tools is not None else None
        for name in ("pad", "bos", "eos"):
            if getattr(self, f"{name}_token_id") is None:
                raise ValueError(f"The vocabulary has no `<{name}>` piece.")

    @classmethod
    def from_gguf(cls, path_or_reader, **kwargs):
        """Builds the tokenizer from a GGUF file's metadata.

        Tokenizes like transformers'
        `AutoTokenizer.from_pretrained(dir, gguf_file=...)` (and llama.cpp).
        The chat format comes from the file's chat template where it has one.
        See `keras_gemma/gguf_tokenizer.py` for what a naive rebuild gets wrong.

        Args:
            path_or_reader: a path to a `.gguf` file or a `gguf.GGUFReader`.
        """
        from keras_gemma.checkpoints.gguf_format import GGUFFile
        from keras_gemma.gguf_tokenizer import read_gguf_vocabulary, sentencepiece_proto_from_vocabulary

        if isinstance(path_or_reader, (str, os.PathLike)):
            path_or_reader = GGUFFile(path_or_reader)
        vocab = read_gguf_vocabulary(path_or_reader)
        if kwargs.get("chat_format") is None:
            # The file's chat template tells Gemma 4's E models from the others.
            template = vocab["chat_template"]
            chat_format = chat_template.chat_format_for_template(template) if isinstance(template, str) else None
            kwargs["chat_format"] = chat_format and chat_format.name
        return cls(proto=sentencepiece_proto_from_vocabulary(vocab), **kwargs)

    def _check_vocabulary(self):
        if self._processor is None:
            raise ValueError(
                "No vocabulary: pass `proto=` to GemmaTokenizer or call "
                "`load_assets(dir)` first."
            )

    def vocabulary_size(self):
        """Number of token ids."""
        self._check_vocabulary()
        return len(self._pieces)

    def get_vocabulary(self):
        """All pieces, in id order."""
        self._check_vocabulary()
        return list(self._pieces)

    def id_to_token(self, token_id):
        """The piece for an id."""
        self._check_vocabulary()
        if not 0 <= token_id < len(self._pieces):
            raise ValueError(
                f"Token id {token_id} is outside [0, {len(self._pieces)})."
            )
        return self._pieces[token_id]

    def token_to_id(self, token):
        """The id of a piece (`unk_token_id` if it is not in the vocabulary)."""
        self._check_vocabulary()
        return self._piece_ids.get(token, self.unk_token_id)

    # keras-hub's names for the same ids.
    @property
    def start_token_id(self):
        return self.bos_token_id

    @property
    def end_token_id(self):
        return self.eos_token_id

    @property
    def special_token_ids(self):
        """Ids that `generate_postprocess` drops from output."""
        ids = [self.pad_token_id, self.bos_token_id, self.eos_token_id, self.end_of_turn_id, self.tool_response_id]
        return sorted({i for i in ids if i is not None})

    # -- tokenize / detokenize -----------------------------------------------

    def tokenize(self, inputs):
        """Token ids of a string (list of int) or a batch (list of lists).

        No `<bos>`/`<eos>` is added. Accepts str, bytes, or a list / numpy
        array of them.
        """
        self._check_vocabulary()
        if not _is_batch(inputs):
            return self._tokenize_batch([_as_text(inputs)])[0]
        return self._tokenize_batch([_as_text(text) for text in inputs])

    def _tokenize_batch(self, texts):
        # Split each text on control tokens; encode all plain segments in one
        # batched (multithreaded) SentencePiece call; stitch back together.
        plan = []  # per text: list of int (special id) or index into `segments`
        segments = []
        for text in texts:
            parts = []
            for piece in self._split_special(text):
                if isinstance(piece, int):
                    parts.append(piece)
                else:
                    parts.append(("s", len(segments)))
                    segments.append(piece)
            plan.append(parts)
        encoded = self._processor.Encode(segments) if segments else []
        results = []
        for parts in plan:
            ids = []
            for part in parts:
                if isinstance(part, int):
                    ids.append(part)
                else:
                    ids.extend(encoded[part[1]])
            results.append(ids)
        return results

    def _split_special(self, text):
        """Text split into plain segments (str) and control token ids (int)."""
        if self._special_pattern is None:
            return [text] if text else []
        parts = []
        start = 0
        for match in self._special_pattern.finditer(text):
            if match.start() > start:
                parts.append(text[start : match.start()])
            parts.append(self._special_ids[match.group()])
            start = match.end()
        if start < len(text):
            parts.append(text[start:])
        return parts

    def detokenize(self, inputs, skip_special_tokens=False):
        """Text of a list of ids (str) or of a batch of them (list of str).

        Control tokens are written out as their text (`<start_of_turn>`), so
        `detokenize(tokenize(s)) == s`; pass `skip_special_tokens=True` to
        drop them instead.
        """
        self._check_vocabulary()
        if hasattr(inputs, "tolist"):
            inputs = inputs.tolist()
        if isinstance(inputs, (int, np.integer)):
            inputs = [inputs]
        if len(inputs) and not isinstance(inputs[0], (int, np.integer)):
            return [self._detokenize_one(ids, skip_special_tokens) for ids in inputs]
        return self._detokenize_one(inputs, skip_special_tokens)

    def _detokenize_one(self, ids, skip_special_tokens):
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        size = len(self._pieces)
        ids = [int(token_id) for token_id in ids]
        for token_id in ids:
            if not 0 <= token_id < size:
                raise ValueError(f"Token id {token_id} is outside [0, {size}).")
        text = []
        run = []
        for token_id in ids:
            if token_id in self._special_id_set:
                if run:
                    text.append(self._processor.Decode(run))
                    run = []
                if not skip_special_tokens:
                    text.append(self._pieces[token_id])
            else:
                run.append(token_id)
        if run:
            text.append(self._processor.Decode(run))
        return "".join(text)

    def call(self, inputs):
        return self.tokenize(inputs)

    # -- saving ---------------------------------------------------------------

    def save_assets(self, dir_path):
        """Writes the SentencePiece model to `dir_path/vocabulary.spm`."""
        self._check_vocabulary()
        with open(os.path.join(dir_path, VOCABULARY_FILENAME), "wb") as f:
            f.write(self.proto)

    def load_assets(self, dir_path):
        """Reads `dir_path/vocabulary.spm` (keras-hub's preset layout)."""
        self.set_proto(os.path.join(dir_path, VOCABULARY_FILENAME))

    @classmethod
    def from_preset(cls, handle, dtype=None, load_weights=True):
        """The tokenizer of a preset (name, `kaggle://`, `hf://`, directory or `.gguf`)."""
        return preset.load_tokenizer(handle, cls)

    def save_to_preset(self, directory):
        """Writes tokenizer.json and assets/tokenizer/vocabulary.spm (keras-hub layout)."""
        preset.save_tokenizer(self, directory)

    def get_config(self):
        config = super().get_config()
        # The vocabulary travels as an asset (vocabulary.spm), as in keras-hub.
        config["proto"] = None
        config["chat_format"] = self._chat_format_name
        return config


def _special_token_pattern(special_ids):
    """A regex matching any of the given tokens, longest first."""
    if not special_ids:
        return None
    tokens = sorted(special_ids, key=len, reverse=True)
    return re.compile("|".join(re.escape(token) for token in tokens))
