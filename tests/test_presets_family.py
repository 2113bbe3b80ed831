"""Presets of the releases on existing architectures (FunctionGemma, MedGemma,
VaultGemma, ShieldGemma, TranslateGemma) and Gemma 4 31B.

Handles are written out here from keras-hub's preset files, not read from
presets.py. Parameter counts are checked three ways: against the published
figure, against keras-hub's preset metadata (read from its files), and
against transformers' own model built on the meta device (no memory) from
the released config. VaultGemma's block (Gemma 2 without post-norms) is
checked against transformers' `VaultGemmaForCausalLM` on a tiny config.
"""

import importlib.util
import json
import os
import re

import numpy as np
import pytest
import torch
import transformers

import keras_gemma
from conftest import to_numpy
from hf_reference import VOCAB, build_hf, hf_logits, ours_from_hf, padded_batch
from keras_gemma.checkpoints import download, preset
from keras_gemma.checkpoints.huggingface import config_from_hf, config_to_hf, model_type_of
from keras_gemma.config import GLOBAL, LOCAL
from keras_gemma.presets import ARCHITECTURES, PRESETS, PUBLISHED_PARAMETERS

TOLERANCE = 1e-4

# name: (kaggle handle, architecture, instruct, Hugging Face repo). Kaggle
# handles from keras-hub 0.32's gemma3_presets.py, gemma_presets.py and
# gemma4_presets.py; HF repos from the model cards.
NEW = {
    "function_gemma_instruct_270m": (
        "kaggle://keras/function-gemma/keras/function_gemma_instruct_270m/1", "gemma3_270m", True,
        "google/functiongemma-270m-it",
    ),
    "medgemma_instruct_27b_text": (
        "kaggle://keras/medgemma/keras/medgemma_instruct_27b_text/1", "gemma3_27b", True,
        "google/medgemma-27b-text-it",
    ),
    "vault_gemma_1b_en": ("kaggle://keras/vaultgemma/keras/vault_gemma_1b_en/2", "vaultgemma_1b", False, "google/vaultgemma-1b"),
    "shieldgemma_2b_en": ("kaggle://google/shieldgemma/keras/shieldgemma_2b_en/2", "gemma2_2b", True, "google/shieldgemma-2b"),
    "shieldgemma_9b_en": ("kaggle://google/shieldgemma/keras/shieldgemma_9b_en/2", "gemma2_9b", True, "google/shieldgemma-9b"),
    "shieldgemma_27b_en": (
        "kaggle://google/shieldgemma/keras/shieldgemma_27b_en/2", "gemma2_27b", True, "google/shieldgemma-27b",
    ),
    "translategemma_4b_it": (
        "kaggle://keras/translategemma/keras/translategemma_4b_it/1", "gemma3_4b", True, "google/translategemma-4b-it",
    ),
    "translategemma_12b_it": (
        "kaggle://keras/translategemma/keras/translategemma_12b_it/1", "gemma3_12b", True,
        "google/translategemma-12b-it",
    ),
    "translategemma_27b_it": (
        "kaggle://keras/translategemma/keras/translategemma_27b_it/1", "gemma3_27b", True,
        "google/translategemma-27b-it",
    ),
    "gemma4_31b": ("kaggle://keras/gemma4/keras/gemma4_31b/2", "gemma4_31b", False, "google/gemma-4-31B"),
    "gemma4_instruct_31b": ("kaggle://keras/gemma4/keras/gemma4_instruct_31b/2", "gemma4_31b", True, "google/gemma-4-31B-it"),
    "gemma4_2b": ("kaggle://keras/gemma4/keras/gemma4_2b/2", "gemma4_e2b", False, "google/gemma-4-E2B"),
    "gemma4_instruct_2b": ("kaggle://keras/gemma4/keras/gemma4_instruct_2b/2", "gemma4_e2b", True, "google/gemma-4-E2B-it"),
    "gemma4_4b": ("kaggle://keras/gemma4/keras/gemma4_4b/2", "gemma4_e4b", False, "google/gemma-4-E4B"),
    "gemma4_instruct_4b": ("kaggle://keras/gemma4/keras/gemma4_instruct_4b/2", "gemma4_e4b", True, "google/gemma-4-E4B-it"),
    "gemma4_26b_a4b": ("kaggle://keras/gemma4/keras/gemma4_26b_a4b/2", "gemma4_26b_a4b", False, "google/gemma-4-26B-A4B"),
    "gemma4_instruct_26b_a4b": (
        "kaggle://keras/gemma4/keras/gemma4_instruct_26b_a4b/2", "gemma4_26b_a4b", True, "google/gemma-4-26B-A4B-it",
    ),
}

# Published text-model parameter counts of the new architectures.
# VaultGemma 1B: keras-hub's `vault_gemma_1b_en` metadata. Gemma 4 31B: the
# language model's tensors in gemma-4-31b-it's safetensors (30,697,345,340 of
# 31,273,088,876; the vision tower is 569,550,384 and its projector 6,193,152),
# the model card's "30.7B".
PUBLISHED = {"vaultgemma_1b": 1_038_741_120, "gemma4_31b": 30_697_345_340}


def vaultgemma_1b_config():
    """google/vaultgemma-1b's config.json (transformers' `vaultgemma`): every
    layer global, no soft-caps, 1024 positions."""
    return {
        "architectures": ["VaultGemmaForCausalLM"], "model_type": "vaultgemma", "vocab_size": 256000,
        "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4,
        "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256,
        "sliding_window": 512, "layer_types": ["full_attention"] * 26, "attn_logit_softcapping": None,
        "final_logit_softcapping": None, "rope_theta": 10000.0, "tie_word_embeddings": True,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
    }


def gemma4_31b_config():
    """google/gemma-4-31B's config.json (its `text_config`; the vision tower is not ours)."""
    text = {
        "model_type": "gemma4_text", "vocab_size": 262144, "hidden_size": 5376, "intermediate_size": 21504,
        "num_hidden_layers": 60, "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 256,
        "global_head_dim": 512, "num_global_key_value_heads": 4, "attention_k_eq_v": True,
        "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 10, "sliding_window": 1024,
        "final_logit_softcapping": 30.0, "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu_pytorch_tanh", "enable_moe_block": False, "hidden_size_per_layer_input": 0,
        "num_kv_shared_layers": 0, "use_double_wide_mlp": False, "vocab_size_per_layer_input": 262144,
        "tie_word_embeddings": True,
        "rope_parameters": {
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    }
    return {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4", "text_config": text}


# -- the registry --------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(NEW))
def test_new_preset_entries(name):
    handle, architecture, instruct, hf_repo = NEW[name]
    entry = keras_gemma.get_preset(name)
    assert (entry.kaggle_handle, entry.architecture, entry.instruct, entry.hf_handle) == (
        handle, architecture, instruct, f"hf://{hf_repo}"
    )
    assert preset.preset_handle(name) == handle


@pytest.mark.parametrize("architecture", sorted(PUBLISHED))
def test_new_architectures_have_the_published_count(architecture):
    assert ARCHITECTURES[architecture].num_parameters() == PUBLISHED[architecture]
    assert PUBLISHED_PARAMETERS[architecture] == PUBLISHED[architecture]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_handle_is_well_formed(name):
    entry = PRESETS[name]
    match = re.fullmatch(r"kaggle://([a-z0-9-]+)/([a-z0-9-]+)/keras/([a-z0-9_.]+)/([0-9]+)", entry.kaggle_handle)
    assert match, entry.kaggle_handle
    assert match.group(3) == name
    assert download.parse_kaggle_handle(entry.kaggle_handle) == entry.kaggle_handle[len("kaggle://"):]
    assert entry.hf_handle is None or re.fullmatch(r"hf://google/[A-Za-z0-9._-]+", entry.hf_handle)
    assert entry.architecture in ARCHITECTURES and entry.description


def test_unknown_name_still_lists_every_valid_name():
    with pytest.raises(ValueError) as info:
        keras_gemma.get_preset("gemma4_31b_en")
    message = str(info.value)
    for name in PRESETS:
        assert name in message
    with pytest.raises(ValueError, match="vault_gemma_1b_en"):
        keras_gemma.GemmaCausalLM.from_preset("vaultgemma_1b_en")


def test_failed_kaggle_download_names_the_hugging_face_copy(monkeypatch):
    def refuse(handle):
        raise download.GatedModelError(f"Kaggle refused to serve {handle} (HTTP 403).")

    monkeypatch.setattr(download, "kaggle_download", refuse)
    with pytest.raises(download.GatedModelError, match=r"HTTP 403\)\. The same model is on Hugging Face: "
                       r"from_preset\('hf://google/gemma-4-31B-it'\)"):
        keras_gemma.GemmaCausalLM.from_preset("gemma4_instruct_31b")


def _keras_hub_presets(relative):
    """`backbone_presets` of a keras-hub preset file, read without importing keras-hub."""
    spec = importlib.util.find_spec("keras_hub")
    assert spec is not None, "keras-hub (the tests extra) is the reference for these handles and counts"
    path = os.path.join(os.path.dirname(spec.origin), "src", "models", relative)
    module_spec = importlib.util.spec_from_file_location("presets_" + relative.replace("/", "_"), path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.backbone_presets


def test_handles_and_counts_match_keras_hub():
    theirs = {}
    for relative in ("gemma/gemma_presets.py", "gemma3/gemma3_presets.py", "gemma4/gemma4_presets.py"):
        theirs.update(_keras_hub_presets(relative))
    for name in NEW:
        assert theirs[name]["kaggle_handle"] == PRESETS[name].kaggle_handle
    # Text-only presets: keras-hub's count is the text model's.
    for name in ("function_gemma_instruct_270m", "medgemma_instruct_27b_text", "vault_gemma_1b_en",
                 "shieldgemma_2b_en", "shieldgemma_9b_en", "shieldgemma_27b_en"):
        assert theirs[name]["metadata"]["params"] == PRESETS[name].config.num_parameters()
    # TranslateGemma's presets are vision+text with exactly Gemma 3's count, so
    # the text part is Gemma 3's (whose text count is the published one).
    for size in ("4b", "12b", "27b"):
        assert theirs[f"translategemma_{size}_it"]["metadata"]["params"] == theirs[f"gemma3_instruct_{size}"]["metadata"]["params"]
        assert PRESETS[f"translategemma_{size}_it"].config == PRESETS[f"gemma3_instruct_{size}_text"].config
    # keras-hub rounds Gemma 4 31B (vision+text) to 31e9; the text decoder is 30.7e9.
    assert round(PRESETS["gemma4_31b"].config.num_parameters() / 1e8) == 307


# -- against the released configs and transformers -----------------------------

def test_gemma4_31b_is_the_released_config():
    config = ARCHITECTURES["gemma4_31b"]
    assert config_from_hf(gemma4_31b_config()) == config
    assert config_from_hf(gemma4_31b_config()["text_config"]) == config
    assert [i for i, t in enumerate(config.layer_types) if t == GLOBAL] == list(range(5, 60, 6))
    assert (config.sliding_window_size, config.global_head_dim, config.num_global_key_value_heads) == (1024, 512, 4)
    assert (config.global_rope_fraction, config.local_rope_fraction) == (0.25, 1.0)
    assert (config.global_rope_base, config.local_rope_base) == (1_000_000.0, 10_000.0)
    assert config.global_keys_as_values and config.final_logit_softcap == 30.0
    assert config.max_sequence_length == 262_144 and config.vocabulary_size == 262_144


def test_vaultgemma_is_the_released_config():
    config = ARCHITECTURES["vaultgemma_1b"]
    assert config_from_hf(vaultgemma_1b_config()) == config
    assert not config.use_post_norms and LOCAL not in config.layer_types
    assert config.attention_logit_softcap is None and config.final_logit_softcap is None
    assert config.max_sequence_length == 1024


def _transformers_count(model_class, config_class, hf):
    """Tensors transformers saves for `hf`, counted on the meta device (no memory)."""
    hf = {k: v for k, v in hf.items() if k not in ("model_type", "architectures")}
    with torch.device("meta"):
        model = model_class(config_class(**hf))
    tensors = dict(model.named_parameters())
    tensors.update((k, v) for k, v in model.named_buffers() if k.endswith("layer_scalar"))  # saved, not trained
    return sum(v.numel() for v in tensors.values())


def test_transformers_counts_the_same_parameters():
    count = _transformers_count(
        transformers.Gemma4ForCausalLM, transformers.Gemma4TextConfig, gemma4_31b_config()["text_config"]
    )
    assert count == ARCHITECTURES["gemma4_31b"].num_parameters()
    count = _transformers_count(transformers.VaultGemmaForCausalLM, transformers.VaultGemmaConfig, vaultgemma_1b_config())
    assert count == ARCHITECTURES["vaultgemma_1b"].num_parameters()


# -- VaultGemma against transformers --------------------------------------------

def vaultgemma_config(**overrides):
    """Tiny VaultGemma with a window (4) and soft-caps that bite; the real
    1B has neither (overridden in the second parametrization)."""
    args = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=4, attn_logit_softcapping=4.0, final_logit_softcapping=6.0,
        max_position_embeddings=256,
    )
    return transformers.VaultGemmaConfig(**{**args, **overrides})


AS_RELEASED = dict(layer_types=["full_attention"] * 4, attn_logit_softcapping=None, final_logit_softcapping=None,
                   query_pre_attn_scalar=16)


@pytest.fixture(scope="module", params=["windows_and_caps", "as_released"])
def vault(request):
    overrides = AS_RELEASED if request.param == "as_released" else {}
    hf_model = build_hf(vaultgemma_config(**overrides), seed=3)
    return hf_model, ours_from_hf(hf_model)


def test_vaultgemma_logits_match_transformers(vault):
    hf_model, ours = vault
    assert not ours.config.use_post_norms
    ids, mask = padded_batch(13)
    actual = to_numpy(ours({"token_ids": ids, "padding_mask": mask}))
    expected = hf_logits(hf_model, ids, mask)
    np.testing.assert_allclose(actual[mask], expected[mask], atol=TOLERANCE, rtol=TOLERANCE)
    # The pre-ffw norm was loaded from VaultGemma's name for it, and it matters.
    scale = ours.backbone.blocks[1].pre_ffw_norm.scale
    np.testing.assert_array_equal(
        to_numpy(scale), hf_model.model.layers[1].pre_feedforward_layernorm.weight.detach().numpy()
    )


def test_vaultgemma_checkpoint_round_trips(vault, tmp_path):
    hf_model, ours = vault
    hf_model.save_pretrained(str(tmp_path / "hf"))
    loaded = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path / "hf"))
    ids, mask = padded_batch(13)
    expected = hf_logits(hf_model, ids, mask)
    np.testing.assert_allclose(
        to_numpy(loaded({"token_ids": ids, "padding_mask": mask}))[mask], expected[mask], atol=TOLERANCE, rtol=TOLERANCE
    )
    # Exported: as `vaultgemma` where windows or caps need it, else as Gemma 1 (the same math).
    ours.export_to_transformers(str(tmp_path / "out"))
    with open(tmp_path / "out" / "config.json") as f:
        written = json.load(f)["model_type"]
    assert written == model_type_of(ours.config) == ("gemma" if LOCAL not in ours.config.layer_types else "vaultgemma")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager")
    np.testing.assert_allclose(hf_logits(theirs.float().eval(), ids, mask)[mask], expected[mask], atol=TOLERANCE, rtol=TOLERANCE)
    assert config_from_hf(config_to_hf(ours.config)) == ours.config


def test_unreadable_kaggle_preset_names_the_hugging_face_copy(monkeypatch, tmp_path):
    """keras-hub's Gemma 4 presets (`Gemma4Backbone`s) load
    (tests/test_checkpoints_keras_hub_gemma4.py); one this reader cannot read
    (here a config without its sizes; or mixture of experts) names the
    Hugging Face copy in the error."""
    config = {"module": "keras_hub.src.models.gemma4.gemma4_backbone", "class_name": "Gemma4Backbone",
              "config": {}, "registered_name": "keras_hub>Gemma4Backbone"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(download, "kaggle_download", lambda handle: str(tmp_path))
    with pytest.raises(
        preset.CheckpointError, match=r"Gemma4Backbone config lacks .*from_preset\('hf://google/gemma-4-31B'\)"
    ):
        keras_gemma.GemmaCausalLM.from_preset("gemma4_31b")
