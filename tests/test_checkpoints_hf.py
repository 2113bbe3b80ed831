"""Hugging Face checkpoints: transformers' own files load here; ours load in transformers.

Tiny random models per generation (`hf_reference.py`: soft-caps that
saturate, windows shorter than the sequence, GQA/MQA, 27B-style query
scaling, Gemma 3's two rope bases) saved with `save_pretrained`, single-file
and sharded, load through `GemmaCausalLM.from_preset(dir)` with transformers'
logits within 1e-4 (float32, padded batch). `export_to_transformers` writes
what `AutoModelForCausalLM.from_pretrained` reads back with our logits.
"""

import json
import os

import numpy as np
import pytest
import torch
import transformers

import keras_gemma
from conftest import to_numpy
from hf_reference import (
    build_hf, gemma1_config, gemma2_config, gemma3_config, hf_logits, ours_from_hf, padded_batch,
)
from keras_gemma.checkpoints import safetensors_format
from keras_gemma.checkpoints.download import NoNetworkError
from keras_gemma.preprocessor import GemmaCausalLMPreprocessor
from keras_gemma.tokenizer import GemmaTokenizer
from tokenizer_fixtures import train_tiny_spm

TOLERANCE = 1e-4
CONFIGS = {
    "gemma": lambda: gemma1_config(num_key_value_heads=2),
    "gemma2": gemma2_config,
    "gemma3": gemma3_config,
}


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    return str(train_tiny_spm(tmp_path_factory.mktemp("spm") / "tokenizer.model", "control"))


def logits_of(model, ids, mask):
    return to_numpy(model({"token_ids": ids, "padding_mask": mask}))


def assert_same_logits(ours, hf_model):
    ids, mask = padded_batch(13)
    np.testing.assert_allclose(
        logits_of(ours, ids, mask)[mask], hf_logits(hf_model, ids, mask)[mask], atol=TOLERANCE, rtol=TOLERANCE
    )


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("generation", ["gemma", "gemma2", "gemma3"])
def test_transformers_checkpoint_loads_here(generation, sharded, spm_path, tmp_path):
    hf = build_hf(CONFIGS[generation](), seed=3)
    directory = str(tmp_path / "hf")
    hf.save_pretrained(directory, **({"max_shard_size": "40KB"} if sharded else {}))
    index = os.path.exists(os.path.join(directory, "model.safetensors.index.json"))
    assert index == sharded
    with open(spm_path, "rb") as src, open(os.path.join(directory, "tokenizer.model"), "wb") as dst:
        dst.write(src.read())

    ours = keras_gemma.GemmaCausalLM.from_preset(directory)
    assert ours.config.num_key_value_heads == 2
    assert_same_logits(ours, hf)
    assert ours.preprocessor.tokenizer("Hello world") == GemmaTokenizer(spm_path)("Hello world")


def test_bfloat16_checkpoint_loads_here(tmp_path):
    hf = build_hf(gemma3_config(), seed=4).to(torch.bfloat16)
    hf.save_pretrained(str(tmp_path))
    backbone = keras_gemma.GemmaBackbone.from_preset(str(tmp_path))
    expected = hf.model.embed_tokens.weight.float().detach().numpy()
    np.testing.assert_array_equal(to_numpy(backbone.token_embedding.embeddings), expected)
    bf16 = keras_gemma.GemmaBackbone.from_preset(str(tmp_path), dtype="bfloat16")
    assert bf16.token_embedding.embeddings.dtype == "bfloat16"


def test_multimodal_gemma3_checkpoint_loads_text_part(tmp_path):
    """model_type gemma3 (text_config inside), language-model tensors under `model.language_model.`."""
    hf = build_hf(gemma3_config(), seed=5)
    text = hf.config.to_dict()
    config = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "text_config": text}
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    tensors = {
        name.replace("model.", "model.language_model.", 1): (tuple(v.shape), np.float32, lambda v=v: v.numpy())
        for name, v in hf.state_dict().items()
        if name != "lm_head.weight"
    }
    tensors["model.vision_tower.patch_embedding.weight"] = ((2, 3), np.float32, lambda: np.ones((2, 3), np.float32))
    safetensors_format.write_tensors(str(tmp_path / "model.safetensors"), tensors, {"format": "pt"})
    assert_same_logits(keras_gemma.GemmaCausalLM.from_preset(str(tmp_path)), hf)


def randomized(ours, seed):
    rng = np.random.default_rng(seed)
    for w in ours.backbone.weights:
        w.assign(rng.normal(0.0, 0.25, tuple(w.shape)).astype("float32"))
    return ours


@pytest.mark.parametrize("generation", ["gemma", "gemma2", "gemma3"])
def test_export_to_transformers_round_trips(generation, spm_path, tmp_path):
    ours = randomized(ours_from_hf(build_hf(CONFIGS[generation](), seed=6)), seed=8)  # fresh weights, not HF's
    ours = keras_gemma.GemmaCausalLM(ours.backbone, preprocessor=GemmaCausalLMPreprocessor(GemmaTokenizer(spm_path)))
    directory = str(tmp_path / "export")
    ours.export_to_transformers(directory)

    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    expected_class = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
    assert type(hf).__name__ == expected_class[generation]
    assert hf.config.num_key_value_heads == 2
    if generation != "gemma":
        assert hf.model.layers[0].post_feedforward_layernorm.weight.abs().sum() > 0  # post-norms carried
    assert_same_logits(ours, hf)
    with open(os.path.join(directory, "tokenizer.model"), "rb") as f, open(spm_path, "rb") as g:
        assert f.read() == g.read()

    # And back: the exported directory is itself a preset.
    again = keras_gemma.GemmaCausalLM.from_preset(directory)
    assert again.config == ours.config
    assert_same_logits(again, hf)


def test_hf_handle_resolves_from_the_hub_cache(tmp_path, monkeypatch):
    """`hf://org/name` goes through huggingface_hub (offline here: answered from its cache)."""
    hf = build_hf(gemma2_config(), seed=9)
    cache = tmp_path / "hub"
    repo = cache / "models--google--tiny-gemma"
    commit = "0123456789abcdef0123456789abcdef01234567"
    hf.save_pretrained(str(repo / "snapshots" / commit))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert_same_logits(keras_gemma.GemmaCausalLM.from_preset("hf://google/tiny-gemma"), hf)

    with pytest.raises(NoNetworkError, match="could not be reached"):
        keras_gemma.GemmaBackbone.from_preset("hf://google/not-in-the-cache")
