"""GemmaTokenizer against transformers, on a tiny vocabulary and the real one."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keras_gemma.gguf_tokenizer import read_gguf_metadata
from keras_gemma.tokenizer import GemmaTokenizer
from tokenizer_fixtures import (  # noqa: F401 (fixtures)
    CORPUS,
    SPACE_MARK,
    gemma3_tokenizer,
    gguf_path,
    hf_gguf_tokenizer,
    random_strings,
    tiny_spm_path,
    tiny_spm_user_defined,
    tiny_tokenizer,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hf_ids(hf_tokenizer, texts):
    return [hf_tokenizer.encode(text, add_special_tokens=False) for text in texts]


def hf_from_spm(path):
    from transformers import GemmaTokenizer as HFGemmaTokenizer

    # transformers 5 converts a tokenizer.model found in a directory.
    return HFGemmaTokenizer.from_pretrained(str(path.parent))


# -- tiny vocabulary ----------------------------------------------------------


def test_tiny_matches_transformers(tiny_spm_path):
    ours = GemmaTokenizer(str(tiny_spm_path))
    hf = hf_from_spm(tiny_spm_path)
    texts = CORPUS + random_strings(500)
    assert ours.tokenize(texts) == hf_ids(hf, texts)
    # Unbatched calls give the same ids as the batch.
    for text in CORPUS:
        assert ours(text) == hf.encode(text, add_special_tokens=False)


def test_tiny_special_ids(tiny_spm_path):
    tokenizer = GemmaTokenizer(str(tiny_spm_path))
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    assert (tokenizer.bos_token_id, tokenizer.unk_token_id) == (2, 3)
    assert tokenizer.start_of_turn_id == tokenizer.token_to_id("<start_of_turn>")
    assert tokenizer.end_of_turn_id == tokenizer.token_to_id("<end_of_turn>")
    assert tokenizer("<start_of_turn>user<end_of_turn>") == [
        tokenizer.start_of_turn_id, *tokenizer("user"), tokenizer.end_of_turn_id
    ]
    assert tokenizer("<bos><eos><pad>") == [2, 1, 0]


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                      blacklist_characters=SPACE_MARK)))
def test_tiny_round_trip_random_unicode(tiny_tokenizer, text):
    # Byte fallback covers every character the model never saw.
    assert tiny_tokenizer.detokenize(tiny_tokenizer(text)) == text


_PIECES = list(" \t\n\r ab中😀<>é1") + ["<bos>", "<end_of_turn>", "<start_of_turn>"]


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.sampled_from(_PIECES), max_size=30).map("".join))
def test_tiny_random_text_matches_transformers(tiny_spm_user_defined, tiny_tokenizer, text):
    hf = _hf_tiny(tiny_spm_user_defined)
    assert tiny_tokenizer(text) == hf.encode(text, add_special_tokens=False)


_HF_TINY = {}


def _hf_tiny(path):
    if path not in _HF_TINY:
        _HF_TINY[path] = hf_from_spm(path)
    return _HF_TINY[path]


def test_round_trip_corpus(tiny_tokenizer, gemma3_tokenizer):
    for tokenizer in (tiny_tokenizer, gemma3_tokenizer):
        assert tokenizer.detokenize(tokenizer(CORPUS)) == CORPUS


def test_input_types(tiny_tokenizer):
    expected = tiny_tokenizer(["ab", "cd"])
    assert tiny_tokenizer(np.array(["ab", "cd"])) == expected
    assert tiny_tokenizer(np.array([b"ab", b"cd"], dtype=object)) == expected
    assert tiny_tokenizer(b"ab") == expected[0]
    assert tiny_tokenizer(np.str_("ab")) == expected[0]
    assert tiny_tokenizer.detokenize(np.array(expected[0])) == "ab"
    assert tiny_tokenizer.detokenize(list(np.array(expected[0]))) == "ab"
    assert tiny_tokenizer.detokenize([np.array(ids) for ids in expected]) == ["ab", "cd"]
    assert tiny_tokenizer.detokenize([]) == ""
    with pytest.raises(TypeError):
        tiny_tokenizer([1, 2])
    with pytest.raises(ValueError, match="outside"):
        tiny_tokenizer.detokenize([10**6])


def test_detokenize_skip_special_tokens(tiny_tokenizer):
    ids = tiny_tokenizer("<bos>hi<eos>")
    assert tiny_tokenizer.detokenize(ids) == "<bos>hi<eos>"
    assert tiny_tokenizer.detokenize(ids, skip_special_tokens=True) == "hi"


def test_vocabulary_accessors(tiny_tokenizer):
    size = tiny_tokenizer.vocabulary_size()
    assert size == 420 == len(tiny_tokenizer.get_vocabulary())
    for token_id in (0, 1, 2, 3, 100, size - 1):
        assert tiny_tokenizer.token_to_id(tiny_tokenizer.id_to_token(token_id)) == token_id
    assert tiny_tokenizer.token_to_id("not a piece at all") == tiny_tokenizer.unk_token_id
    assert (tiny_tokenizer.start_token_id, tiny_tokenizer.end_token_id) == (2, 1)


def test_no_vocabulary_error():
    with pytest.raises(ValueError, match="load_assets"):
        GemmaTokenizer()("text")


def test_assets_and_config_round_trip(tiny_tokenizer, tmp_path):
    import keras

    tiny_tokenizer.save_assets(str(tmp_path))
    assert (tmp_path / "vocabulary.spm").read_bytes() == tiny_tokenizer.proto
    config = keras.saving.serialize_keras_object(tiny_tokenizer)
    restored = keras.saving.deserialize_keras_object(config)
    restored.load_assets(str(tmp_path))
    assert restored(CORPUS) == tiny_tokenizer(CORPUS)
    assert GemmaTokenizer(tiny_tokenizer.proto)(CORPUS) == tiny_tokenizer(CORPUS)
    # keras-hub's tokenizer.json config loads too.
    hub_config = dict(config["config"], proto=None, sequence_length=None,
                      add_bos=False, add_eos=False, config_file="tokenizer.json")
    assert GemmaTokenizer.from_config(hub_config).proto is None


def test_keras_hub_preset_interchange(tiny_tokenizer, tmp_path):
    """Our vocabulary.spm loads in keras-hub and back (plain text, no markers)."""
    keras_hub = pytest.importorskip("keras_hub")

    tiny_tokenizer.save_assets(str(tmp_path))
    theirs = keras_hub.models.GemmaTokenizer(proto=str(tmp_path / "vocabulary.spm"))
    texts = [t for t in CORPUS if "<" not in t]
    assert [list(map(int, ids)) for ids in theirs(texts)] == tiny_tokenizer(texts)
    other = tmp_path / "from_keras_hub"
    other.mkdir()
    theirs.save_assets(str(other))
    ours = GemmaTokenizer()
    ours.load_assets(str(other))
    assert ours(texts) == tiny_tokenizer(texts)


# -- the real Gemma 3 vocabulary, from GGUF -----------------------------------


def test_gemma3_special_ids(gemma3_tokenizer):
    t = gemma3_tokenizer
    assert t.vocabulary_size() == 262144
    assert (t.pad_token_id, t.eos_token_id, t.bos_token_id, t.unk_token_id) == (0, 1, 2, 3)
    assert (t.start_of_turn_id, t.end_of_turn_id) == (105, 106)
    assert t.special_token_ids == [0, 1, 2, 106]


def test_gemma3_gguf_matches_transformers(gemma3_tokenizer, hf_gguf_tokenizer):
    texts = CORPUS + random_strings(3000, seed=1)
    expected = hf_ids(hf_gguf_tokenizer, texts)
    got = gemma3_tokenizer(texts)
    mismatches = [(t, e, g) for t, e, g in zip(texts, expected, got) if e != g]
    assert not mismatches, mismatches[:5]


def test_gemma3_known_ids(gemma3_tokenizer):
    # Ids that transformers' and llama.cpp's tokenizers give for this file.
    t = gemma3_tokenizer
    assert t("a   hello") == [236746, 139, 23391]  # "▁▁▁" is one piece
    assert t("x\ty") == [236781, 255968, 236762]  # the tab stays a tab piece
    assert t("<start_of_turn>user\nhi<end_of_turn>\n") == [105, 2364, 107, 2202, 106, 107]


def test_gemma3_detokenize_matches_transformers(gemma3_tokenizer, hf_gguf_tokenizer):
    texts = CORPUS + random_strings(300, seed=2)
    for ids in hf_ids(hf_gguf_tokenizer, texts):
        assert gemma3_tokenizer.detokenize(ids) == hf_gguf_tokenizer.decode(ids)


def test_naive_gguf_rebuild_differs(gguf_path, gemma3_tokenizer):
    """Why gguf_tokenizer.py exists: each of its fixes changes ids."""
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    def encoder(model):
        return sentencepiece.SentencePieceProcessor(model_proto=model.SerializeToString())

    fixed = model_pb2.ModelProto.FromString(gemma3_tokenizer.proto)
    fixed_sp = encoder(fixed)

    # 1. Whitespace pieces spelled as stored (real spaces) never match.
    as_stored = model_pb2.ModelProto.FromString(gemma3_tokenizer.proto)
    tokens = read_gguf_metadata(gguf_path)["tokenizer.ggml.tokens"]
    for piece, token in zip(as_stored.pieces, tokens):
        piece.piece = token
    assert encoder(as_stored).encode("a   hello") != fixed_sp.encode("a   hello")

    # 2. SentencePiece's default normalizer turns the tab into a space.
    default_normalizer = model_pb2.ModelProto.FromString(gemma3_tokenizer.proto)
    default_normalizer.normalizer_spec.CopyFrom(_nmt_nfkc_spec())
    assert encoder(default_normalizer).encode("x\ty") != fixed_sp.encode("x\ty")

    # 3. Control tokens are never matched by SentencePiece alone.
    assert len(fixed_sp.encode("<start_of_turn>")) > 1
    assert gemma3_tokenizer("<start_of_turn>") == [105]


def _nmt_nfkc_spec():
    import io

    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["a b c d e f g"] * 10), model_writer=buffer,
        vocab_size=10, model_type="char", minloglevel=2,
    )
    return model_pb2.ModelProto.FromString(buffer.getvalue()).normalizer_spec


def test_from_gguf_small_file_and_reader(tiny_spm_user_defined, tmp_path):
    """A GGUF written from the tiny model reads back to the same tokenizer,
    from a path and from a `gguf.GGUFReader`."""
    gguf = pytest.importorskip("gguf")
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    model = model_pb2.ModelProto.FromString(tiny_spm_user_defined.read_bytes())
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_tokenizer_model("llama")
    # llama.cpp stores whitespace-only pieces with real spaces.
    writer.add_token_list([
        p.piece.replace(SPACE_MARK, " ") if not p.piece.strip(SPACE_MARK) else p.piece
        for p in model.pieces
    ])
    writer.add_token_scores([p.score for p in model.pieces])
    writer.add_token_types([int(p.type) for p in model.pieces])
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_space_prefix(False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reference = GemmaTokenizer(str(tiny_spm_user_defined))
    texts = CORPUS + random_strings(300)
    assert GemmaTokenizer.from_gguf(path)(texts) == reference(texts)
    assert GemmaTokenizer.from_gguf(gguf.GGUFReader(str(path)))(texts) == reference(texts)


# -- speed and imports --------------------------------------------------------


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_never_imports_tensorflow(backend, tiny_spm_user_defined):
    script = textwrap.dedent(f"""
        import sys
        import keras_gemma.tokenizer, keras_gemma.preprocessor
        tokenizer = keras_gemma.tokenizer.GemmaTokenizer({str(tiny_spm_user_defined)!r})
        preprocessor = keras_gemma.preprocessor.GemmaCausalLMPreprocessor(
            tokenizer, sequence_length=16)
        assert tokenizer(["hello world"])[0]
        preprocessor(["hello world"])
        preprocessor([{{"role": "user", "content": "hi"}},
                      {{"role": "model", "content": "hello"}}])
        preprocessor.generate_postprocess(preprocessor.generate_preprocess(["hi"]))
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow")
        assert not loaded, loaded[:5]
    """)
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=ROOT)
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
