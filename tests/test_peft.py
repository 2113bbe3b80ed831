"""LoRA adapters in PEFT's format: ours load onto `export_to_transformers`'
model with `peft.PeftModel.from_pretrained`, and adapters made by peft load
into ours, with the same logits (float32, non-zero B so the adapter bites)."""

import os

import numpy as np
import pytest

import peft
import torch
import transformers

from conftest import to_numpy
from hf_reference import build_hf, gemma2_config, gemma3_config, hf_logits, ours_from_hf, padded_batch
from keras_gemma.lora import targeted_layers

CONFIGS = {"gemma2": gemma2_config, "gemma3": gemma3_config}
TOLERANCE = 1e-4


def ours_logits(lm, ids, mask):
    return to_numpy(lm({"token_ids": ids, "padding_mask": mask}))


def assert_same_logits(actual, expected, mask):
    np.testing.assert_allclose(actual[mask], expected[mask], atol=TOLERANCE * np.abs(expected[mask]).max())


@pytest.mark.parametrize("generation", ["gemma2", "gemma3"])
def test_our_adapter_loads_into_peft(generation, tmp_path):
    ours = ours_from_hf(build_hf(CONFIGS[generation]()))
    base_dir, adapter_dir = str(tmp_path / "base"), str(tmp_path / "adapter")
    ours.backbone.export_to_transformers(base_dir)
    ours.backbone.enable_lora(2, alpha=3, target_layers="all")
    rng = np.random.default_rng(0)
    for _, layer in targeted_layers(ours.backbone, ours.backbone.lora.targets):
        for variable in (layer.lora_kernel_a, layer.lora_kernel_b):
            variable.assign(rng.normal(size=variable.shape).astype("float32") * 0.2)
    ours.backbone.save_lora_weights(adapter_dir, format="peft")
    assert sorted(os.listdir(adapter_dir)) == ["adapter_config.json", "adapter_model.safetensors"]

    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    ids, mask = padded_batch()
    without = hf_logits(base, ids, mask)
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    expected = hf_logits(model, ids, mask)
    assert np.abs(expected - without)[mask].max() > 0.1  # the adapter bites
    assert_same_logits(ours_logits(ours, ids, mask), expected, mask)


@pytest.mark.parametrize("generation", ["gemma2", "gemma3"])
def test_peft_adapter_loads_into_ours(generation, tmp_path):
    hf = build_hf(CONFIGS[generation]())
    ours = ours_from_hf(hf)
    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    model = peft.get_peft_model(hf, config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    adapter_dir = str(tmp_path / "adapter")
    model.save_pretrained(adapter_dir)
    ids, mask = padded_batch()
    expected = hf_logits(model, ids, mask)

    ours.backbone.load_lora_weights(adapter_dir)
    assert ours.backbone.lora.targets == ("query", "value", "output", "down")
    assert_same_logits(ours_logits(ours, ids, mask), expected, mask)

    # And back out again: the same logits through PEFT.
    again = str(tmp_path / "again")
    ours.backbone.save_lora_weights(again, format="peft")
    base = build_hf(CONFIGS[generation]())
    reloaded = peft.PeftModel.from_pretrained(base, again).eval()
    assert_same_logits(hf_logits(reloaded, ids, mask), expected, mask)


def test_adapter_for_another_model_changes_nothing(tmp_path):
    gemma3 = build_hf(gemma3_config())
    adapter_dir = str(tmp_path / "adapter")
    model = peft.get_peft_model(gemma3, peft.LoraConfig(r=2, target_modules=["q_proj", "up_proj"]))
    model.save_pretrained(adapter_dir)
    ours = ours_from_hf(build_hf(gemma2_config()))
    ids, mask = padded_batch()
    before = ours_logits(ours, ids, mask)
    weights = len(ours.weights)
    with pytest.raises(ValueError, match="has tensors this model has no place for"):
        ours.backbone.load_lora_weights(adapter_dir)  # Gemma 3's 7 layers, Gemma 2's 4 and other shapes
    assert ours.backbone.lora is None and len(ours.weights) == weights

    other_rank = str(tmp_path / "rank")
    gemma2 = build_hf(gemma2_config())
    peft.get_peft_model(gemma2, peft.LoraConfig(r=2, target_modules=["up_proj"])).save_pretrained(other_rank)
    ours.backbone.enable_lora(4, target_layers=["up"])
    with pytest.raises(ValueError, match=r"needs LoRA rank 2 on \['up'\], but this model's LoRA is rank 4"):
        ours.backbone.load_lora_weights(other_rank)
    np.testing.assert_array_equal(ours_logits(ours, ids, mask), before)  # B still zero: unchanged
    with pytest.raises(ValueError, match="Unknown LoRA adapter format 'gguf'"):
        ours.backbone.save_lora_weights(str(tmp_path / "x"), format="gguf")
