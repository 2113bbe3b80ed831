"""keras-hub's Gemma 4 presets (`Gemma4Backbone`), both ways.

Tiny random text-only `Gemma4Backbone`s, built and saved by keras-hub itself
(`save_to_preset`), load with `GemmaCausalLM.from_preset` and give
keras-hub's logits in float32, on a batch padded on both sides and longer
than the sliding window; models of the same architectures saved here load
in keras-hub (`Gemma4CausalLM.from_preset`) with ours, their h5 datasets
those keras-hub writes. Weights are N(0, 0.25); norm scales and layer
scalars 1 + N(0, 0.25). Three models:

- dense, as 31B: global layers twice as wide with one key/value head whose
  keys are the values, a quarter of their rope pairs rotating, soft-caps;
- E-style, as E2B: per-layer embeddings, the trailing layers reading the
  keys and values of earlier ones with double-wide feed-forwards, own rope
  bases and scalings;
- mixture of experts, as 26B A4B: experts beside the dense feed-forward.

What the text decoder cannot be here (an embedding model, sliding layers
without a window) is refused by name; a vision encoder's weights are left
out, the text decoder loaded. What keras-hub cannot express of one of our
configs (no value norm, say) is named, and such a model saves as
keras_gemma's native preset with a warning. The released presets' configs
(keras-hub's converter on the Hugging Face configs) read as our built-in
architectures.
"""

import json
import os
import re
import warnings

import h5py
import numpy as np
import pytest

import keras_gemma
from keras_gemma.checkpoints import keras_hub_format
from keras_gemma.checkpoints.weights import CheckpointError
from keras_gemma.preprocessor import GemmaCausalLMPreprocessor
from keras_gemma.tokenizer import GemmaTokenizer
from conftest import to_numpy
from hf_reference import VOCAB, padded_batch, positions_of
from tokenizer_fixtures import train_tiny_spm

keras_hub = pytest.importorskip("keras_hub")
pytest.importorskip("keras_hub.src.models.gemma4.gemma4_backbone")

TOLERANCE = 1e-4
SCALE = 0.25
SEQUENCE_LENGTH = 13  # > the window, 4

COMMON = dict(
    vocabulary_size=VOCAB, image_size=None, num_query_heads=4, num_key_value_heads=2, hidden_dim=32,
    intermediate_dim=24, head_dim=8, sliding_window_size=4, dtype="float32",
)
CONFIGS = {
    # L L G L L G: wide global heads (16), one key/value head that is also the values.
    "dense": dict(
        COMMON, num_layers=6, sliding_window_pattern=3, global_head_dim=16, num_global_key_value_heads=1,
        global_rope_partial_rotary_factor=0.25, final_logit_soft_cap=3.0, attention_logit_soft_cap=5.0,
    ),
    # L L G L G, the last two reading layers 1 and 2's keys and values.
    "e": dict(
        COMMON, num_layers=5,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        global_head_dim=16, global_rope_partial_rotary_factor=0.5, hidden_size_per_layer_input=4,
        vocab_size_per_layer_input=VOCAB, num_kv_shared_layers=2, use_double_wide_mlp=True,
        global_rope_wavelength=50_000.0, local_rope_wavelength=500.0, local_rope_scaling_factor=2.0,
        final_logit_soft_cap=30.0,
    ),
    # L G L G, as 26B A4B: four experts (two per token) beside the dense feed-forward.
    "moe": dict(
        COMMON, num_layers=4, sliding_window_pattern=2, global_head_dim=16, num_global_key_value_heads=1,
        global_rope_partial_rotary_factor=0.25, enable_moe_block=True, num_experts=4, expert_intermediate_dim=6,
        num_experts_per_token=2, final_logit_soft_cap=30.0,
    ),
}


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    return str(train_tiny_spm(tmp_path_factory.mktemp("spm") / "tokenizer.model", "gemma4"))


def randomize(weights, seed=0):
    """N(0, 0.25); norm scales (keras-hub's Gemma 4 multiplies by the scale
    itself) and layer scalars 1 + N(0, 0.25). (Scalars near 0 shrink the
    residual stream until the per-layer input's norm amplifies rounding.)"""
    rng = np.random.default_rng(seed)
    for w in weights:
        offset = 1.0 if w.path.endswith(("/scale", "/layer_scalar")) else 0.0
        w.assign((offset + rng.normal(0.0, SCALE, tuple(w.shape))).astype("float32"))


def keras_hub_backbone(kind, seed=0, **overrides):
    backbone = keras_hub.models.Gemma4Backbone(**{**CONFIGS[kind], **overrides})
    randomize(backbone.weights, seed)
    return backbone


def keras_hub_logits(backbone, ids, mask):
    hidden = backbone({"token_ids": ids, "padding_mask": mask, "position_ids": positions_of(mask).astype("int32")})
    return to_numpy(backbone.token_embedding(hidden, reverse=True))


def logits_of(model, ids, mask):
    return to_numpy(model({"token_ids": ids, "padding_mask": mask}))


def save_keras_hub_preset(backbone, spm_path, directory):
    """A task preset as keras-hub writes it: backbone, Gemma4Tokenizer and preprocessor, task.json."""
    tokenizer = keras_hub.models.Gemma4Tokenizer(proto=spm_path)
    preprocessor = keras_hub.models.Gemma4CausalLMPreprocessor(tokenizer, sequence_length=24)
    task = keras_hub.models.Gemma4CausalLM(backbone=backbone, preprocessor=preprocessor)
    task.save_to_preset(directory)
    return task


@pytest.fixture(scope="module")
def presets(spm_path, tmp_path_factory):
    """kind -> (keras-hub backbone, preset directory)."""
    out = {}
    for seed, kind in enumerate(CONFIGS):
        backbone = keras_hub_backbone(kind, seed)
        directory = str(tmp_path_factory.mktemp(kind) / "preset")
        save_keras_hub_preset(backbone, spm_path, directory)
        out[kind] = (backbone, directory)
    return out


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_keras_hub_gemma4_preset_loads_here(kind, presets):
    theirs, directory = presets[kind]
    with open(os.path.join(directory, "config.json")) as f:
        assert json.load(f)["class_name"] == "Gemma4Backbone"
    ours = keras_gemma.GemmaCausalLM.from_preset(directory)
    ids, mask = padded_batch(SEQUENCE_LENGTH)
    expected, actual = keras_hub_logits(theirs, ids, mask), logits_of(ours, ids, mask)
    np.testing.assert_allclose(actual[mask], expected[mask], atol=TOLERANCE, rtol=TOLERANCE)

    config = ours.config
    assert config.query_pre_attn_scalar == 1.0 and config.use_value_norm and config.use_layer_scalar
    assert config.global_head_dim == 16 != config.head_dim
    assert config.sliding_window_size == 4 < SEQUENCE_LENGTH
    if kind == "moe":
        assert config.layer_types == ("local", "global") * 2
    elif kind == "dense":
        assert config.layer_types == ("local", "local", "global") * 2
        assert config.num_global_key_value_heads == 1 and config.global_keys_as_values
        assert (config.global_rope_base, config.local_rope_base, config.global_rope_fraction) == (1e6, 1e4, 0.25)
        assert "blocks.2.attention.value" not in ours.backbone.weight_map()  # the keys are the values
        assert np.abs(actual[mask]).max() > 0.8 * config.final_logit_softcap  # the cap bites
    if kind == "e":
        assert config.layer_types == ("local", "local", "global", "local", "global")
        assert (config.per_layer_input_dim, config.num_kv_shared_layers, config.use_double_wide_mlp) == (4, 2, True)
        assert [config.kv_source(i) for i in range(5)] == [0, 1, 2, 1, 2]
        assert (config.global_rope_base, config.local_rope_base, config.local_rope_scaling) == (5e4, 500.0, 2.0)
        assert not config.global_keys_as_values
        assert ours.backbone.weight_map()["blocks.4.feed_forward.gate"].shape == (32, 48)  # double wide
    if kind == "moe":
        assert (config.num_experts, config.top_k_experts, config.moe_intermediate_dim) == (4, 2, 6)
        assert ours.backbone.weight_map()["blocks.1.moe.gate_up"].shape == (4, 2, 32, 6)
        bank = theirs.transformer_layers[1].moe_expert_bank
        np.testing.assert_array_equal(
            to_numpy(ours.backbone.weight_map()["blocks.1.moe.gate_up"])[:, 1], to_numpy(bank.up_proj)
        )
    # The stored layer scalars came along (keras-hub's shape (), ours (1,)).
    scalars = ours.backbone.weight_map()
    for i, block in enumerate(theirs.transformer_layers):
        np.testing.assert_allclose(to_numpy(scalars[f"blocks.{i}.layer_scalar"]), [to_numpy(block.layer_scalar)])


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_tokenizer_and_preprocessor_come_along(kind, presets, spm_path):
    _, directory = presets[kind]
    ours = keras_gemma.GemmaCausalLM.from_preset(directory)
    assert ours.preprocessor.sequence_length == 24
    theirs = keras_hub.models.Gemma4Tokenizer(proto=spm_path)
    text = "The quick brown fox"
    assert ours.preprocessor.tokenizer(text) == to_numpy(theirs(text)).tolist()
    # (keras-hub's SentencePiece leaves control pieces in text unmatched; ours
    # matches them, as transformers does.)
    turn = ours.preprocessor.tokenizer.token_to_id("<|turn>")
    assert ours.preprocessor.tokenizer("<|turn>user") == [turn] + ours.preprocessor.tokenizer("user")
    # Gemma 4's chat format; the E models' has no empty thought on the generation prompt.
    expected = "gemma4_e" if kind == "e" else "gemma4"
    assert ours.preprocessor.tokenizer.chat_format.name == expected
    tokenizer = GemmaTokenizer.from_preset(directory)
    assert tokenizer.chat_format.name == expected
    assert tokenizer(text) == ours.preprocessor.tokenizer(text)


def test_backbone_from_preset_and_saving_back(presets, tmp_path):
    """GemmaBackbone.from_preset reads it too; saved back, it is keras-hub's
    preset again: the same h5 datasets keras-hub wrote, the same model here."""
    _, directory = presets["dense"]
    backbone = keras_gemma.GemmaBackbone.from_preset(directory)
    lm = keras_gemma.GemmaCausalLM(backbone)
    ids, mask = padded_batch(SEQUENCE_LENGTH)
    expected = logits_of(lm, ids, mask)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*native preset")  # no fallback
        backbone.save_to_preset(str(tmp_path / "again"))
    assert h5_datasets(tmp_path / "again" / "model.weights.h5") == h5_datasets(os.path.join(directory, "model.weights.h5"))
    again = keras_gemma.GemmaBackbone.from_preset(str(tmp_path / "again"))
    assert again.config == backbone.config
    np.testing.assert_array_equal(logits_of(keras_gemma.GemmaCausalLM(again), ids, mask), expected)


# -- saved here, loaded by keras-hub -------------------------------------------


def h5_datasets(path):
    """Dataset path -> shape of an h5 file."""
    found = {}
    with h5py.File(path) as f:
        f.visititems(lambda name, obj: found.update({name: obj.shape}) if isinstance(obj, h5py.Dataset) else None)
    return found


def our_config(kind, **changes):
    """Our config for the keras-hub `CONFIGS[kind]` model."""
    config_json = {"class_name": "Gemma4Backbone", "registered_name": "keras_hub>Gemma4Backbone", "config": CONFIGS[kind]}
    return keras_hub_format.config_from_keras_hub(config_json).replace(**changes)


def our_lm(config, spm_path, seed):
    """Our model for `config`, random: N(0, 0.25), multipliers (layer and
    expert scalars) 1 + N(0, 0.25); norms are zero-centred here."""
    backbone = keras_gemma.GemmaBackbone(config)
    rng = np.random.default_rng(seed)
    for name, w in backbone.weight_map().items():
        offset = 1.0 if name.endswith(("layer_scalar", "_scale")) else 0.0
        w.assign((offset + rng.normal(0.0, SCALE, tuple(w.shape))).astype("float32"))
    preprocessor = GemmaCausalLMPreprocessor(GemmaTokenizer(spm_path), sequence_length=32)
    return keras_gemma.GemmaCausalLM(backbone, preprocessor=preprocessor)


# The E model saved here has 8-wide per-layer inputs: the norm of a 4-wide
# slice that happens to be small amplifies float32 rounding (up to 2e-3 apart
# on some seeds, keras-hub's JAX and PyTorch runs as much as ours and theirs).
SAVED_HERE = {"dense": {}, "e": dict(per_layer_input_dim=8), "moe": {}}


@pytest.fixture(scope="module")
def saved_here(spm_path, tmp_path_factory):
    """kind -> (our model, the keras-hub preset it saved as)."""
    out = {}
    for seed, kind in enumerate(CONFIGS):
        ours = our_lm(our_config(kind, **SAVED_HERE[kind]), spm_path, seed + 10)
        directory = str(tmp_path_factory.mktemp(f"ours_{kind}") / "preset")
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*native preset")  # a keras-hub preset: no fallback
            ours.save_to_preset(directory)
        out[kind] = (ours, directory)
    return out


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_preset_saved_here_loads_in_keras_hub(kind, saved_here, tmp_path):
    ours, directory = saved_here[kind]
    theirs = keras_hub.models.Gemma4CausalLM.from_preset(directory)
    assert theirs.preprocessor.sequence_length == 32
    ids, mask = padded_batch(SEQUENCE_LENGTH)
    expected = logits_of(ours, ids, mask)
    np.testing.assert_allclose(
        keras_hub_logits(theirs.backbone, ids, mask)[mask], expected[mask], atol=TOLERANCE, rtol=TOLERANCE
    )
    # The h5 datasets keras-hub writes for this architecture, no more, no fewer.
    theirs.backbone.save_weights(str(tmp_path / "theirs.weights.h5"))
    assert h5_datasets(os.path.join(directory, "model.weights.h5")) == h5_datasets(tmp_path / "theirs.weights.h5")
    # keras-hub's tokenizer reads our vocabulary asset.
    text = "The quick brown fox"
    assert to_numpy(theirs.preprocessor.tokenizer(text)).tolist() == ours.preprocessor.tokenizer(text)

    # And back here: the same model exactly, the E model's chat format included.
    again = keras_gemma.GemmaCausalLM.from_preset(directory)
    assert again.config == ours.config
    np.testing.assert_array_equal(logits_of(again, ids, mask), expected)
    assert again.preprocessor.tokenizer.chat_format.name == ("gemma4_e" if kind == "e" else "gemma4")


def test_tokenizer_saved_alone_is_keras_hubs_gemma4_tokenizer(spm_path, tmp_path):
    """A Gemma 4 vocabulary saves as keras-hub's Gemma4Tokenizer, its special-token
    flags those the vocabulary has (keras-hub checks them as it loads)."""
    tokenizer = GemmaTokenizer(spm_path)
    directory = str(tmp_path / "tokenizer")
    tokenizer.save_to_preset(directory)
    with open(os.path.join(directory, "tokenizer.json")) as f:
        config = json.load(f)
    assert config["class_name"] == "Gemma4Tokenizer"
    theirs = keras_hub.models.Gemma4Tokenizer.from_config(config["config"])  # as keras-hub's preset loader does
    theirs.load_preset_assets(directory)
    assert to_numpy(theirs("The quick brown fox")).tolist() == tokenizer("The quick brown fox")
    assert GemmaTokenizer.from_preset(directory)("The quick brown fox") == tokenizer("The quick brown fox")


@pytest.mark.parametrize(
    "changes, reason",
    [
        (dict(use_value_norm=False), r"`use_value_norm=False` \(its blocks always have the value norm\)"),
        (dict(use_layer_scalar=False), r"`use_layer_scalar=False`"),
        (dict(use_post_norms=False), r"`use_post_norms=False`"),
        (dict(query_pre_attn_scalar=8.0), r"`query_pre_attn_scalar=8` \(its attention scaling is always 1\)"),
        (dict(local_rope_fraction=0.5), r"`local_rope_fraction=0.5`"),
        (dict(global_rope_fraction=0.0), r"`global_rope_fraction=0` rotates no frequency pair"),
        (dict(global_keys_as_values=False), r"`num_global_key_value_heads=1` with `global_keys_as_values=False`"),
    ],
)
def test_what_keras_hub_cannot_express_is_named(changes, reason):
    assert keras_hub_format.gemma4_unexpressible(our_config("dense")) == []
    reasons = keras_hub_format.gemma4_unexpressible(our_config("dense", **changes))
    assert len(reasons) == 1 and re.search(reason, reasons[0])


def test_what_keras_hub_cannot_express_saves_as_native_preset(spm_path, tmp_path):
    """keras-hub's Gemma4Backbone always has the value norm and scales
    attention by 1: a model without them falls back to keras_gemma's native
    preset, with a warning naming both, and loads back exactly."""
    for kind in CONFIGS:
        assert keras_hub_format.gemma4_unexpressible(our_config(kind)) == []
    ours = our_lm(our_config("dense", use_value_norm=False, query_pre_attn_scalar=8.0), spm_path, seed=3)
    directory = str(tmp_path / "native")
    with pytest.warns(UserWarning, match=r"Gemma 4 model is saved as a keras_gemma native preset.*"
                                         r"Gemma4Backbone cannot express `use_value_norm=False`.*; "
                                         r"`query_pre_attn_scalar=8`"):
        ours.save_to_preset(directory)
    with open(os.path.join(directory, "metadata.json")) as f:
        assert json.load(f)["format"] == "keras_gemma_quantized"
    again = keras_gemma.GemmaCausalLM.from_preset(directory)
    assert again.config == ours.config
    ids, mask = padded_batch(SEQUENCE_LENGTH)
    np.testing.assert_array_equal(logits_of(again, ids, mask), logits_of(ours, ids, mask))


def rewrite_config(directory, **changes):
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["config"].update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def copy_preset(directory, tmp_path):
    import shutil

    target = str(tmp_path / "copy")
    shutil.copytree(directory, target)
    return target


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(enable_moe_block=True, num_experts=4), r"enable_moe_block needs expert_intermediate_dim"),
        (dict(is_embedding_model=True), r"embedding model"),
        (dict(use_bidirectional_attention=True), r"bidirectional attention over all tokens"),
        (dict(use_sliding_window_attention=False), r"use_sliding_window_attention=False"),
        (dict(layer_types=["sliding_attention"] * 5 + ["chunked_attention"]), r"unknown layer type.*chunked_attention"),
        (dict(num_kv_shared_layers=6), r"Gemma4Backbone config is not a model.*num_kv_shared_layers"),
        (dict(num_layers=None), r"Gemma4Backbone config lacks num_layers"),
    ],
)
def test_what_cannot_load_is_refused_by_name(presets, tmp_path, changes, message):
    directory = copy_preset(presets["dense"][1], tmp_path)
    rewrite_config(directory, **changes)
    with pytest.raises(CheckpointError, match=message):
        keras_gemma.GemmaCausalLM.from_preset(directory)


def test_weights_that_do_not_fit_are_named(presets, tmp_path):
    # A config that says 8-wide global heads: every global projection's shape is named.
    directory = copy_preset(presets["dense"][1], tmp_path)
    rewrite_config(directory, global_head_dim=8)
    with pytest.raises(CheckpointError, match=r"blocks\.2\.attention\.query has shape \(4, 32, 16\), expected \(4, 32, 8\)"):
        keras_gemma.GemmaCausalLM.from_preset(directory)
    # A weight missing from the file, and one the model has no place for: nothing is initialised silently.
    directory = copy_preset(presets["dense"][1], tmp_path / "b")
    with h5py.File(os.path.join(directory, "model.weights.h5"), "r+") as f:
        del f["layers/gemma4_text_decoder_block_1/attention/key_norm/vars/0"]
        f["layers/gemma4_text_decoder_block_1/extra/vars/0"] = np.zeros(3, "float32")
    with pytest.raises(CheckpointError, match=r"missing weights: blocks\.1\.attention\.key_norm.*unexpected weights: "
                                              r"h5:layers/gemma4_text_decoder_block_1/extra/vars/0"):
        keras_gemma.GemmaCausalLM.from_preset(directory)


def test_vision_encoder_weights_are_left_out(spm_path, tmp_path):
    """A multimodal Gemma4Backbone (as every released preset is): its text decoder loads."""
    from keras_hub.src.models.gemma4.gemma4_vision_encoder import Gemma4VisionEncoder

    vision = Gemma4VisionEncoder(
        image_size=16, patch_size=4, num_heads=2, hidden_dim=8, num_layers=1, intermediate_dim=16, head_dim=4,
        output_dim=32, pool_size=2, position_embedding_size=16, dtype="float32",
    )
    multimodal = keras_hub_backbone("e", seed=5, image_size=16, vision_encoder=vision)
    multimodal.save_to_preset(str(tmp_path / "multimodal"))
    with h5py.File(tmp_path / "multimodal" / "model.weights.h5") as f:
        assert "layers/gemma4_vision_encoder" in f
    ours = keras_gemma.GemmaBackbone.from_preset(str(tmp_path / "multimodal"))
    assert ours.config.per_layer_input_dim == 4

    # The same text decoder without the encoder, keras-hub's own weights by path: the same logits.
    text_only = keras_hub_backbone("e", seed=9)
    by_path = {v.path: v for v in multimodal.weights}
    for v in text_only.weights:
        v.assign(by_path[v.path])
    ids, mask = padded_batch(SEQUENCE_LENGTH)
    np.testing.assert_allclose(
        logits_of(keras_gemma.GemmaCausalLM(ours), ids, mask)[mask], keras_hub_logits(text_only, ids, mask)[mask],
        atol=TOLERANCE, rtol=TOLERANCE,
    )


@pytest.mark.parametrize("architecture", ["gemma4_31b", "gemma4_e2b", "gemma4_e4b", "gemma4_26b_a4b"])
def test_released_presets_read_as_their_architectures(architecture):
    """keras-hub's presets were converted from the released Hugging Face
    configs by keras-hub's own converter: its Gemma4Backbone config reads as
    the architecture of our built-in preset (context length included)."""
    from keras_hub.src.utils.transformers.convert_gemma4 import convert_backbone_config
    from gemma4_reference import E2B, E4B, RELEASED_26B_A4B
    from test_presets_family import gemma4_31b_config

    from keras_gemma.presets import ARCHITECTURES

    text = {
        "gemma4_31b": gemma4_31b_config()["text_config"], "gemma4_e2b": E2B, "gemma4_e4b": E4B,
        "gemma4_26b_a4b": RELEASED_26B_A4B,
    }[architecture]
    kwargs = convert_backbone_config({**text, "model_type": "gemma4_text"})
    config_json = {"class_name": "Gemma4Backbone", "registered_name": "keras_hub>Gemma4Backbone", "config": kwargs}
    assert keras_hub_format.config_from_keras_hub(config_json) == ARCHITECTURES[architecture]
