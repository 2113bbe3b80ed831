"""keras_gemma's quantized preset: keras-hub's directory layout, our own model files.

`save_to_preset` on an int8/int4 model (or a float Gemma 4 model whose config
keras-hub's `Gemma4Backbone` cannot express: `keras_hub_format.gemma4_unexpressible`
names why) writes

    config.json       {"class_name": "GemmaBackbone",
                       "registered_name": "keras_gemma>GemmaBackbone",
                       "config": GemmaBackbone.get_config()}  (with the
                       `quantization` record: mode and Keras' config)
    model.weights.h5  Keras' own `backbone.save_weights`: the int8 (int4:
                       packed) kernels with their scales (and zero points),
                       under our layer paths (a mixture of experts' banks
                       too, since format version 2)
    metadata.json     {"format": "keras_gemma_quantized", "format_version": 2, ...}

plus, for a `GemmaCausalLM`, the tokenizer and preprocessor files keras-hub
uses (`tokenizer.json`, `preprocessor.json`, `assets/tokenizer/vocabulary.spm`)
and a `task.json` naming our class.

`from_preset` builds the backbone from the config (which creates the int8/int4
variables directly) and calls `load_weights`, so the loaded model computes
exactly the saved one's logits. keras-hub cannot load this format: keras-hub
0.32 serializes a quantized layer's dtype policy without its quantization
config, so its int8 layers would also quantize activations and not reproduce
ours, and its weight layout differs. Save the float model (before `quantize`)
for a keras-hub preset.
"""

import datetime
import json
import os
import warnings

import keras

from keras_gemma.checkpoints import keras_hub_format
from keras_gemma.checkpoints.weights import CheckpointError
from keras_gemma.config import GemmaConfig

FORMAT = "keras_gemma_quantized"
# 2: a quantized mixture of experts stores its banks as int8/int4 with scales
# (version 1 left them float, which version 2 cannot load).
FORMAT_VERSION = 2
REGISTERED_NAME = "keras_gemma>GemmaBackbone"
TASK_REGISTERED_NAME = "keras_gemma>GemmaCausalLM"


def is_native(backbone):
    """Whether `save_to_preset` writes `backbone` in this format: quantized,
    or a Gemma 4 model that keras-hub's `Gemma4Backbone` cannot express."""
    return backbone.quantization is not None or bool(_gemma4_unexpressible(backbone.config))


def _gemma4_unexpressible(config):
    """What keras-hub cannot express of a Gemma 4 config (empty for Gemma 1-3)."""
    return keras_hub_format.gemma4_unexpressible(config) if config.gemma4_mechanisms() else []


def _kind(backbone):
    return backbone.quantization.mode if backbone.quantization is not None else "Gemma 4"


def is_quantized_config(config_json):
    """Whether a `config.json` dict is ours (a quantized preset), not keras-hub's."""
    return isinstance(config_json, dict) and config_json.get("registered_name") == REGISTERED_NAME


def config_json(backbone):
    return {
        "module": "keras_gemma.backbone",
        "class_name": "GemmaBackbone",
        "config": backbone.get_config(),
        "registered_name": REGISTERED_NAME,
    }


def task_json(backbone_config, preprocessor_config):
    return {
        "module": "keras_gemma.causal_lm",
        "class_name": "GemmaCausalLM",
        "config": {"backbone": backbone_config, "preprocessor": preprocessor_config},
        "registered_name": TASK_REGISTERED_NAME,
    }


def metadata_json(backbone):
    from keras_gemma import __version__

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "quantization": None if backbone.quantization is None else backbone.quantization.mode,
        "keras_version": keras.version(),
        "keras_gemma_version": __version__,
        "parameter_count": int(backbone.count_params()),
        "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"),
        "tasks": ["CausalLM"],
        "note": "keras_gemma's quantized preset: load it with keras_gemma's from_preset; keras-hub cannot.",
    }


def warn_not_keras_hub(backbone, directory):
    if backbone.quantization is not None:
        reason, advice = "", "For a keras-hub preset, save the float model before calling quantize()."
    else:
        reason = f" keras-hub's Gemma4Backbone cannot express {'; '.join(_gemma4_unexpressible(backbone.config))}."
        advice = "For transformers, use export_to_transformers()."
    warnings.warn(
        f"{directory}: this {_kind(backbone)} model is saved as a keras_gemma "
        f"native preset (metadata.json format {FORMAT!r}: Keras' save_weights, with the "
        f"quantized values and their scales where quantized).{reason} keras_gemma's from_preset loads it "
        f"exactly; keras-hub and transformers cannot. {advice}",
        UserWarning,
        stacklevel=5,  # the caller of save_to_preset
    )


def read_config(config_json_dict, path):
    """The `GemmaConfig` of one of our config.json dicts."""
    try:
        return GemmaConfig.from_dict(config_json_dict["config"]["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is not a valid keras_gemma quantized preset config: {e!r}") from None


def _check_metadata(directory):
    """The preset's format version (the current one without a metadata.json)."""
    path = os.path.join(directory, "metadata.json")
    if not os.path.exists(path):
        return FORMAT_VERSION
    try:
        with open(path, encoding="utf-8") as f:
            metadata = json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON (truncated or corrupt?): {e}") from None
    version = metadata.get("format_version", FORMAT_VERSION)
    if metadata.get("format", FORMAT) != FORMAT or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} says format {metadata.get('format')!r} version {version}; this keras_gemma "
            f"reads {FORMAT!r} up to version {FORMAT_VERSION}."
        )
    return version


def load_backbone(directory, config_json_dict, cls, dtype=None, load_weights=True):
    """The quantized backbone of a preset directory (the saved dtype unless `dtype` is given)."""
    version = _check_metadata(directory)
    config = dict(config_json_dict["config"])
    gemma_config = read_config(config_json_dict, os.path.join(directory, "config.json"))  # validates
    if version < 2 and config.get("quantization") and gemma_config.num_experts is not None:
        raise CheckpointError(
            f"{directory} is a quantized mixture-of-experts preset of format version {version}, which kept "
            "the expert banks in float; this keras_gemma quantizes them too and cannot load it. Quantize "
            "the float model again and save it with save_to_preset."
        )
    if dtype is not None:
        config["dtype"] = dtype
    backbone = cls.from_config(config)
    if load_weights:
        path = os.path.join(directory, "model.weights.h5")
        if not os.path.exists(path):
            raise CheckpointError(f"{directory} is a keras_gemma quantized preset without its weights: {path} is missing.")
        try:
            backbone.load_weights(path)
        except (ValueError, OSError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"Cannot load the quantized weights {path} (truncated, corrupt or for another model?): {e}") from None
    return backbone
