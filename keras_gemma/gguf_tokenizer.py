"""Rebuilds Gemma's SentencePiece model from a GGUF file's metadata.

llama.cpp stores the vocabulary as three parallel arrays
(`tokenizer.ggml.tokens`, `.scores`, `.token_type`) plus the special ids. Copying
them into a SentencePiece `ModelProto` as they are does not give back the real
tokenizer. Three things need fixing, all checked against transformers' GGUF
tokenizer (which agrees with llama.cpp, see `tests/test_tokenizer.py`):

1. Whitespace-only pieces ("  ", "   ", ...) are stored with real spaces, while
   SentencePiece looks them up after turning spaces into "\u2581". Respell
   them "\u2581\u2581"... and make them normal pieces ranked by their position
   in the file, as transformers does
   (`transformers/integrations/gguf/gguf_tokenizer_mapping.py`), so that runs of
   spaces merge the same way.
2. The normalizer must be SentencePiece's `identity` with no dummy prefix and
   whitespace kept as it is. A default (`nmt_nfkc`) normalizer turns the tab
   byte into a space and folds runs of whitespace.
3. The turn markers are CONTROL pieces, which SentencePiece never matches in
   text. `GemmaTokenizer` splits text on control pieces itself; nothing to do
   here but keep their type.

Merge order: Gemma's normal pieces carry scores that fall with their id, so
`score = -id` reproduces SentencePiece's BPE merge priority and transformers'
position ranking alike.
"""

import numpy as np
from sentencepiece import sentencepiece_model_pb2 as model_pb2

# llama.cpp's token types use SentencePiece's numbering.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"


def read_gguf_metadata(path):
    """Reads the key/value metadata of a GGUF file (not its tensors).

    Numeric arrays come back as numpy arrays, string arrays as lists of str.
    The parser is the checkpoint reader's (`checkpoints.gguf_format.GGUFFile`).
    """
    from keras_gemma.checkpoints.gguf_format import GGUFFile

    return GGUFFile(path).metadata


def _metadata_from_reader(reader):
    """The same dict as `read_gguf_metadata`, from a `gguf.GGUFReader`."""
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        metadata[key] = np.asarray(value) if isinstance(value, list) and value and not isinstance(value[0], str) else value
    return metadata


def read_gguf_vocabulary(path_or_reader):
    """Reads the tokenizer metadata of a GGUF file.

    Args:
        path_or_reader: a path to a `.gguf` file or a `gguf.GGUFReader`.

    Returns:
        A dict with `tokens` (list of str), `scores` (float32 array),
        `token_types` (int32 array), `model` (`tokenizer.ggml.model`),
        `add_space_prefix`, the special ids `bos_id`, `eos_id`, `unk_id`,
        `pad_id` (None where the file has none) and `chat_template`
        (`tokenizer.chat_template`, or None).
    """
    if hasattr(path_or_reader, "metadata"):  # an open `GGUFFile`
        metadata = path_or_reader.metadata
    elif hasattr(path_or_reader, "fields"):  # a `gguf.GGUFReader`
        metadata = _metadata_from_reader(path_or_reader)
    else:
        metadata = read_gguf_metadata(path_or_reader)
    if "tokenizer.ggml.tokens" not in metadata:
        raise ValueError("The GGUF file has no tokenizer (tokenizer.ggml.tokens).")
    tokens = list(metadata["tokenizer.ggml.tokens"])
    scores = metadata.get("tokenizer.ggml.scores")
    if scores is None:
        scores = -np.arange(len(tokens))
    token_types = metadata.get("tokenizer.ggml.token_type")
    if token_types is None:
        token_types = np.full(len(tokens), NORMAL)

    def special(name):
        value = metadata.get(f"tokenizer.ggml.{name}")
        return None if value is None else int(value)

    return {
        "tokens": tokens,
        "scores": np.asarray(scores, dtype=np.float32),
        "token_types": np.asarray(token_types, dtype=np.int32),
        "model": metadata.get("tokenizer.ggml.model", "llama"),
        "add_space_prefix": bool(metadata.get("tokenizer.ggml.add_space_prefix", False)),
        "bos_id": special("bos_token_id"),
        "eos_id": special("eos_token_id"),
        "unk_id": special("unknown_token_id"),
        "pad_id": special("padding_token_id"),
        "chat_template": metadata.get("tokenizer.chat_template"),
    }


def _is_space_run(token):
    return token != "" and token.strip(" ") == ""


def sentencepiece_proto_from_gguf(path_or_reader):
    """Serialized SentencePiece `ModelProto` equivalent to a Gemma GGUF tokenizer.

    Args:
        path_or_reader: a path to a `.gguf` file or a `gguf.GGUFReader`.

    Returns:
        The serialized model (bytes), ready for `GemmaTokenizer(proto=...)`.
    """
    return sentencepiece_proto_from_vocabulary(read_gguf_vocabulary(path_or_reader))


def sentencepiece_proto_from_vocabulary(vocab):
    """`sentencepiece_proto_from_gguf` for what `read_gguf_vocabulary` returned."""
    if vocab["model"] != "llama":
        raise ValueError(
            "Expected a SentencePiece vocabulary (tokenizer.ggml.model 'llama'), "
            f"got {vocab['model']!r}."
        )
    tokens, types = vocab["tokens"], vocab["token_types"]
    unk_id = vocab["unk_id"] if vocab["unk_id"] is not None else 3

    model = model_pb2.ModelProto()
    trainer = model.trainer_spec
    trainer.model_type = model_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = bool(np.any(types == BYTE))
    trainer.split_digits = True
    trainer.allow_whitespace_only_pieces = True
    trainer.split_by_whitespace = False
    for name in ("unk", "bos", "eos", "pad"):
        token_id = vocab[f"{name}_id"]
        setattr(trainer, f"{name}_id", -1 if token_id is None else token_id)
        if token_id is not None:
            setattr(trainer, f"{name}_piece", tokens[token_id])

    normalizer = model.normalizer_spec
    normalizer.name = "identity"
    normalizer.precompiled_charsmap = b""
    normalizer.add_dummy_prefix = vocab["add_space_prefix"]
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True

    for token_id, (token, token_type) in enumerate(zip(tokens, types)):
        piece = model.pieces.add()
        token_type = int(token_type)
        if token_id == unk_id:
            # SentencePiece wants exactly one UNKNOWN piece; llama.cpp files
            # often mark it CONTROL.
            token_type = UNKNOWN
        elif _is_space_run(token):
            # Fix 1: spell spaces as SentencePiece sees them, merge by rank.
            token = SPACE * len(token)
            token_type = NORMAL
        piece.piece = token
        piece.type = token_type
        # Fix for merge order: rank normal pieces by position in the file.
        piece.score = -float(token_id) if token_type == NORMAL else 0.0
    return model.SerializeToString()
