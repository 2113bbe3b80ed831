"""Hugging Face transformers layout: config.json fields and tensor names.

HF stores projections as (out_features, in_features) matrices with heads
flattened; ours keep heads as an axis (see `GemmaBackbone.weight_map`).
"""

import numpy as np

from keras_gemma.checkpoints.weights import LazyTensor
from keras_gemma.config import GLOBAL, LOCAL, GemmaConfig

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3", "gemma4_text", "gemma4", "vaultgemma")
# Gemma 2's block without post-norms (transformers' `vaultgemma`); its pre-ffw
# norm keeps Gemma 2's name, `pre_feedforward_layernorm`.
NO_POST_NORMS = ("gemma", "vaultgemma")
# Multimodal model types whose `text_config` is the text model we load.
MULTIMODAL = {"gemma3": "gemma3_text", "gemma4": "gemma4_text"}
HF_LAYER_TYPES = {"sliding_attention": LOCAL, "full_attention": GLOBAL}


def _rope(hf, kind):
    """(base, linear factor, rotated fraction) for `kind` ("full_attention" or
    "sliding_attention").

    Accepts transformers 5 `rope_parameters` (flat, or per layer type) and the
    older `rope_theta` / `rope_local_base_freq` / `rope_scaling` fields.
    Gemma 4's "proportional" rope rotates `partial_rotary_factor` of each
    head's frequency pairs (`layers.rotary_tables`).
    """
    params = hf.get("rope_parameters")
    if params and kind in params:  # transformers 5, per layer type
        entry = params[kind]
    elif kind == "sliding_attention" and "rope_local_base_freq" in hf:  # older Gemma 3
        return float(hf["rope_local_base_freq"]), 1.0, 1.0
    elif params:  # transformers 5, one setting for every layer
        entry = params
    else:  # older: rope_theta and rope_scaling
        entry = {"rope_theta": hf.get("rope_theta", 10_000.0), **(hf.get("rope_scaling") or {})}
    base = float(entry.get("rope_theta", 10_000.0))
    rope_type = entry.get("rope_type", entry.get("type", "default"))
    if rope_type == "proportional":
        return base, float(entry.get("factor", 1.0)), float(entry.get("partial_rotary_factor", 1.0))
    if entry.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"Unsupported partial_rotary_factor with rope type {rope_type!r} in the Hugging Face config.")
    if rope_type == "linear":
        return base, float(entry["factor"]), 1.0
    if rope_type not in ("default", None):
        raise ValueError(f"Unsupported rope type {rope_type!r} in the Hugging Face config.")
    return base, 1.0, 1.0


def _gemma4_fields(hf, layer_types):
    """GemmaConfig fields for a `gemma4_text` config.

    Per-layer embeddings and key/value sharing (E2B, E4B) take
    transformers' defaults where a field is absent (`hidden_size_per_layer_input`
    256, `vocab_size_per_layer_input` 262144).

    Global layers' head width and key/value heads come from `per_layer_config`
    (what transformers 5.25 writes: index -> overrides) or from
    `global_head_dim` / `num_global_key_value_heads` (the released
    checkpoints' fields; transformers applies the second only with
    `attention_k_eq_v`).
    """
    # `use_bidirectional_attention="vision"` (26B, 31B) is fine: it changes
    # the mask of image tokens only; text stays causal.
    if hf.get("use_bidirectional_attention") == "all":
        raise ValueError("Gemma 4 bidirectional attention for all tokens (an embedding model) is not supported yet.")
    k_eq_v = bool(hf.get("attention_k_eq_v", False))
    overrides = {}  # the global layers' {"head_dim": ..., "num_key_value_heads": ...}
    per_layer = hf.get("per_layer_config")
    if per_layer:
        for key, values in per_layer.items():
            index = int(key)
            if layer_types[index] == LOCAL or set(values) - {"head_dim", "num_key_value_heads"}:
                raise ValueError(f"Unsupported Gemma 4 per_layer_config entry {key!r}: {values!r}.")
            if overrides and values != overrides:
                raise ValueError("Gemma 4 global layers with different shapes are not supported.")
            overrides = dict(values)
    else:
        overrides["head_dim"] = hf.get("global_head_dim", 512)
        if k_eq_v and hf.get("num_global_key_value_heads") is not None:
            overrides["num_key_value_heads"] = hf["num_global_key_value_heads"]
    experts = {}
    if hf.get("enable_moe_block"):
        missing = [f for f in ("num_experts", "top_k_experts", "moe_intermediate_size") if not hf.get(f)]
        if missing:
            raise ValueError(f"A Gemma 4 config with `enable_moe_block` needs {missing}.")
        experts = dict(
            num_experts=hf.get("num_experts"),
            top_k_experts=hf.get("top_k_experts"),
            moe_intermediate_dim=hf.get("moe_intermediate_size"),
        )
    per_layer_input_dim = hf.get("hidden_size_per_layer_input", 256) or 0
    return dict(
        **experts,
        per_layer_input_dim=per_layer_input_dim,
        per_layer_vocabulary_size=hf.get("vocab_size_per_layer_input", 262_144) if per_layer_input_dim else None,
        num_kv_shared_layers=hf.get("num_kv_shared_layers") or 0,
        use_double_wide_mlp=bool(hf.get("use_double_wide_mlp")) and bool(hf.get("num_kv_shared_layers")),
        global_head_dim=overrides.get("head_dim"),
        num_global_key_value_heads=overrides.get("num_key_value_heads"),
        global_keys_as_values=k_eq_v,
        use_value_norm=True,
        use_layer_scalar=True,
        query_pre_attn_scalar=1.0,  # transformers' `scaling = 1.0`: the q/k norms set the scale
    )


def _layer_types(hf, model_type):
    n = hf["num_hidden_layers"]
    if hf.get("layer_types"):
        try:
            return tuple(HF_LAYER_TYPES[t] for t in hf["layer_types"])
        except KeyError as e:
            raise ValueError(f"Unknown layer type {e.args[0]!r} in the Hugging Face config.") from None
    if model_type in ("gemma2", "vaultgemma"):  # both default to Gemma 2's alternation
        return tuple(LOCAL if i % 2 == 0 else GLOBAL for i in range(n))
    if model_type in ("gemma3_text", "gemma4_text"):
        pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        return tuple(GLOBAL if (i + 1) % pattern == 0 else LOCAL for i in range(n))
    return (GLOBAL,) * n


def config_from_hf(hf):
    """A `GemmaConfig` from a Hugging Face `config.json` dict."""
    model_type = hf.get("model_type")
    if model_type in MULTIMODAL:  # take the text part
        model_type = MULTIMODAL[model_type]
        hf = {**hf["text_config"], "model_type": model_type}
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"Not a Gemma checkpoint: model_type is {model_type!r}, expected one of {MODEL_TYPES}."
        )
    layer_types = _layer_types(hf, model_type)
    if model_type == "gemma4_text":  # as transformers does, whatever the config says
        layer_types = layer_types[:-1] + (GLOBAL,)
    global_rope = _rope(hf, "full_attention")
    local_rope = _rope(hf, "sliding_attention") if LOCAL in layer_types else (10_000.0, 1.0, 1.0)
    gemma4 = _gemma4_fields(hf, layer_types) if model_type == "gemma4_text" else {}
    fields = dict(
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
        use_post_norms=model_type not in NO_POST_NORMS,
        use_qk_norm=model_type in ("gemma3_text", "gemma4_text"),
        global_rope_base=global_rope[0],
        global_rope_scaling=global_rope[1],
        global_rope_fraction=global_rope[2],
        local_rope_base=local_rope[0],
        local_rope_scaling=local_rope[1],
        local_rope_fraction=local_rope[2],
        layer_norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        max_sequence_length=hf.get("max_position_embeddings", 8192),
    )
    return GemmaConfig(**{**fields, **gemma4})


def model_type_of(config):
    """The HF `model_type` that describes `config` (a model without post-norms,
    windows or soft-caps is Gemma 1, VaultGemma 1B included: the same math)."""
    if config.gemma4_mechanisms():
        return "gemma4_text"
    if config.use_qk_norm:
        return "gemma3_text"
    if config.use_post_norms:
        return "gemma2"
    if LOCAL in config.layer_types or config.attention_logit_softcap or config.final_logit_softcap:
        return "vaultgemma"
    return "gemma"


def config_to_hf(config):
    """A Hugging Face `config.json` dict (transformers 5 field names) for `config`."""
    model_type = model_type_of(config)
    architectures = {
        "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
        "gemma4_text": "Gemma4ForCausalLM", "vaultgemma": "VaultGemmaForCausalLM",
    }
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
    if model_type == "gemma4_text":
        return _gemma4_to_hf(config, hf)
    if model_type in ("gemma2", "vaultgemma"):
        if config.local_rope_base != config.global_rope_base or config.local_rope_scaling != config.global_rope_scaling:
            raise ValueError("Hugging Face's Gemma 2 has one rope base for all layers.")
        hf["rope_parameters"] = rope(config.global_rope_base, config.global_rope_scaling)
    else:
        hf["rope_parameters"] = {
            "full_attention": rope(config.global_rope_base, config.global_rope_scaling),
            "sliding_attention": rope(config.local_rope_base, config.local_rope_scaling),
        }
    return hf


def _gemma4_to_hf(config, hf):
    """`config_to_hf` for a Gemma 4 text model."""
    required = dict(
        use_post_norms=True, use_qk_norm=True, use_value_norm=True, use_layer_scalar=True,
        query_pre_attn_scalar=1.0, attention_logit_softcap=None,
    )
    for name, value in required.items():
        if getattr(config, name) != value:
            raise ValueError(f"Hugging Face's Gemma 4 has {name}={value!r}; this model has {getattr(config, name)!r}.")
    if config.layer_types[-1] != GLOBAL:
        raise ValueError("Hugging Face's Gemma 4 forces the last layer to be global (full attention).")
    del hf["query_pre_attn_scalar"], hf["attn_logit_softcapping"]

    def rope(base, scaling, fraction):
        return {"rope_type": "proportional", "factor": scaling, "partial_rotary_factor": fraction, "rope_theta": base}

    hf.update(
        rope_parameters={
            "full_attention": rope(config.global_rope_base, config.global_rope_scaling, config.global_rope_fraction),
            "sliding_attention": rope(config.local_rope_base, config.local_rope_scaling, config.local_rope_fraction),
        },
        attention_k_eq_v=config.global_keys_as_values,
        per_layer_config={
            str(i): {"head_dim": config.global_head_dim, "num_key_value_heads": config.num_global_key_value_heads}
            for i, kind in enumerate(config.layer_types) if kind == GLOBAL
        },
        hidden_size_per_layer_input=config.per_layer_input_dim,
        vocab_size_per_layer_input=config.per_layer_vocabulary_size,
        num_kv_shared_layers=config.num_kv_shared_layers,
        use_double_wide_mlp=config.use_double_wide_mlp,
        enable_moe_block=config.num_experts is not None,
    )
    if config.num_experts is not None:
        hf.update(
            num_experts=config.num_experts,
            top_k_experts=config.top_k_experts,
            moe_intermediate_size=config.moe_intermediate_dim,
        )
    if LOCAL not in config.layer_types:
        hf["sliding_window"] = 512  # unused: HF's field is not optional
    return hf


def _norm_names(config, model_type):
    """(HF norm name, our norm name) per block; Gemma 1's second norm is the pre-ffw norm."""
    if model_type == "vaultgemma":
        return (("input_layernorm", "pre_attention_norm"), ("pre_feedforward_layernorm", "pre_ffw_norm"))
    if config.use_post_norms:
        return (
            ("input_layernorm", "pre_attention_norm"),
            ("post_attention_layernorm", "post_attention_norm"),
            ("pre_feedforward_layernorm", "pre_ffw_norm"),
            ("post_feedforward_layernorm", "post_ffw_norm"),
        )
    return (("input_layernorm", "pre_attention_norm"), ("post_attention_layernorm", "pre_ffw_norm"))


def tensor_names(config, prefix="model.", model_type=None):
    """Pairs (HF tensor name, canonical name, kind) for every weight of `config`.

    `kind` picks the layout transform in `to_canonical` / `from_canonical`.
    `model_type` defaults to `model_type_of(config)`; "vaultgemma" names the
    pre-ffw norm of a model without post-norms as Gemma 2 does.
    """
    model_type = model_type or model_type_of(config)
    # Gemma 4 stores norm scales as the multiplier itself (ones at init);
    # ours are zero-centred (`RMSNorm`): "norm" adds or removes the 1.
    norm = "norm" if model_type == "gemma4_text" else "copy"
    rows = [(f"{prefix}embed_tokens.weight", "token_embedding", "copy")]
    if config.per_layer_input_dim:
        rows += [
            (f"{prefix}embed_tokens_per_layer.weight", "per_layer_token_embedding", "copy"),
            (f"{prefix}per_layer_model_projection.weight", "per_layer_model_projection", "transpose"),
            (f"{prefix}per_layer_projection_norm.weight", "per_layer_projection_norm", norm),
        ]
    for i in range(config.num_layers):
        hf, ours = f"{prefix}layers.{i}.", f"blocks.{i}."
        shares_kv = config.layer_shares_kv(i)  # no k_proj, v_proj or k_norm
        for hf_norm, our_norm in _norm_names(config, model_type):
            rows.append((f"{hf}{hf_norm}.weight", f"{ours}{our_norm}", norm))
        rows.append((f"{hf}self_attn.q_proj.weight", f"{ours}attention.query", "qkv"))
        if not shares_kv:
            rows.append((f"{hf}self_attn.k_proj.weight", f"{ours}attention.key", "qkv"))
        if not shares_kv and not config.layer_keys_as_values(i):
            rows.append((f"{hf}self_attn.v_proj.weight", f"{ours}attention.value", "qkv"))
        rows += [
            (f"{hf}self_attn.o_proj.weight", f"{ours}attention.output", "out"),
            (f"{hf}mlp.gate_proj.weight", f"{ours}feed_forward.gate", "transpose"),
            (f"{hf}mlp.up_proj.weight", f"{ours}feed_forward.up", "transpose"),
            (f"{hf}mlp.down_proj.weight", f"{ours}feed_forward.down", "transpose"),
        ]
        if config.use_qk_norm:
            rows.append((f"{hf}self_attn.q_norm.weight", f"{ours}attention.query_norm", norm))
        if config.use_qk_norm and not shares_kv:
            rows.append((f"{hf}self_attn.k_norm.weight", f"{ours}attention.key_norm", norm))
        if config.num_experts is not None:
            rows += [
                (f"{hf}pre_feedforward_layernorm_2.weight", f"{ours}pre_moe_norm", norm),
                (f"{hf}post_feedforward_layernorm_2.weight", f"{ours}post_moe_norm", norm),
                (f"{hf}post_feedforward_layernorm_1.weight", f"{ours}post_dense_ffw_norm", norm),
                (f"{hf}router.proj.weight", f"{ours}moe.router", "transpose"),
                (f"{hf}router.scale", f"{ours}moe.router_scale", "copy"),
                (f"{hf}router.per_expert_scale", f"{ours}moe.expert_scale", "copy"),
                (f"{hf}experts.gate_up_proj", f"{ours}moe.gate_up", "experts_gate_up"),
                (f"{hf}experts.down_proj", f"{ours}moe.down", "experts_down"),
            ]
        if config.use_layer_scalar:
            rows.append((f"{hf}layer_scalar", f"{ours}layer_scalar", "copy"))
        if config.per_layer_input_dim:
            rows += [
                (f"{hf}per_layer_input_gate.weight", f"{ours}per_layer_input_gate", "transpose"),
                (f"{hf}per_layer_projection.weight", f"{ours}per_layer_projection", "transpose"),
                (f"{hf}post_per_layer_input_norm.weight", f"{ours}post_per_layer_input_norm", norm),
            ]
    rows.append((f"{prefix}norm.weight", "final_norm", norm))
    return rows


def _layer_head_dim(config, name):
    """The head width of the layer a canonical name `blocks.{i}....` belongs to."""
    return config.layer_head_dim(int(name.split(".")[1]))


def to_canonical(array, kind, config, head_dim=None):
    """An HF tensor in our layout (`head_dim`: the layer's, default the config's)."""
    h = head_dim or config.head_dim
    if kind == "norm":  # a multiplier -> zero-centred
        return array - np.asarray(1.0, array.dtype)
    if kind == "qkv":  # (heads*h, d) -> (heads, d, h)
        return np.transpose(np.reshape(array, (-1, h, array.shape[-1])), (0, 2, 1))
    if kind == "out":  # (d, n*h) -> (n, h, d)
        return np.transpose(np.reshape(array, (array.shape[0], -1, h)), (1, 2, 0))
    if kind == "transpose":
        return np.transpose(array)
    if kind == "experts_gate_up":  # (e, 2g, d): gates then ups -> (e, 2, d, g)
        e, _, d = array.shape
        return np.transpose(np.reshape(array, (e, 2, -1, d)), (0, 1, 3, 2))
    if kind == "experts_down":  # (e, d, g) -> (e, g, d)
        return np.transpose(array, (0, 2, 1))
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
    if kind == "norm":
        return array + np.asarray(1.0, array.dtype)
    if kind == "experts_gate_up":  # (e, 2, d, g) -> (e, 2g, d)
        e, _, d, g = array.shape
        return np.reshape(np.transpose(array, (0, 1, 3, 2)), (e, 2 * g, d))
    if kind == "experts_down":  # (e, g, d) -> (e, d, g)
        return np.transpose(array, (0, 2, 1))
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
    model_type = model_type_of(config)
    if not config.use_post_norms and f"{prefix}layers.0.pre_feedforward_layernorm.weight" in tensors:
        model_type = "vaultgemma"  # VaultGemma 1B's config is Gemma 1's; its norm names are not
    out = {}
    for hf_name, name, kind in tensor_names(config, prefix, model_type):
        if hf_name not in tensors:
            continue
        value = tensors[hf_name]
        h = _layer_head_dim(config, name) if kind in ("qkv", "out") else None
        if kind == "copy":  # the same layout: keep the tensor itself (and its row reader)
            out[name] = value if isinstance(value, LazyTensor) else np.asarray(value)
        elif isinstance(value, LazyTensor):
            shape = to_canonical(np.empty(value.shape, np.int8), kind, config, h).shape
            out[name] = LazyTensor(shape, lambda v=value, k=kind, h=h: to_canonical(v.load(), k, config, h))
        else:
            out[name] = to_canonical(np.asarray(value), kind, config, h)
    return out
