"""save_to_preset / from_preset of int8 and int4 models (keras_gemma's quantized
preset: identical logits after the round trip), and the saves that must refuse:
a LoRA-enabled model (adapters would be dropped) and a quantized export to
transformers (integer kernels without their scales)."""

import json
import os

import numpy as np
import pytest

import keras
import keras_gemma
from conftest import to_numpy
from keras_gemma.checkpoints import preset, quantized_format
from keras_gemma.checkpoints.weights import CheckpointError
from keras_gemma.preprocessor import GemmaCausalLMPreprocessor
from keras_gemma.tokenizer import GemmaTokenizer
from test_quantization import assign_random_weights, batch, new_model
from tokenizer_fixtures import tiny_spm_user_defined  # noqa: F401

NOT_KERAS_HUB = "keras-hub and transformers cannot"


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized(request):
    model = new_model()
    assign_random_weights(model)
    model.quantize(request.param)
    return model


def test_quantized_causal_lm_round_trip_is_exact(quantized, tmp_path):
    inputs = batch()
    expected = to_numpy(quantized(inputs))
    with pytest.warns(UserWarning, match=NOT_KERAS_HUB):
        quantized.save_to_preset(tmp_path / "preset")

    files = sorted(os.listdir(tmp_path / "preset"))
    assert files == ["config.json", "metadata.json", "model.weights.h5", "task.json"]
    with open(tmp_path / "preset" / "metadata.json") as f:
        metadata = json.load(f)
    assert metadata["format"] == quantized_format.FORMAT
    assert metadata["quantization"] == quantized.backbone.quantization.mode
    assert preset.resolve(str(tmp_path / "preset")).kind == preset.QUANTIZED

    restored = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path / "preset"))
    assert restored.backbone.quantization == quantized.backbone.quantization
    assert restored.config == quantized.config
    dtypes = lambda m: [(w.path, str(w.dtype)) for w in m.backbone.weights]  # noqa: E731
    assert dtypes(restored) == dtypes(quantized)
    np.testing.assert_array_equal(to_numpy(restored(inputs)), expected)


def test_quantized_backbone_round_trip_and_overwrite(quantized, tmp_path):
    """A backbone preset, saved twice into the same directory (the atomic
    replace path), loads with the same hidden states."""
    inputs = batch()
    expected = to_numpy(quantized.backbone(inputs))
    directory = tmp_path / "backbone"
    for _ in range(2):
        with pytest.warns(UserWarning, match=NOT_KERAS_HUB):
            quantized.backbone.save_to_preset(directory)
    assert not [name for name in os.listdir(tmp_path) if ".tmp-" in name]
    restored = keras_gemma.GemmaBackbone.from_preset(str(directory))
    np.testing.assert_array_equal(to_numpy(restored(inputs)), expected)
    unloaded = keras_gemma.GemmaBackbone.from_preset(str(directory), load_weights=False)
    assert unloaded.quantization == quantized.backbone.quantization


def test_quantized_preset_keeps_the_preprocessor(tmp_path, tiny_spm_user_defined):  # noqa: F811
    tokenizer = GemmaTokenizer(str(tiny_spm_user_defined))
    config = new_model().config.replace(vocabulary_size=tokenizer.vocabulary_size())
    model = keras_gemma.GemmaCausalLM(
        keras_gemma.GemmaBackbone(config),
        preprocessor=GemmaCausalLMPreprocessor(tokenizer, sequence_length=24),
    )
    model.quantize("int8")
    with pytest.warns(UserWarning, match=NOT_KERAS_HUB):
        model.save_to_preset(tmp_path / "task")
    restored = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path / "task"))
    assert restored.preprocessor.sequence_length == 24
    assert restored.preprocessor.tokenizer.get_vocabulary() == tokenizer.get_vocabulary()
    ids = np.array([[2] + tokenizer("the quick brown fox")], "int32")
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}
    np.testing.assert_array_equal(to_numpy(restored(inputs)), to_numpy(model(inputs)))


def test_quantized_preset_loads_in_another_dtype(tmp_path):
    model = new_model()
    model.quantize("int8")
    with pytest.warns(UserWarning):
        model.save_to_preset(tmp_path / "p")
    restored = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path / "p"), dtype="bfloat16")
    assert restored.backbone.compute_dtype == "bfloat16"
    assert restored.backbone.quantization.mode == "int8"
    assert restored.backbone.blocks[0].attention.query_dense._kernel.dtype == "int8"


def test_keras_hub_refuses_a_quantized_preset(tmp_path):
    keras_hub = pytest.importorskip("keras_hub")
    model = new_model()
    model.quantize("int8")
    with pytest.warns(UserWarning):
        model.backbone.save_to_preset(tmp_path / "p")
    with pytest.raises(ValueError, match="not a subclass"):
        keras_hub.models.Backbone.from_preset(str(tmp_path / "p"))


def test_lora_enabled_save_is_refused(tmp_path):
    model = new_model()
    model.backbone.enable_lora(2)
    for save in (model.save_to_preset, model.backbone.save_to_preset, model.export_to_transformers):
        with pytest.raises(ValueError, match=r"LoRA adapters enabled.*merge_lora_weights\(\).*save_lora_weights"):
            save(tmp_path / "out")
        assert not (tmp_path / "out").exists()
    model.backbone.merge_lora_weights()
    model.export_to_transformers(tmp_path / "out")  # now a plain float model
    assert preset.resolve(str(tmp_path / "out")).kind == preset.HUGGING_FACE


def test_lora_on_a_quantized_base_is_refused_too(tmp_path):
    model = new_model()
    model.quantize("int4")
    model.backbone.enable_lora(2)
    with pytest.raises(ValueError, match="merge_lora_weights"):
        model.save_to_preset(tmp_path / "out")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_export_to_transformers_is_refused(mode, tmp_path):
    model = new_model()
    model.quantize(mode)
    with pytest.raises(ValueError, match=f"quantized \\({mode}\\).*before calling quantize"):
        model.export_to_transformers(tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_truncated_quantized_weights_say_so(tmp_path):
    model = new_model()
    model.quantize("int8")
    with pytest.warns(UserWarning):
        model.save_to_preset(tmp_path / "p")
    weights = tmp_path / "p" / "model.weights.h5"
    weights.write_bytes(weights.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="model.weights.h5"):
        keras_gemma.GemmaCausalLM.from_preset(str(tmp_path / "p"))
