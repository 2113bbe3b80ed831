"""Hugging Face transformers layout: config.json fields and tensor names.

HF stores projections as (out_features, in_features) matrices with heads
flattened; ours keep heads as an axis (see `GemmaBackbone.weight_map`).
"""

import numpy as np

from keras_gemma.checkpoints.weights import LazyTensor
from keras_gemma.config import GLOBAL, LOCAL, GemmaConfig

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")
HF_LAYER_TYPES = {"sliding_attention": LOCAL, "full_attention": GLOBAL}


def _rope(hf, kind):
    """(base, linear factor) for `kind` ("full_attention" or "sliding_attention").

    Accepts transformers 5 `rope_parameters` (flat, or per layer type) and the
    older `rope_theta` / `rope_local_base_freq` / `rope_scaling` fields.
    """
    params = hf.get("rope_parameters")
    if params and kind in params:  # transformers 5, per layer type
        entry = params[kind]
    elif kind == "sliding_attention" and "rope_local_base_freq" in hf:  # older Gemma 3
        return float(hf["rope_local_base_freq"]), 1.0
    elif params:  # transformers 5, one setting for every layer
        entry = params
    else:  # older: rope_theta and rope_scaling
        entry = {"rope_theta": hf.get("rope_theta", 10_000.0), **(hf.get("rope_scaling") or {})}
    base = float(entry.get("rope_theta", 10_000.0))
    rope_type = entry.get("rope_type", entry.get("type", "default"))
    if rope_type == "linear":
        return base, float(entry["factor"])
    if rope_type not in ("default", None):
        raise ValueError(f"Unsupported rope type {rope_type!r} in the Hugging Face config.")
    return base, 1.0


def _layer_types(hf, model_type):
    n = hf["num_hidden_layers"]
    if hf.get("layer_types"):
        try:
            return tuple(HF_LAYER_TYPES[t] for t in hf["layer_types"])
        except KeyError as e:
            raise ValueError(f"Unknown layer type {e.args[0]!r} in the Hugging Face config.") from None
    if model_type == "gemma2":
        return tuple(LOCAL if i % 2 == 0 else GLOBAL for i in range(n))
    if model_type == "gemma3_text":
        pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        return tuple(GLOBAL if (i + 1) % pattern == 0 else LOCAL for i in range(n))
    return (GLOBAL,) * n


def config_from_hf(hf):
    """A `GemmaConfig` from a Hugging Face `config.json` dict."""
    model_type = hf.get("model_type")
    if model_type == "gemma3":  # multimodal: take the text part
        hf = {**hf["text_config"], "model_type": "gemma3_text"}
        model_type = "gemma3_text"
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"Not a Gemma checkpoint: model_type is {model_type!r}, expected one of {MODEL_TYPES}."
        )
    layer_types = _layer_types(hf, model_type)
    global_rope = _rope(hf, "full_attention")
    local_rope = _rope(hf, "sliding_attention") if LOCAL in layer_types else (10_000.0, 1.0)
    return GemmaConfig(
        vocabulary_size=hf["vocab_size"],
        num_layers=hf["num_hidden_layers"],
        hidden_dim=hf["hidden_size"],
        num_query_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        intermediate_dim=hf["intermediate_size"],
        layer_types=layer_types,
        sliding_window_size=hf.get("sliding_window") if LOCAL in layer_types else None,
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
        attention_logit_softcap=hf.get("attn_logit_softcapping"),
        final_logit_softcap=hf.get("final_logit_softcapping"),
        use_post_norms=model_type != "gemma",
        use_qk_norm=model_type == "gemma3_text",
        global_rope_base=global_rope[0],
        global_rope_scaling=global_rope[1],
        local_rope_base=local_rope[0],
        local_rope_scaling=local_rope[1],
        layer_norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        max_sequence_length=hf.get("max_position_embeddings", 8192),
    )


def model_type_of(config):
    """The HF `model_type` that describes `config`."""
    if config.use_qk_norm:
        return "gemma3_text"
    if config.use_post_norms:
        return "gemma2"
    return "gemma"


def config_to_hf(config):
    """A Hugging Face `config.json` dict (transformers 5 field names) for `config`."""
    model_type = model_type_of(config)
    architectures = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
    hf = {
        "architectures": [architectures[model_type]],
        "model_type": model_type,
        "vocab_size": config.vocabulary_size,
        "num_hidden_layers": config.num_layers,
        "hidden_size": config.hidden_dim,
        "num_attention_heads": config.num_query_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_act": "gelu_pytorch_tanh",
        "rms_norm_eps": config.layer_norm_epsilon,
        "max_position_embeddings": config.max_sequence_length,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "attention_bias": False,
        "dtype": "float32",
    }

    def rope(base, scaling):
        if scaling == 1.0:
            return {"rope_type": "default", "rope_theta": base}
        return {"rope_type": "linear", "factor": scaling, "rope_theta": base}

    if model_type == "gemma":
        if LOCAL in config.layer_types or config.attention_logit_softcap or config.final_logit_softcap:
            raise ValueError("A model without post-norms but with windows or soft-caps has no Hugging Face equivalent.")
        hf["rope_parameters"] = rope(config.global_rope_base, config.global_rope_scaling)
        if config.query_pre_attn_scalar != config.head_dim:
            raise ValueError("Hugging Face's Gemma (1) has no query_pre_attn_scalar; it must equal head_dim.")
        return hf
    hf.update(
        query_pre_attn_scalar=config.query_pre_attn_scalar,
        sliding_window=config.sliding_window_size,
        layer_types=[{LOCAL: "sliding_attention", GLOBAL: "full_attention"}[t] for t in config.layer_types],
        attn_logit_softcapping=config.attention_logit_softcap,
        final_logit_softcapping=config.final_logit_softcap,
    )
    if model_type == "gemma2":
        if config.local_rope_base != config.global_rope_base or config.local_rope_scaling != config.global_rope_scaling:
            raise ValueError("Hugging Face's Gemma 2 has one rope base for all layers.")
        hf["rope_parameters"] = rope(config.global_rope_base, config.global_rope_scaling)
    else:
        hf["rope_parameters"] = {
            "full_attention": rope(config.global_rope_base, config.global_rope_scaling),
            "sliding_attention": rope(config.local_rope_base, config.local_rope_scaling),
        }
    return hf


def _norm_names(config):
    """(HF norm name, our norm name) per block; Gemma 1's second norm is the pre-ffw norm."""
    if config.use_post_norms:
        return (
            ("input_layernorm", "pre_attention_norm"),
            ("post_attention_layernorm", "post_attention_norm"),
            ("pre_feedforward_layernorm", "pre_ffw_norm"),
            ("post_feedforward_layernorm", "post_ffw_norm"),
        )
    return (("input_layernorm", "pre_attention_norm"), ("post_attention_layernorm", "pre_ffw_norm"))


def tensor_names(config, prefix="model."):
    """Pairs (HF tensor name, canonical name, kind) for every weight of `config`.

    `kind` picks the layout transform in `to_canonical` / `from_canonical`.
    """
    rows = [(f"{prefix}embed_tokens.weight", "token_embedding", "copy")]
    for i in range(config.num_layers):
        hf, ours = f"{prefix}layers.{i}.", f"blocks.{i}."
        for hf_norm, norm in _norm_names(config):
            rows.append((f"{hf}{hf_norm}.weight", f"{ours}{norm}", "copy"))
        rows += [
            (f"{hf}self_attn.q_proj.weight", f"{ours}attention.query", "qkv"),
            (f"{hf}self_attn.k_proj.weight", f"{ours}attention.key", "qkv"),
            (f"{hf}self_attn.v_proj.weight", f"{ours}attention.value", "qkv"),
            (f"{hf}self_attn.o_proj.weight", f"{ours}attention.output", "out"),
            (f"{hf}mlp.gate_proj.weight", f"{ours}feed_forward.gate", "transpose"),
            (f"{hf}mlp.up_proj.weight", f"{ours}feed_forward.up", "transpose"),
            (f"{hf}mlp.down_proj.weight", f"{ours}feed_forward.down", "transpose"),
        ]
        if config.use_qk_norm:
            rows += [
                (f"{hf}self_attn.q_norm.weight", f"{ours}attention.query_norm", "copy"),
                (f"{hf}self_attn.k_norm.weight", f"{ours}attention.key_norm", "copy"),
            ]
    rows.append((f"{prefix}norm.weight", "final_norm", "copy"))
    return rows


def to_canonical(array, kind, config):
    """An HF tensor in our layout."""
    h = config.head_dim
    if kind == "qkv":  # (heads*h, d) -> (heads, d, h)
        return np.transpose(np.reshape(array, (-1, h, array.shape[-1])), (0, 2, 1))
    if kind == "out":  # (d, n*h) -> (n, h, d)
        return np.transpose(np.reshape(array, (array.shape[0], -1, h)), (1, 2, 0))
    if kind == "transpose":
        return np.transpose(array)
    return array


def from_canonical(array, kind, config):
    """Our tensor in the HF layout."""
    if kind == "qkv":  # (heads, d, h) -> (heads*h, d)
        heads, d, h = array.shape
        return np.reshape(np.transpose(array, (0, 2, 1)), (heads * h, d))
    if kind == "out":  # (n, h, d) -> (d, n*h)
        n, h, d = array.shape
        return np.reshape(np.transpose(array, (2, 0, 1)), (d, n * h))
    if kind == "transpose":
        return np.transpose(array)
    return array


TEXT_PREFIXES = ("model.", "model.language_model.", "language_model.model.", "")


def canonical_weights(config, tensors):
    """Our canonical weights from HF tensors.

    `tensors` maps HF names to arrays or `LazyTensor`s (read when assigned).
    The text-model prefix is detected (`model.` for causal LMs, the language
    model's prefix in a multimodal Gemma 3). Tensors outside the text model
    (`lm_head.weight` is tied; vision tower) are ignored; a missing one is
    reported by `assign_weights` under our name.
    """
    prefix = next(
        (p for p in TEXT_PREFIXES if f"{p}embed_tokens.weight" in tensors), "model."
    )
    out = {}
    for hf_name, name, kind in tensor_names(config, prefix):
        if hf_name not in tensors:
            continue
        value = tensors[hf_name]
        if kind == "copy":  # the same layout: keep the tensor itself (and its row reader)
            out[name] = value if isinstance(value, LazyTensor) else np.asarray(value)
        elif isinstance(value, LazyTensor):
            shape = to_canonical(np.empty(value.shape, np.int8), kind, config).shape
            out[name] = LazyTensor(shape, lambda v=value, k=kind: to_canonical(v.load(), k, config))
        else:
            out[name] = to_canonical(np.asarray(value), kind, config)
    return out
