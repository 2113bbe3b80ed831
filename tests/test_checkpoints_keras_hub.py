"""keras-hub interop, both ways, against keras-hub 0.32 itself.

Tiny random Gemma 1, 2 and 3 models built and saved by keras-hub
(`save_to_preset`) load here with keras-hub's logits; presets saved here load
in keras-hub (`keras_hub.models.CausalLM.from_preset`) with ours. Weights are
N(0, 0.25), norm scales included, so soft-caps saturate; sequences are longer
than the sliding window; the batch is padded on both sides.

The exception is 27B-style query scaling (`query_pre_attn_scalar` =
hidden_dim / num_query_heads != head_dim): keras-hub 0.32 writes
`query_head_dim_normalize: false` but ignores it and scales by head_dim. We
honour it, which is what transformers and the Gemma reports do; that case is
checked against transformers instead, and keras-hub's disagreement is shown.
"""

import json
import os

import numpy as np
import pytest

import keras_gemma
from keras_gemma.preprocessor import GemmaCausalLMPreprocessor
from keras_gemma.tokenizer import GemmaTokenizer
from conftest import to_numpy
from hf_reference import VOCAB, build_hf, gemma2_config, hf_logits, ours_from_hf, padded_batch
from tokenizer_fixtures import train_tiny_spm

keras_hub = pytest.importorskip("keras_hub")

TOLERANCE = 1e-4
SCALE = 0.25

KERAS_HUB_CONFIGS = {
    "gemma": dict(
        cls="GemmaBackbone", vocabulary_size=VOCAB, num_layers=3, num_query_heads=4, num_key_value_heads=1,
        hidden_dim=32, intermediate_dim=96, head_dim=8,
    ),
    "gemma2": dict(
        cls="GemmaBackbone", vocabulary_size=VOCAB, num_layers=4, num_query_heads=4, num_key_value_heads=2,
        hidden_dim=32, intermediate_dim=96, head_dim=8, use_post_ffw_norm=True, use_post_attention_norm=True,
        final_logit_soft_cap=3.0, attention_logit_soft_cap=2.0, use_sliding_window_attention=True,
        sliding_window_size=4,
    ),
    "gemma3": dict(
        cls="Gemma3Backbone", vocabulary_size=VOCAB, image_size=None, num_layers=7, num_query_heads=4,
        num_key_value_heads=2, hidden_dim=32, intermediate_dim=48, head_dim=8, use_query_key_norm=True,
        use_post_ffw_norm=True, use_post_attention_norm=True, use_sliding_window_attention=True,
        sliding_window_size=4, global_rope_scaling_factor=8.0, vision_encoder=None,
    ),
}


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    return str(train_tiny_spm(tmp_path_factory.mktemp("spm") / "tokenizer.model", "control"))


def randomize(weights, seed=0):
    rng = np.random.default_rng(seed)
    for w in weights:
        w.assign(rng.normal(0.0, SCALE, tuple(w.shape)).astype("float32"))


def keras_hub_task(generation, spm_path, seed=0):
    """A keras-hub CausalLM (random weights, tiny tokenizer) for `generation`."""
    kwargs = dict(KERAS_HUB_CONFIGS[generation])
    backbone = getattr(keras_hub.models, kwargs.pop("cls"))(**kwargs)
    randomize(backbone.weights, seed)
    if generation == "gemma3":
        tokenizer = keras_hub.models.Gemma3Tokenizer(proto=spm_path, has_vision_tokens=False)
        preprocessor = keras_hub.models.Gemma3CausalLMPreprocessor(tokenizer, sequence_length=24)
        return keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=preprocessor)
    tokenizer = keras_hub.models.GemmaTokenizer(proto=spm_path)
    preprocessor = keras_hub.models.GemmaCausalLMPreprocessor(tokenizer, sequence_length=24)
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=preprocessor)


def logits_of(model, ids, mask):
    return to_numpy(model({"token_ids": ids, "padding_mask": mask}))


@pytest.mark.parametrize("generation", ["gemma", "gemma2", "gemma3"])
def test_keras_hub_preset_loads_here(generation, spm_path, tmp_path):
    theirs = keras_hub_task(generation, spm_path)
    directory = str(tmp_path / "preset")
    # Gemma 2 is saved sharded (keras' model.weights.json + shards).
    theirs.save_to_preset(directory, **({"max_shard_size": 0.00002} if generation == "gemma2" else {}))
    assert os.path.exists(os.path.join(directory, "model.weights.json" if generation == "gemma2" else "model.weights.h5"))

    ours = keras_gemma.GemmaCausalLM.from_preset(directory)
    ids, mask = padded_batch(13)
    expected, actual = logits_of(theirs, ids, mask), logits_of(ours, ids, mask)
    np.testing.assert_allclose(actual[mask], expected[mask], atol=TOLERANCE, rtol=TOLERANCE)

    config = ours.config
    if generation == "gemma":
        assert config.intermediate_dim == KERAS_HUB_CONFIGS["gemma"]["intermediate_dim"] // 2
    if generation == "gemma2":
        assert config.layer_types == ("local", "global") * 2 and config.sliding_window_size == 4 < ids.shape[1]
        assert np.abs(actual[mask]).max() > 0.8 * config.final_logit_softcap  # the cap bites
    if generation == "gemma3":
        assert config.layer_types == ("local",) * 5 + ("global", "local")
        assert (config.global_rope_base, config.global_rope_scaling, config.local_rope_base) == (1e6, 8.0, 1e4)
        assert config.intermediate_dim == 48 and config.use_qk_norm
    # The tokenizer and preprocessor came along.
    text = "The quick brown fox"
    assert ours.preprocessor.sequence_length == 24
    assert ours.preprocessor.tokenizer(text) == to_numpy(theirs.preprocessor.tokenizer(text)).tolist()
    tokenizer = GemmaTokenizer.from_preset(directory)
    assert tokenizer(text) == ours.preprocessor.tokenizer(text)


@pytest.mark.parametrize("generation", ["gemma", "gemma2", "gemma3"])
def test_preset_saved_here_loads_in_keras_hub(generation, spm_path, tmp_path):
    # The same architectures, built here from keras-hub's configs.
    source = keras_hub_task(generation, spm_path)
    source.backbone.save_to_preset(str(tmp_path / "arch"))
    backbone = keras_gemma.GemmaBackbone.from_preset(str(tmp_path / "arch"), load_weights=False)
    randomize(backbone.weights, seed=7)
    preprocessor = GemmaCausalLMPreprocessor(GemmaTokenizer(spm_path), sequence_length=32)
    ours = keras_gemma.GemmaCausalLM(backbone, preprocessor=preprocessor)
    directory = str(tmp_path / "ours")
    ours.save_to_preset(directory)

    theirs = keras_hub.models.CausalLM.from_preset(directory)
    expected_class = "Gemma3CausalLM" if generation == "gemma3" else "GemmaCausalLM"
    assert type(theirs).__name__ == expected_class
    assert theirs.preprocessor.sequence_length == 32
    ids, mask = padded_batch(13)
    expected = logits_of(ours, ids, mask)
    np.testing.assert_allclose(logits_of(theirs, ids, mask)[mask], expected[mask], atol=TOLERANCE, rtol=TOLERANCE)
    # keras-hub's tokenizer reads our vocabulary asset.
    text = "Hello world"
    assert to_numpy(theirs.preprocessor.tokenizer(text)).tolist() == ours.preprocessor.tokenizer(text)

    # And back here: the same model exactly.
    again = keras_gemma.GemmaCausalLM.from_preset(directory)
    assert again.config == ours.config
    np.testing.assert_array_equal(logits_of(again, ids, mask), expected)


def test_h5_paths_are_keras_hubs(spm_path, tmp_path):
    """Every dataset name we write is one keras-hub writes for the same model, and vice versa."""
    import h5py

    def datasets(path):
        names = []
        with h5py.File(path) as f:
            f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        return sorted(names)

    for generation in ("gemma2", "gemma3"):
        theirs = keras_hub_task(generation, spm_path)
        theirs.backbone.save_to_preset(str(tmp_path / f"{generation}_theirs"))
        ours = keras_gemma.GemmaBackbone.from_preset(str(tmp_path / f"{generation}_theirs"))
        ours.save_to_preset(str(tmp_path / f"{generation}_ours"))
        assert datasets(tmp_path / f"{generation}_ours" / "model.weights.h5") == datasets(
            tmp_path / f"{generation}_theirs" / "model.weights.h5"
        )


def test_27b_style_query_scaling_matches_transformers_not_keras_hub(tmp_path):
    """query_pre_attn_scalar = hidden_dim / num_query_heads (16) != head_dim (8), as in the 27B models."""
    hf = build_hf(gemma2_config(hidden_size=64, num_attention_heads=4, head_dim=8, query_pre_attn_scalar=16), seed=11)
    source = ours_from_hf(hf)
    assert source.config.query_pre_attn_scalar == 16 != source.config.head_dim
    directory = str(tmp_path / "preset")
    with pytest.warns(UserWarning, match="ignores `query_head_dim_normalize=False`"):
        source.save_to_preset(directory)
    with open(os.path.join(directory, "config.json")) as f:
        assert json.load(f)["config"]["query_head_dim_normalize"] is False

    ids, mask = padded_batch(13)
    expected = hf_logits(hf, ids, mask)
    ours = keras_gemma.GemmaCausalLM.from_preset(directory)
    assert ours.config.query_pre_attn_scalar == 16
    np.testing.assert_allclose(logits_of(ours, ids, mask)[mask], expected[mask], atol=TOLERANCE, rtol=TOLERANCE)

    # Without our metadata (a preset written by keras-hub itself) the flag alone gives the same scaling.
    os.remove(os.path.join(directory, "metadata.json"))
    assert keras_gemma.GemmaBackbone.from_preset(directory).config.query_pre_attn_scalar == 16

    # keras-hub 0.32 loads the preset but scales by head_dim: known keras-hub bug.
    theirs = keras_hub.models.CausalLM.from_preset(directory)
    wrong = logits_of(theirs, ids, mask)
    assert np.abs(wrong[mask] - expected[mask]).max() > 100 * TOLERANCE


def test_exact_config_survives_what_keras_hub_cannot_say(tmp_path):
    """A query scalar keras-hub cannot express (24) and the context length are kept in metadata.json."""
    hf = build_hf(gemma2_config(), seed=1)  # query_pre_attn_scalar=24, head_dim=16, hidden/heads=16
    source = ours_from_hf(hf)
    with pytest.warns(UserWarning):
        source.save_to_preset(str(tmp_path / "p"))
    loaded = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path / "p"))
    assert loaded.config == source.config
    ids, mask = padded_batch(13)
    np.testing.assert_allclose(
        logits_of(loaded, ids, mask)[mask], hf_logits(hf, ids, mask)[mask], atol=TOLERANCE, rtol=TOLERANCE
    )


def test_preprocessor_and_tokenizer_presets(spm_path, tmp_path):
    theirs = keras_hub_task("gemma", spm_path)
    theirs.save_to_preset(str(tmp_path / "task"))
    preprocessor = GemmaCausalLMPreprocessor.from_preset(str(tmp_path / "task"))
    assert preprocessor.sequence_length == 24  # from preprocessor.json
    assert GemmaCausalLMPreprocessor.from_preset(str(tmp_path / "task"), sequence_length=8).sequence_length == 8
    preprocessor.sequence_length = 40
    preprocessor.save_to_preset(str(tmp_path / "task"))  # into the existing preset
    loaded = keras_hub.models.GemmaCausalLMPreprocessor.from_preset(str(tmp_path / "task"))
    assert loaded.sequence_length == 40
    assert to_numpy(loaded.tokenizer("Hello world")).tolist() == preprocessor.tokenizer("Hello world")
    # A directory with only a tokenizer loads here (keras-hub wants a config.json).
    preprocessor.tokenizer.save_to_preset(str(tmp_path / "tok"))
    assert sorted(os.listdir(tmp_path / "tok")) == ["assets", "tokenizer.json"]
    assert GemmaTokenizer.from_preset(str(tmp_path / "tok"))("Hello world") == preprocessor.tokenizer("Hello world")


def test_bfloat16_and_keras_nlp_presets(tmp_path):
    """bf16 weights are stored as keras does (|V2 plus a dtype attribute); keras-nlp names load too."""
    import h5py

    config = keras_gemma.GemmaConfig(
        vocabulary_size=VOCAB, num_layers=2, hidden_dim=32, num_query_heads=2, num_key_value_heads=1,
        head_dim=16, intermediate_dim=48,
    )
    ours = keras_gemma.GemmaBackbone(config, dtype="bfloat16")
    directory = str(tmp_path / "bf16")
    ours.save_to_preset(directory)
    with h5py.File(os.path.join(directory, "model.weights.h5")) as f:
        assert f["layers/reversible_embedding/vars/0"].attrs["dtype"] == "bfloat16"
    theirs = keras_hub.models.Backbone.from_preset(directory, dtype="bfloat16")
    np.testing.assert_array_equal(
        to_numpy(theirs.token_embedding.embeddings).astype("float32"),
        to_numpy(ours.token_embedding.embeddings).astype("float32"),
    )
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config_json = json.load(f)
    config_json["registered_name"] = "keras_nlp>GemmaBackbone"
    config_json["module"] = "keras_nlp.src.models.gemma.gemma_backbone"
    with open(path, "w") as f:
        json.dump(config_json, f)
    again = keras_gemma.GemmaBackbone.from_preset(directory, dtype="bfloat16")
    np.testing.assert_array_equal(
        to_numpy(again.token_embedding.embeddings).astype("float32"),
        to_numpy(ours.token_embedding.embeddings).astype("float32"),
    )


def test_multimodal_keras_hub_preset_loads_text_part(tmp_path):
    from keras_hub.src.models.gemma3.gemma3_vision_encoder import Gemma3VisionEncoder

    vision = Gemma3VisionEncoder(
        image_size=16, patch_size=8, num_heads=2, hidden_dim=16, num_layers=1, intermediate_dim=16,
        output_dim=32, pool_size=2,
    )
    kwargs = {**KERAS_HUB_CONFIGS["gemma3"], "image_size": 16, "vision_encoder": vision}
    kwargs.pop("cls")
    theirs = keras_hub.models.Gemma3Backbone(**kwargs)
    randomize(theirs.weights, seed=3)
    theirs.save_to_preset(str(tmp_path))
    ours = keras_gemma.GemmaBackbone.from_preset(str(tmp_path))
    assert ours.config.num_layers == 7
    np.testing.assert_array_equal(to_numpy(ours.token_embedding.embeddings), to_numpy(theirs.token_embedding.embeddings))
