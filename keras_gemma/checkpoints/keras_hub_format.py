"""The keras-hub (and keras-nlp) preset layout: what Kaggle serves.

A preset directory holds `config.json` (the serialized `GemmaBackbone` or
`Gemma3Backbone`), `model.weights.h5` (or `model.weights.json` and shards),
`metadata.json`, and for tasks `tokenizer.json`, `preprocessor.json`,
`task.json` and `assets/tokenizer/vocabulary.spm`.

Inside the h5 file every weight lives at `layers/<layer>/.../vars/0`. The
paths below were read off presets that keras-hub 0.32 saves itself
(`tests/test_checkpoints_keras_hub.py` checks them the same way):

    layers/reversible_embedding/vars/0                        (v, d)
    layers/rms_normalization/vars/0                           (d,)  final norm
    layers/<block>/{pre_attention_norm,post_attention_norm,
                    pre_ffw_norm,post_ffw_norm}/vars/0        (d,)
    layers/<block>/attention/{query_dense (n, d, h), key_dense (k, d, h),
                    value_dense (k, d, h), output_dense (n, h, d)}/vars/0
    layers/<block>/attention/{query_norm,key_norm}/vars/0     (h,)  Gemma 3
    layers/<block>/gating_ffw/vars/0 (d, f)   gelu branch
    layers/<block>/gating_ffw_2/vars/0 (d, f) linear branch
    layers/<block>/ffw_linear/vars/0 (f, d)

`<block>` is `gemma_decoder_block` (Gemma 1/2) or `gemma3_decoder_block`,
with `_1`, `_2`, ... for blocks after the first. Our weight layouts equal
keras-hub's, so no transposes; only names move.

Two differences of convention: keras-hub's Gemma 1/2 `intermediate_dim` is
twice the per-gate width (ours and HF's), and keras-hub 0.32 always scales
queries by `head_dim ** -0.5` although its config carries
`query_head_dim_normalize` (False for Gemma 2 27B and Gemma 3 27B, meaning
`(hidden_dim / num_query_heads) ** -0.5`). We honour the flag, which matches
transformers and the Gemma reports; keras-hub itself gets 27B wrong.
"""

import datetime
import json
import os
import re
import warnings

import h5py
import keras
import ml_dtypes
import numpy as np

from keras_gemma.checkpoints.weights import CheckpointError, LazyTensor
from keras_gemma.config import GLOBAL, LOCAL, GemmaConfig, layer_pattern
from keras_gemma.presets import ARCHITECTURES

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
SHARDED_WEIGHTS_FILE = "model.weights.json"
METADATA_FILE = "metadata.json"
TOKENIZER_FILE = "tokenizer.json"
PREPROCESSOR_FILE = "preprocessor.json"
TASK_FILE = "task.json"
VOCABULARY_PATH = os.path.join("assets", "tokenizer", "vocabulary.spm")

GEMMA_CLASSES = ("GemmaBackbone", "Gemma3Backbone")
GEMMA2_PATTERN = (LOCAL, GLOBAL)  # keras-hub: `i % 2 == 0` is local
GEMMA3_PATTERN = (LOCAL,) * 5 + (GLOBAL,)  # keras-hub: `i % 6 < 5` is local
GEMMA3_LOCAL_BASE, GEMMA3_GLOBAL_BASE = 10_000.0, 1_000_000.0
# The tokens keras-hub's Gemma3Tokenizer requires unless `has_vision_tokens=False`.
VISION_TOKENS = ("<img>", "<start_of_image>", "<end_of_image>")


def is_keras_hub_config(config_json):
    return isinstance(config_json, dict) and "registered_name" in config_json and "class_name" in config_json


def _class_name(config_json, path):
    name = config_json.get("class_name")
    registered = config_json.get("registered_name") or ""
    if name not in GEMMA_CLASSES:
        raise CheckpointError(
            f"{path} describes a {registered or name!r}, not a Gemma backbone "
            f"(expected class_name {' or '.join(GEMMA_CLASSES)})."
        )
    return name


def _max_sequence_length(config, default):
    """The context length of the known architecture `config` is, else `default`."""
    for known in ARCHITECTURES.values():
        if known.replace(max_sequence_length=config.max_sequence_length) == config:
            return known.max_sequence_length
    return default


def config_from_keras_hub(config_json, path=CONFIG_FILE):
    """A `GemmaConfig` from a keras-hub / keras-nlp backbone `config.json` dict."""
    class_name = _class_name(config_json, path)
    c = config_json["config"]
    n = c["num_layers"]
    post_attention, post_ffw = c.get("use_post_attention_norm", False), c.get("use_post_ffw_norm", False)
    if post_attention != post_ffw:
        raise CheckpointError(f"{path}: a model with only one of the two post-norms is not a Gemma.")
    sliding = c.get("use_sliding_window_attention", False)
    head_dim, hidden, heads = c["head_dim"], c["hidden_dim"], c["num_query_heads"]
    fields = dict(
        vocabulary_size=c["vocabulary_size"],
        num_layers=n,
        hidden_dim=hidden,
        num_query_heads=heads,
        num_key_value_heads=c["num_key_value_heads"],
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim if c.get("query_head_dim_normalize", True) else hidden // heads,
        attention_logit_softcap=c.get("attention_logit_soft_cap"),
        final_logit_softcap=c.get("final_logit_soft_cap"),
        use_post_norms=bool(post_attention),
        layer_norm_epsilon=c.get("layer_norm_epsilon", 1e-6),
        dropout=float(c.get("dropout", 0.0)),
    )
    if class_name == "GemmaBackbone":
        if c["intermediate_dim"] % 2:
            raise CheckpointError(f"{path}: keras-hub's Gemma intermediate_dim must be even (two gates).")
        fields.update(
            intermediate_dim=c["intermediate_dim"] // 2,
            layer_types=layer_pattern(n, GEMMA2_PATTERN) if sliding else None,
            sliding_window_size=c.get("sliding_window_size", 4096) if sliding else None,
        )
        default_length = 8192
    else:
        if c.get("is_embedding_model") or c.get("use_bidirectional_attention"):
            raise CheckpointError(f"{path}: an embedding (bidirectional) Gemma 3 is not a causal language model.")
        fields.update(
            intermediate_dim=c["intermediate_dim"],
            layer_types=layer_pattern(n, GEMMA3_PATTERN) if sliding else (GLOBAL,) * n,
            sliding_window_size=c.get("sliding_window_size", 1024) if sliding else None,
            use_qk_norm=c.get("use_query_key_norm", True),
            global_rope_base=GEMMA3_GLOBAL_BASE,
            local_rope_base=GEMMA3_LOCAL_BASE,
            global_rope_scaling=float(c.get("global_rope_scaling_factor", 1.0)),
            local_rope_scaling=float(c.get("local_rope_scaling_factor", 1.0)),
        )
        default_length = 131_072
    config = GemmaConfig(**fields)
    return config.replace(max_sequence_length=_max_sequence_length(config, default_length))


def backbone_class_for(config):
    """`GemmaBackbone` or `Gemma3Backbone`: the keras-hub class that can express `config`.

    Raises ValueError naming what keras-hub cannot express.
    """
    if config.gemma4_mechanisms():
        raise ValueError(
            f"keras-hub's GemmaBackbone and Gemma3Backbone have no Gemma 4 mechanisms "
            f"({', '.join(config.gemma4_mechanisms())}); use export_to_transformers."
        )
    n = config.num_layers
    gemma3 = config.use_qk_norm or (config.global_rope_base, config.local_rope_base) != (10_000.0, 10_000.0)
    if not gemma3:
        if (config.global_rope_scaling, config.local_rope_scaling) != (1.0, 1.0):
            raise ValueError("keras-hub's GemmaBackbone has no rope scaling.")
        if config.layer_types not in ((GLOBAL,) * n, layer_pattern(n, GEMMA2_PATTERN)):
            raise ValueError("keras-hub's GemmaBackbone puts sliding windows on even layers only (or none).")
        return "GemmaBackbone"
    if config.layer_types == (GLOBAL,) * n:
        if config.global_rope_base != GEMMA3_GLOBAL_BASE:
            raise ValueError(f"keras-hub's Gemma3Backbone uses rope base {GEMMA3_GLOBAL_BASE:g} on global layers.")
    elif config.layer_types == layer_pattern(n, GEMMA3_PATTERN):
        if (config.global_rope_base, config.local_rope_base) != (GEMMA3_GLOBAL_BASE, GEMMA3_LOCAL_BASE):
            raise ValueError("keras-hub's Gemma3Backbone uses rope bases 1e6 (global) and 1e4 (local).")
    else:
        raise ValueError("keras-hub's Gemma3Backbone puts five local layers before each global one (or none).")
    return "Gemma3Backbone"


def _dtype_json(name):
    return {"module": "keras", "class_name": "DTypePolicy", "config": {"name": name}, "registered_name": None}


def config_to_keras_hub(config, dtype="float32", name=None):
    """The keras-hub `config.json` dict for `config`.

    Warns when keras-hub 0.32 will not reproduce the model (query scaling
    other than head_dim); raises ValueError when keras-hub cannot express it.
    """
    class_name = backbone_class_for(config)
    sliding = LOCAL in config.layer_types
    head_dim_normalize = config.query_pre_attn_scalar == config.head_dim
    if not head_dim_normalize:
        per_head = config.hidden_dim // config.num_query_heads
        if config.query_pre_attn_scalar != per_head:
            warnings.warn(
                f"query_pre_attn_scalar={config.query_pre_attn_scalar:g} is neither head_dim "
                f"({config.head_dim}) nor hidden_dim / num_query_heads ({per_head}): keras-hub's "
                "config cannot express it. The exact value is kept in metadata.json for keras_gemma.",
                stacklevel=3,
            )
        warnings.warn(
            "keras-hub 0.32 ignores `query_head_dim_normalize=False` and scales queries by "
            "head_dim ** -0.5, so keras-hub will not reproduce this model's logits "
            "(keras_gemma and transformers will).",
            stacklevel=3,
        )
    c = {
        "name": name or ("gemma3_backbone" if class_name == "Gemma3Backbone" else "gemma_backbone"),
        "trainable": True,
        "dtype": _dtype_json(dtype),
        "vocabulary_size": config.vocabulary_size,
    }
    if class_name == "Gemma3Backbone":
        c["image_size"] = None
    c.update(
        num_layers=config.num_layers,
        num_query_heads=config.num_query_heads,
        num_key_value_heads=config.num_key_value_heads,
        hidden_dim=config.hidden_dim,
        intermediate_dim=config.intermediate_dim * (2 if class_name == "GemmaBackbone" else 1),
        head_dim=config.head_dim,
        layer_norm_epsilon=config.layer_norm_epsilon,
        dropout=config.dropout,
        query_head_dim_normalize=head_dim_normalize,
        use_post_ffw_norm=config.use_post_norms,
        use_post_attention_norm=config.use_post_norms,
        final_logit_soft_cap=config.final_logit_softcap,
        attention_logit_soft_cap=config.attention_logit_softcap,
        sliding_window_size=config.sliding_window_size or (4096 if class_name == "GemmaBackbone" else 1024),
        use_sliding_window_attention=sliding,
    )
    if class_name == "Gemma3Backbone":
        c.update(
            use_query_key_norm=config.use_qk_norm,
            local_rope_scaling_factor=config.local_rope_scaling,
            global_rope_scaling_factor=config.global_rope_scaling,
            vision_encoder=None,
            use_bidirectional_attention=False,
            is_embedding_model=False,
            pooling_intermediate_dim=None,
            embedding_dim=None,
        )
    module = "gemma3.gemma3_backbone" if class_name == "Gemma3Backbone" else "gemma.gemma_backbone"
    return {
        "module": f"keras_hub.src.models.{module}",
        "class_name": class_name,
        "config": c,
        "registered_name": f"keras_hub>{class_name}",
    }


# -- weights ------------------------------------------------------------------

def _block_prefix(class_name, i):
    base = "gemma3_decoder_block" if class_name == "Gemma3Backbone" else "gemma_decoder_block"
    return f"layers/{base}" + (f"_{i}" if i else "")


def h5_paths(config, class_name):
    """Canonical name -> h5 dataset path, for every weight of `config`."""
    paths = {
        "token_embedding": "layers/reversible_embedding/vars/0",
        "final_norm": "layers/rms_normalization/vars/0",
    }
    norms = ["pre_attention_norm", "pre_ffw_norm"]
    if config.use_post_norms:
        norms += ["post_attention_norm", "post_ffw_norm"]
    for i in range(config.num_layers):
        block, ours = _block_prefix(class_name, i), f"blocks.{i}"
        for norm in norms:
            paths[f"{ours}.{norm}"] = f"{block}/{norm}/vars/0"
        for name, theirs in (("query", "query_dense"), ("key", "key_dense"), ("value", "value_dense"), ("output", "output_dense")):
            paths[f"{ours}.attention.{name}"] = f"{block}/attention/{theirs}/vars/0"
        if config.use_qk_norm:
            paths[f"{ours}.attention.query_norm"] = f"{block}/attention/query_norm/vars/0"
            paths[f"{ours}.attention.key_norm"] = f"{block}/attention/key_norm/vars/0"
        for name, theirs in (("gate", "gating_ffw"), ("up", "gating_ffw_2"), ("down", "ffw_linear")):
            paths[f"{ours}.feed_forward.{name}"] = f"{block}/{theirs}/vars/0"
    return paths


def _open_h5(path):
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise CheckpointError(f"Cannot read {path}: the file is truncated or corrupt ({e}).") from None


def _datasets(path):
    """h5 dataset path -> (file, shape) for every dataset in one weights file."""
    found = {}
    with _open_h5(path) as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                found[name] = (path, tuple(obj.shape))
        try:
            f.visititems(visit)
        except (OSError, RuntimeError, KeyError) as e:
            raise CheckpointError(f"Cannot read {path}: the file is truncated or corrupt ({e}).") from None
    return found


def _weight_files(directory):
    single = os.path.join(directory, WEIGHTS_FILE)
    sharded = os.path.join(directory, SHARDED_WEIGHTS_FILE)
    if os.path.exists(single):
        return [single]
    if os.path.exists(sharded):
        with open(sharded) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{sharded} is corrupt: {e!r}") from None
        names = set()
        for value in weight_map.values():
            names.update(value if isinstance(value, list) else [value])
        files = [os.path.join(directory, name) for name in sorted(names)]
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise CheckpointError(f"{sharded} lists shards that are missing: {', '.join(missing)}.")
        return files
    raise CheckpointError(f"{directory} has no {WEIGHTS_FILE} (nor a sharded {SHARDED_WEIGHTS_FILE}).")


def _read_dataset(path, dataset):
    with _open_h5(path) as f:
        try:
            data = f[dataset]
            is_bf16 = data.attrs.get("dtype") == "bfloat16"
            array = data[()]
        except (OSError, RuntimeError, KeyError) as e:
            raise CheckpointError(f"Cannot read {dataset} from {path}: the file is truncated or corrupt ({e}).") from None
    if is_bf16:
        array = array.view(ml_dtypes.bfloat16)
    return np.asarray(array, dtype=np.float32)


def _is_vision(dataset):
    """A multimodal Gemma 3's image tower (`layers/gemma3_vision_encoder/...`): not ours to load."""
    parts = dataset.split("/")
    return len(parts) > 1 and parts[0] == "layers" and "vision" in parts[1]


def read_weights(directory, config, class_name):
    """Canonical name -> `LazyTensor` for a keras-hub preset's weights.

    A dataset the model has no place for (other than a multimodal model's
    vision tower) is reported under its h5 path, as `unexpected`.
    """
    datasets = {}
    for path in _weight_files(directory):
        datasets.update(_datasets(path))
    paths = h5_paths(config, class_name)
    out = {}
    for name, dataset in paths.items():
        if dataset in datasets:
            file, shape = datasets.pop(dataset)
            out[name] = LazyTensor(shape, lambda f=file, d=dataset: _read_dataset(f, d))
    leftover = sorted(d for d in datasets if not _is_vision(d))
    for dataset in leftover:
        out[f"h5:{dataset}"] = LazyTensor(datasets[dataset][1], None)
    return out


def write_weights(path, backbone, class_name):
    """Writes the backbone's weights as keras-hub's `model.weights.h5`, one tensor at a time."""
    paths = h5_paths(backbone.config, class_name)
    variables = backbone.weight_map()
    with h5py.File(path, "w") as f:
        for name, dataset in paths.items():
            value = keras.ops.convert_to_numpy(variables[name])
            if keras.backend.standardize_dtype(variables[name].dtype) == "bfloat16":
                value = np.asarray(value, dtype=ml_dtypes.bfloat16)
                ds = f.create_dataset(dataset, data=value)
                ds.attrs["dtype"] = "bfloat16"
            else:
                f.create_dataset(dataset, data=value)


# -- tokenizer, preprocessor, task ---------------------------------------------

def tokenizer_json(class_name, has_vision_tokens):
    tokenizer = "Gemma3Tokenizer" if class_name == "Gemma3Backbone" else "GemmaTokenizer"
    module = "gemma3.gemma3_tokenizer" if tokenizer == "Gemma3Tokenizer" else "gemma.gemma_tokenizer"
    config = {
        "name": tokenizer_name(tokenizer),
        "trainable": True,
        "dtype": _dtype_json("int32"),
        "config_file": TOKENIZER_FILE,
        "proto": None,
        "sequence_length": None,
        "add_bos": False,
        "add_eos": False,
    }
    if tokenizer == "Gemma3Tokenizer":
        config["has_vision_tokens"] = has_vision_tokens
    return {
        "module": f"keras_hub.src.models.{module}",
        "class_name": tokenizer,
        "config": config,
        "registered_name": f"keras_hub>{tokenizer}",
    }


def tokenizer_name(class_name):
    return re.sub(r"(?<!^)(?=[A-Z])", "_", class_name).lower()


def preprocessor_json(class_name, tokenizer_config, sequence_length, add_start_token=True, add_end_token=True):
    name = "Gemma3CausalLMPreprocessor" if class_name == "Gemma3Backbone" else "GemmaCausalLMPreprocessor"
    module = (
        "gemma3.gemma3_causal_lm_preprocessor" if class_name == "Gemma3Backbone" else "gemma.gemma_causal_lm_preprocessor"
    )
    config = {
        "name": "gemma3_causal_lm_preprocessor" if class_name == "Gemma3Backbone" else "gemma_causal_lm_preprocessor",
        "trainable": True,
        "dtype": _dtype_json("float32"),
        "tokenizer": tokenizer_config,
        "config_file": PREPROCESSOR_FILE,
        "sequence_length": sequence_length,
        "add_start_token": add_start_token,
        "add_end_token": add_end_token,
    }
    if class_name == "Gemma3Backbone":
        config.update(image_converter=None, num_vision_tokens_per_image=256, max_images_per_prompt=2)
    return {
        "module": f"keras_hub.src.models.{module}",
        "class_name": name,
        "config": config,
        "registered_name": f"keras_hub>{name}",
    }


def task_json(backbone_config, preprocessor_config):
    class_name = backbone_config["class_name"]
    name = "Gemma3CausalLM" if class_name == "Gemma3Backbone" else "GemmaCausalLM"
    module = "gemma3.gemma3_causal_lm" if class_name == "Gemma3Backbone" else "gemma.gemma_causal_lm"
    config = {"backbone": backbone_config, "preprocessor": preprocessor_config}
    config["name"] = "gemma3_causal_lm" if class_name == "Gemma3Backbone" else "gemma_causal_lm"
    return {
        "module": f"keras_hub.src.models.{module}",
        "class_name": name,
        "config": config,
        "registered_name": f"keras_hub>{name}",
    }


def metadata_json(backbone):
    from keras_gemma import __version__

    return {
        "keras_version": keras.version(),
        "keras_gemma_version": __version__,
        "parameter_count": int(backbone.count_params()),
        "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"),
        "tasks": ["CausalLM"],
        # The exact architecture, for what keras-hub's config cannot say
        # (context length, query scaling other than the two keras-hub knows).
        "keras_gemma": {"config": backbone.config.to_dict()},
    }


def exact_config(directory, config):
    """Our saved `GemmaConfig` from metadata.json when it agrees with config.json, else `config`."""
    path = os.path.join(directory, METADATA_FILE)
    if not os.path.exists(path):
        return config
    try:
        with open(path) as f:
            saved = json.load(f).get("keras_gemma", {}).get("config")
        if saved is None:
            return config
        saved = GemmaConfig.from_dict(saved)
    except (ValueError, TypeError, AttributeError):
        return config
    # Fields keras-hub's config states must agree; otherwise config.json was
    # rewritten by someone else and wins.
    loose = dict(max_sequence_length=config.max_sequence_length)
    with open(os.path.join(directory, CONFIG_FILE)) as f:
        if not json.load(f)["config"].get("query_head_dim_normalize", True):
            loose["query_pre_attn_scalar"] = config.query_pre_attn_scalar  # "not head_dim": ours says what
    return saved if saved.replace(**loose) == config else config
