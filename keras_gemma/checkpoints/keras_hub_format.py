"""The keras-hub (and keras-nlp) preset layout: what Kaggle serves.

A preset directory holds `config.json` (the serialized `GemmaBackbone`,
`Gemma3Backbone` or `Gemma4Backbone`), `model.weights.h5` (or `model.weights.json` and shards),
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

keras-hub's `Gemma4Backbone` presets (every released one has a vision
encoder, the E models an audio one too) load as their text decoder
(`gemma4_config_from_keras_hub`, `gemma4_h5_paths`): its blocks are
`gemma4_text_decoder_block[_i]`, its norm scales multipliers (ours
zero-centred), its layer scalars shape (), a mixture of experts' gate and
up banks two tensors (ours one, stacked). A Gemma 4 model saves as a
text-only `Gemma4Backbone` by the same table read backwards
(`gemma4_config_to_keras_hub`), unless its config holds what that class
cannot express (`gemma4_unexpressible` names it): then as keras_gemma's
native preset (`quantized_format.py`).
"""

import datetime
import json
import os
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

GEMMA4_CLASS = "Gemma4Backbone"  # its text decoder
GEMMA_CLASSES = ("GemmaBackbone", "Gemma3Backbone", GEMMA4_CLASS)  # what we read and write
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
            f"(expected class_name {', '.join(GEMMA_CLASSES[:-1])} or {GEMMA_CLASSES[-1]})."
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
    if class_name == GEMMA4_CLASS:
        return gemma4_config_from_keras_hub(config_json, path)
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


# -- Gemma 4 (keras-hub's Gemma4Backbone) ----------------------------------------
#
# keras-hub 0.32's `Gemma4Backbone` is always Gemma 4's block: four norms,
# q/k norms and a scale-free value norm, attention scaling 1 (its
# `query_head_dim_normalize` is kept for show and unused), a stored
# `layer_scalar` per block. Its config says which layers are global
# (`layer_types`, else every `sliding_window_pattern`-th), their head width
# (`global_head_dim`) and key/value heads (`num_global_key_value_heads`, which
# also turns on keys-as-values there), the rope bases (None: 1e6 global, 1e4
# local) and the global layers' rotated share; the E models' per-layer
# embeddings (`hidden_size_per_layer_input`) and key/value sharing; 26B A4B's
# mixture of experts (`enable_moe_block`).
# The vision and audio encoders' weights are not ours to load (the text
# decoder is); what the text decoder cannot be here is refused. Written, it
# is text-only: no encoders.

GEMMA4_LOCAL_BASE, GEMMA4_GLOBAL_BASE = 10_000.0, 1_000_000.0
GEMMA4_LAYER_TYPES = {"full_attention": GLOBAL, "sliding_attention": LOCAL}
GEMMA4_DEFAULT_LENGTH = 131_072
# (config key, value that is fine, what a different value would be).
GEMMA4_REFUSED = (
    ("is_embedding_model", False, "an embedding model (pooling heads, not a causal language model)"),
    ("use_bidirectional_attention", False, "bidirectional attention over all tokens (an embedding model)"),
)


def _gemma4_layer_types(c, n, path):
    types = c.get("layer_types")
    if types is None:
        pattern = c.get("sliding_window_pattern", 6)
        if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern <= 0:
            raise CheckpointError(f"{path}: sliding_window_pattern must be a positive integer, got {pattern!r}.")
        return tuple(GLOBAL if i % pattern == pattern - 1 else LOCAL for i in range(n))
    if not isinstance(types, (list, tuple)) or len(types) != n:
        raise CheckpointError(f"{path}: layer_types must list one attention type per layer ({n}), got {types!r}.")
    unknown = sorted({t for t in types if t not in GEMMA4_LAYER_TYPES}, key=str)
    if unknown:
        raise CheckpointError(
            f"{path}: unknown layer type(s) {unknown} in layer_types (expected {' or '.join(GEMMA4_LAYER_TYPES)})."
        )
    return tuple(GEMMA4_LAYER_TYPES[t] for t in types)


def _gemma4_rope_fraction(factor, head_dim, path):
    """Our rotated fraction for keras-hub's `global_rope_partial_rotary_factor`.

    keras-hub rotates `max(2, int(factor * head_dim))` rounded down to even
    dimensions, i.e. that many // 2 frequency pairs; we rotate
    `int(fraction * head_dim // 2)` pairs.
    """
    factor = 1.0 if factor is None else float(factor)
    if not 0.0 < factor <= 1.0:
        raise CheckpointError(f"{path}: global_rope_partial_rotary_factor must be in (0, 1], got {factor!r}.")
    raw = int(factor * head_dim)
    pairs = max(2, raw - raw % 2) // 2
    for fraction in (factor, 2 * pairs / head_dim):
        if int(fraction * head_dim // 2) == pairs:
            return fraction
    raise CheckpointError(f"{path}: cannot express a rotary factor of {factor!r} over {head_dim} dimensions.")


def gemma4_config_from_keras_hub(config_json, path=CONFIG_FILE):
    """A `GemmaConfig` for the text decoder of a keras-hub `Gemma4Backbone` config."""
    c = config_json.get("config")
    if not isinstance(c, dict):
        raise CheckpointError(f"{path}: keras-hub's Gemma4Backbone config has no `config` dict.")
    required = ("vocabulary_size", "num_layers", "num_query_heads", "num_key_value_heads", "hidden_dim",
                "intermediate_dim", "head_dim")
    missing = [key for key in required if c.get(key) is None]
    if missing:
        raise CheckpointError(f"{path}: keras-hub's Gemma4Backbone config lacks {', '.join(missing)}.")
    for key, fine, mechanism in GEMMA4_REFUSED:
        if bool(c.get(key, fine)) != fine:
            raise CheckpointError(f"{path}: this Gemma4Backbone has {mechanism} (`{key}`={c[key]!r}), not supported here.")
    n = c["num_layers"]
    layer_types = _gemma4_layer_types(c, n, path)
    sliding = LOCAL in layer_types
    if sliding and not c.get("use_sliding_window_attention", True):
        raise CheckpointError(
            f"{path}: use_sliding_window_attention=False (sliding-attention layers without a window) "
            "is not supported here."
        )
    head_dim = c["head_dim"]
    global_head_dim = c.get("global_head_dim") or head_dim
    global_kv_heads = c.get("num_global_key_value_heads")
    per_layer_input_dim = c.get("hidden_size_per_layer_input") or 0
    num_kv_shared = c.get("num_kv_shared_layers") or 0
    experts = {}
    if c.get("enable_moe_block"):  # 26B A4B: experts beside the dense feed-forward in every block
        missing = [key for key in ("num_experts", "expert_intermediate_dim") if not c.get(key)]
        if missing:
            raise CheckpointError(f"{path}: a Gemma4Backbone with enable_moe_block needs {', '.join(missing)}.")
        experts = dict(
            num_experts=c["num_experts"],
            top_k_experts=c.get("num_experts_per_token", 8),  # keras-hub's default
            moe_intermediate_dim=c["expert_intermediate_dim"],
        )
    fields = dict(
        **experts,
        vocabulary_size=c["vocabulary_size"],
        num_layers=n,
        hidden_dim=c["hidden_dim"],
        num_query_heads=c["num_query_heads"],
        num_key_value_heads=c["num_key_value_heads"],
        head_dim=head_dim,
        intermediate_dim=c["intermediate_dim"],
        layer_types=layer_types,
        sliding_window_size=c.get("sliding_window_size", 512) if sliding else None,
        query_pre_attn_scalar=1.0,  # keras-hub's Gemma 4 attention: scaling 1, the q/k norms set the scale
        attention_logit_softcap=c.get("attention_logit_soft_cap"),
        final_logit_softcap=c.get("final_logit_soft_cap"),
        use_post_norms=True,
        use_qk_norm=True,
        use_value_norm=True,
        use_layer_scalar=True,
        global_rope_base=float(c.get("global_rope_wavelength") or GEMMA4_GLOBAL_BASE),
        local_rope_base=float(c.get("local_rope_wavelength") or GEMMA4_LOCAL_BASE),
        global_rope_scaling=float(c.get("global_rope_scaling_factor", 1.0)),
        local_rope_scaling=float(c.get("local_rope_scaling_factor", 1.0)),
        global_rope_fraction=_gemma4_rope_fraction(c.get("global_rope_partial_rotary_factor"), global_head_dim, path),
        global_head_dim=global_head_dim,
        num_global_key_value_heads=global_kv_heads,
        # keras-hub: global layers with their own key/value head count compute values with the key kernel.
        global_keys_as_values=global_kv_heads is not None and GLOBAL in layer_types,
        per_layer_input_dim=per_layer_input_dim,
        per_layer_vocabulary_size=(c.get("vocab_size_per_layer_input") or None) if per_layer_input_dim else None,
        num_kv_shared_layers=num_kv_shared,
        use_double_wide_mlp=bool(c.get("use_double_wide_mlp")) and num_kv_shared > 0,
        layer_norm_epsilon=c.get("layer_norm_epsilon", 1e-6),
        dropout=float(c.get("dropout", 0.0)),
    )
    try:
        config = GemmaConfig(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: keras-hub's Gemma4Backbone config is not a model keras_gemma can build: {e}") from None
    return config.replace(max_sequence_length=_max_sequence_length(config, GEMMA4_DEFAULT_LENGTH))


def _rotated_pairs(fraction, head_dim):
    """Frequency pairs our rope rotates (`layers.rotary_tables`)."""
    return int(fraction * head_dim // 2)


def gemma4_unexpressible(config):
    """What keras-hub's `Gemma4Backbone` cannot express of `config`, one
    reason a line (empty: it can).

    Its block is always Gemma 4's (four norms, q/k norms, the value norm,
    attention scaling 1, a layer scalar); its sliding layers rotate every
    frequency pair, its global ones at least one; its global layers have
    their own key/value head count only with keys as values. Mechanisms on
    layers the model does not have are not counted.
    """
    reasons = [
        f"`{field}=False` (its blocks always have {what})"
        for field, what in (
            ("use_post_norms", "post-attention and post-feed-forward norms"),
            ("use_qk_norm", "query and key norms"),
            ("use_value_norm", "the value norm"),
            ("use_layer_scalar", "a stored layer scalar"),
        )
        if not getattr(config, field)
    ]
    if config.query_pre_attn_scalar != 1.0:
        reasons.append(f"`query_pre_attn_scalar={config.query_pre_attn_scalar:g}` (its attention scaling is always 1)")
    if LOCAL in config.layer_types and config.local_rope_fraction != 1.0:
        reasons.append(
            f"`local_rope_fraction={config.local_rope_fraction:g}` (its sliding layers rotate every frequency pair)"
        )
    if GLOBAL in config.layer_types:
        if _rotated_pairs(config.global_rope_fraction, config.global_head_dim) == 0:
            reasons.append(
                f"`global_rope_fraction={config.global_rope_fraction:g}` rotates no frequency pair of "
                f"{config.global_head_dim} dimensions (keras-hub rotates at least one)"
            )
        if not config.global_keys_as_values and config.num_global_key_value_heads != config.num_key_value_heads:
            reasons.append(
                f"`num_global_key_value_heads={config.num_global_key_value_heads}` with "
                "`global_keys_as_values=False` (keras-hub gives global layers their own key/value "
                "heads only with keys as values)"
            )
    return reasons


def _gemma4_sliding_window_pattern(layer_types):
    """keras-hub's `sliding_window_pattern` that gives `layer_types`, else its default 6
    (`layer_types` is written too, and wins)."""
    n = len(layer_types)
    for period in range(1, n + 1):
        if layer_types == tuple(GLOBAL if i % period == period - 1 else LOCAL for i in range(n)):
            return period
    return 6


def gemma4_config_to_keras_hub(config, dtype="float32", name=None):
    """The keras-hub `Gemma4Backbone` `config.json` dict (text only) for `config`.

    `gemma4_config_from_keras_hub` reads it back as `config` (bar the context
    length, which metadata.json keeps). Called by `config_to_keras_hub` once
    `backbone_class_for` has found nothing keras-hub cannot express
    (`gemma4_unexpressible`).
    """
    per_layer, experts = config.per_layer_input_dim, config.num_experts
    fraction = config.global_rope_fraction
    if _rotated_pairs(fraction, config.global_head_dim) == 0:  # no global layer: any value keras-hub accepts
        fraction = 1.0
    c = {
        "name": name or _object_name(GEMMA4_CLASS, "Backbone"),
        "trainable": True,
        "dtype": _dtype_json(dtype),
        "vocabulary_size": config.vocabulary_size,
        "image_size": None,
        "num_layers": config.num_layers,
        "num_query_heads": config.num_query_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "hidden_dim": config.hidden_dim,
        "intermediate_dim": config.intermediate_dim,
        "head_dim": config.head_dim,
        "query_head_dim_normalize": True,  # unused by keras-hub's Gemma 4 (scaling 1)
        "attention_logit_soft_cap": config.attention_logit_softcap,
        "final_logit_soft_cap": config.final_logit_softcap,
        "use_sliding_window_attention": True,
        "sliding_window_size": config.sliding_window_size or 512,
        "sliding_window_pattern": _gemma4_sliding_window_pattern(config.layer_types),
        "layer_types": [{GLOBAL: "full_attention", LOCAL: "sliding_attention"}[t] for t in config.layer_types],
        "global_head_dim": config.global_head_dim,
        "local_rope_scaling_factor": config.local_rope_scaling,
        "global_rope_scaling_factor": config.global_rope_scaling,
        "vision_encoder": None,
        "audio_encoder": None,
        "num_audio_tokens_per_clip": None,
        "use_bidirectional_attention": False,
        "use_vision_bidirectional_attention": False,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "dropout": config.dropout,
        "is_embedding_model": False,
        "pooling_intermediate_dim": None,
        "embedding_dim": None,
        "num_kv_shared_layers": config.num_kv_shared_layers,
        # keras-hub: a global key/value head count turns on keys as values there.
        "num_global_key_value_heads": config.num_global_key_value_heads if config.global_keys_as_values else None,
        "hidden_size_per_layer_input": per_layer,
        "vocab_size_per_layer_input": config.per_layer_vocabulary_size if per_layer else None,
        "global_rope_wavelength": config.global_rope_base,
        "local_rope_wavelength": config.local_rope_base,
        "global_rope_partial_rotary_factor": fraction,  # keras-hub rotates as many pairs as we do (at least one)
        "use_double_wide_mlp": config.use_double_wide_mlp,
        "enable_moe_block": experts is not None,
        "num_experts": experts,
        "expert_intermediate_dim": config.moe_intermediate_dim,
        "num_experts_per_token": config.top_k_experts if experts is not None else 8,  # 8: keras-hub's default
    }
    return _class_json(GEMMA4_CLASS, "Backbone", c)


def backbone_class_for(config):
    """`GemmaBackbone`, `Gemma3Backbone` or (a config with Gemma 4
    mechanisms) `Gemma4Backbone`: the keras-hub class that can express `config`.

    Raises ValueError naming what keras-hub cannot express.
    """
    if config.gemma4_mechanisms():
        reasons = gemma4_unexpressible(config)
        if reasons:
            raise ValueError(f"keras-hub's Gemma4Backbone cannot express {'; '.join(reasons)}.")
        return GEMMA4_CLASS
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


# keras-hub's class prefix and module stem per backbone class, and module
# suffix per kind of object (`Gemma3` + `CausalLM` in
# `keras_hub.src.models.gemma3.gemma3_causal_lm`).
FAMILIES = {"GemmaBackbone": "Gemma", "Gemma3Backbone": "Gemma3", GEMMA4_CLASS: "Gemma4"}
KINDS = {
    "Backbone": "backbone", "Tokenizer": "tokenizer", "CausalLMPreprocessor": "causal_lm_preprocessor",
    "CausalLM": "causal_lm",
}


def _object_name(backbone_class, kind):
    """keras-hub's default layer name, e.g. `gemma3_causal_lm_preprocessor`."""
    return f"{FAMILIES[backbone_class].lower()}_{KINDS[kind]}"


def _class_json(backbone_class, kind, config):
    """A serialized keras-hub object: the `kind` (a key of `KINDS`) of `backbone_class`'s family."""
    prefix = FAMILIES[backbone_class]
    stem = prefix.lower()
    return {
        "module": f"keras_hub.src.models.{stem}.{stem}_{KINDS[kind]}",
        "class_name": prefix + kind,
        "config": config,
        "registered_name": f"keras_hub>{prefix}{kind}",
    }


def config_to_keras_hub(config, dtype="float32", name=None):
    """The keras-hub `config.json` dict for `config`.

    Warns when keras-hub 0.32 will not reproduce the model (query scaling
    other than head_dim); raises ValueError when keras-hub cannot express it.
    """
    class_name = backbone_class_for(config)
    if class_name == GEMMA4_CLASS:
        return gemma4_config_to_keras_hub(config, dtype, name)
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
        "name": name or _object_name(class_name, "Backbone"),
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
    return _class_json(class_name, "Backbone", c)


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


def gemma4_h5_paths(config):
    """Canonical name -> (h5 dataset path, kind) for a keras-hub `Gemma4Backbone`'s
    text decoder (`read_weights` applies the kinds, `write_weights` undoes them).

    `kind`: "copy"; "norm" (keras-hub's Gemma 4 norm scales are the multiplier
    itself, ones at init; ours are zero-centred); "scalar" (a block's
    `layer_scalar`, shape () there, (1,) here). The top-level layers are
    named by class, in the order the functional graph holds them: the
    per-layer projection norm comes before the final norm.
    """
    per_layer = config.per_layer_input_dim > 0
    paths = {
        "token_embedding": ("layers/reversible_embedding/vars/0", "copy"),
        "final_norm": (f"layers/rms_normalization{'_1' if per_layer else ''}/vars/0", "norm"),
    }
    if per_layer:
        paths.update(
            per_layer_token_embedding=("layers/embedding/vars/0", "copy"),
            per_layer_model_projection=("layers/dense/vars/0", "copy"),
            per_layer_projection_norm=("layers/rms_normalization/vars/0", "norm"),
        )
    for i in range(config.num_layers):
        block, ours = "layers/gemma4_text_decoder_block" + (f"_{i}" if i else ""), f"blocks.{i}"
        for norm in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm"):
            paths[f"{ours}.{norm}"] = (f"{block}/{norm}/vars/0", "norm")
        projections = [("query", "query_dense"), ("output", "output_dense")]
        norms = [("query_norm", "query_norm")]
        if not config.layer_shares_kv(i):  # shared layers read their source's keys and values
            projections.append(("key", "key_dense"))
            norms.append(("key_norm", "key_norm"))
            if not config.layer_keys_as_values(i):
                projections.append(("value", "value_dense"))
        for name, theirs in projections:
            paths[f"{ours}.attention.{name}"] = (f"{block}/attention/{theirs}/vars/0", "copy")
        for name, theirs in norms:
            paths[f"{ours}.attention.{name}"] = (f"{block}/attention/{theirs}/vars/0", "norm")
        for name, theirs in (("gate", "gating_ffw"), ("up", "gating_ffw_2"), ("down", "ffw_linear")):
            paths[f"{ours}.feed_forward.{name}"] = (f"{block}/{theirs}/vars/0", "copy")
        if config.num_experts is not None:
            bank, router = f"{block}/moe_expert_bank/vars", f"{block}/moe_router"
            for name, theirs in (
                ("pre_moe_norm", "pre_ffw_norm_moe"), ("post_moe_norm", "post_ffw_norm_moe_path"),
                ("post_dense_ffw_norm", "post_ffw_norm_dense"),
            ):
                paths[f"{ours}.{name}"] = (f"{block}/{theirs}/vars/0", "norm")
            paths.update({
                f"{ours}.moe.router": (f"{router}/proj/vars/0", "copy"),  # (d, e)
                f"{ours}.moe.router_scale": (f"{router}/vars/0", "copy"),  # per_dim_scale, a multiplier as ours
                # gate_proj and up_proj, each (e, d, g), as our (e, 2, d, g).
                f"{ours}.moe.gate_up": ((f"{bank}/0", f"{bank}/1"), "stack"),
                f"{ours}.moe.down": (f"{bank}/2", "copy"),  # (e, g, d)
                f"{ours}.moe.expert_scale": (f"{bank}/3", "copy"),  # per_expert_scale
            })
        paths[f"{ours}.layer_scalar"] = (f"{block}/vars/0", "scalar")
        if per_layer:
            paths[f"{ours}.per_layer_input_gate"] = (f"{block}/per_layer_input_gate/vars/0", "copy")
            paths[f"{ours}.per_layer_projection"] = (f"{block}/per_layer_up_proj/vars/0", "copy")
            paths[f"{ours}.post_per_layer_input_norm"] = (f"{block}/post_per_layer_input_norm/vars/0", "norm")
    return paths


def _is_encoder(dataset):
    """A multimodal model's image or audio tower (`layers/gemma3_vision_encoder/...`,
    `layers/gemma4_audio_encoder/...`): not ours to load."""
    parts = dataset.split("/")
    return len(parts) > 1 and parts[0] == "layers" and ("vision" in parts[1] or "audio" in parts[1])


def _transformed(file, dataset, shape, kind):
    if kind == "copy":
        return LazyTensor(shape, lambda: _read_dataset(file, dataset))
    if kind == "norm":
        return LazyTensor(shape, lambda: _read_dataset(file, dataset) - np.float32(1.0))
    if kind == "scalar":
        return LazyTensor((1,), lambda: np.reshape(_read_dataset(file, dataset), (1,)))
    raise AssertionError(kind)


def read_weights(directory, config, class_name):
    """Canonical name -> `LazyTensor` for a keras-hub preset's weights.

    A dataset the model has no place for (other than a multimodal model's
    vision or audio tower) is reported under its h5 path, as `unexpected`;
    a shape that differs (a scalar where a (1,) is expected, say) is
    reported by `assign_weights`.
    """
    datasets = {}
    for path in _weight_files(directory):
        datasets.update(_datasets(path))
    if class_name == GEMMA4_CLASS:
        paths = gemma4_h5_paths(config)
    else:
        paths = {name: (dataset, "copy") for name, dataset in h5_paths(config, class_name).items()}
    out = {}
    for name, (dataset, kind) in paths.items():
        if kind == "stack":  # several datasets, stacked on axis 1 (what is missing is reported by our name)
            found = [datasets.pop(d) for d in dataset if d in datasets]
            if len(found) == len(dataset):
                shapes = {shape for _, shape in found}
                if len(shapes) == 1:
                    shape = found[0][1]
                    out[name] = LazyTensor(
                        (shape[0], len(dataset), *shape[1:]),
                        lambda found=found, dataset=dataset: np.stack(
                            [_read_dataset(f, d) for (f, _), d in zip(found, dataset)], axis=1
                        ),
                    )
                else:
                    out[name] = LazyTensor(found[0][1], None)  # the wrong shape, reported as such
            continue
        if dataset in datasets:
            file, shape = datasets.pop(dataset)
            if kind == "scalar" and shape not in ((), (1,)):
                out[name] = LazyTensor(shape, None)  # the wrong shape, reported as such
            else:
                out[name] = _transformed(file, dataset, shape, kind)
    leftover = sorted(d for d in datasets if not _is_encoder(d))
    for dataset in leftover:
        out[f"h5:{dataset}"] = LazyTensor(datasets[dataset][1], None)
    return out


def _stored(dataset, kind, value):
    """(h5 dataset path, array) pairs for one of our weights: `read_weights`' transforms undone."""
    if kind == "copy":
        return [(dataset, value)]
    if kind == "norm":  # in float32: `1 + scale` in bfloat16 would round the scale away
        return [(dataset, np.asarray(value, np.float32) + np.float32(1.0))]
    if kind == "scalar":
        return [(dataset, np.reshape(value, ()))]
    if kind == "stack":
        return [(d, value[:, j]) for j, d in enumerate(dataset)]
    raise AssertionError(kind)


def write_weights(path, backbone, class_name):
    """Writes the backbone's weights as keras-hub's `model.weights.h5`, one tensor at a time."""
    if class_name == GEMMA4_CLASS:
        layout = gemma4_h5_paths(backbone.config)
    else:
        layout = {name: (dataset, "copy") for name, dataset in h5_paths(backbone.config, class_name).items()}
    variables = backbone.weight_map()
    with h5py.File(path, "w") as f:
        for name, (dataset, kind) in layout.items():
            value = keras.ops.convert_to_numpy(variables[name])
            bfloat16 = keras.backend.standardize_dtype(variables[name].dtype) == "bfloat16"
            if bfloat16:
                value = np.asarray(value, dtype=ml_dtypes.bfloat16)
            for dataset_path, array in _stored(dataset, kind, value):
                ds = f.create_dataset(dataset_path, data=array)
                if array.dtype == ml_dtypes.bfloat16:
                    ds.attrs["dtype"] = "bfloat16"


# -- tokenizer, preprocessor, task ---------------------------------------------

# The special tokens each keras-hub tokenizer flag requires in the vocabulary.
TOKEN_FLAGS = {
    "Gemma3Backbone": {"has_vision_tokens": VISION_TOKENS},
    GEMMA4_CLASS: {
        "has_vision_tokens": ("<|image>", "<|image|>", "<image|>"),
        "has_audio_tokens": ("<|audio>", "<|audio|>", "<audio|>"),
        "has_video_tokens": ("<|video|>",),
    },
}


def tokenizer_json(class_name, vocabulary):
    """tokenizer.json for backbone class `class_name`; `vocabulary`, the
    tokenizer's pieces, decides which special-token flags are on."""
    vocabulary = set(vocabulary)
    config = {
        "name": _object_name(class_name, "Tokenizer"),
        "trainable": True,
        "dtype": _dtype_json("int32"),
        "config_file": TOKENIZER_FILE,
        "proto": None,
        "sequence_length": None,
        "add_bos": False,
        "add_eos": False,
    }
    for flag, tokens in TOKEN_FLAGS.get(class_name, {}).items():
        config[flag] = all(token in vocabulary for token in tokens)
    return _class_json(class_name, "Tokenizer", config)


def preprocessor_json(class_name, tokenizer_config, sequence_length, add_start_token=True, add_end_token=True):
    config = {
        "name": _object_name(class_name, "CausalLMPreprocessor"),
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
    if class_name == GEMMA4_CLASS:  # text only (the other counts keep keras-hub's defaults)
        config.update(image_converter=None, audio_converter=None, video_converter=None)
    return _class_json(class_name, "CausalLMPreprocessor", config)


def task_json(backbone_config, preprocessor_config):
    class_name = backbone_config["class_name"]
    config = {
        "backbone": backbone_config, "preprocessor": preprocessor_config, "name": _object_name(class_name, "CausalLM"),
    }
    return _class_json(class_name, "CausalLM", config)


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
