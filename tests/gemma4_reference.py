"""Shared pieces of the Gemma 4 tests (`test_gemma4*.py`): tiny
transformers configs, models with Gemma 4's weight conventions, and the
comparisons every variant runs."""

import numpy as np
import torch
import transformers

import keras_gemma
from conftest import to_numpy
from hf_reference import VOCAB, build_hf, hf_logits, padded_batch

TOLERANCE = 1e-4
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"]
ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


# The released E2B and E4B text configs (config.json's `text_config`, the fields that matter here).
E2B = dict(
    hidden_size=1536, num_hidden_layers=35, intermediate_size=6144, num_attention_heads=8, num_key_value_heads=1,
    head_dim=256, global_head_dim=512, attention_k_eq_v=False, vocab_size=262_144,
    vocab_size_per_layer_input=262_144, hidden_size_per_layer_input=256, num_kv_shared_layers=20,
    use_double_wide_mlp=True, sliding_window=512, final_logit_softcapping=30.0, max_position_embeddings=131_072,
    layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 7, rope_parameters=ROPE,
)
E4B = dict(
    E2B, hidden_size=2560, num_hidden_layers=42, intermediate_size=10240, num_key_value_heads=2,
    num_kv_shared_layers=18, use_double_wide_mlp=False, layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 7,
)

# google/gemma-4-26B-A4B's config.json text_config (the fields that shape the text model).
RELEASED_26B_A4B = {
    "model_type": "gemma4_text", "num_hidden_layers": 30, "hidden_size": 2816, "num_attention_heads": 16,
    "num_key_value_heads": 8, "num_global_key_value_heads": 2, "head_dim": 256, "global_head_dim": 512,
    "intermediate_size": 2112, "moe_intermediate_size": 704, "num_experts": 128, "top_k_experts": 8,
    "enable_moe_block": True, "sliding_window": 1024, "max_position_embeddings": 262144,
    "hidden_activation": "gelu_pytorch_tanh", "final_logit_softcapping": 30.0, "attention_k_eq_v": True,
    "vocab_size": 262144, "tie_word_embeddings": True, "rms_norm_eps": 1e-6,
    "num_kv_shared_layers": 0, "hidden_size_per_layer_input": None, "use_double_wide_mlp": False,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 5,
    "rope_parameters": {
        "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
        "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
    },
}


def gemma4_config(**overrides):
    """The dense test model: global layers 32 wide (16 local) with one
    key/value head (2 local) that is also the value, a quarter of their rope
    pairs rotating, window 4, a final soft-cap."""
    args = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=5,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
        sliding_window=4, final_logit_softcapping=6.0, max_position_embeddings=512,
        layer_types=LAYER_TYPES, hidden_size_per_layer_input=0, rope_parameters=ROPE,
    )
    return transformers.Gemma4TextConfig(**{**args, **overrides})


def build_gemma4(hf_config=None, seed=0, scale=0.25, router_scale=1.0):
    """`build_hf`, then Gemma 4's multiplier norms and router scale around 1,
    per-expert scales and layer scalars (a buffer, which `build_hf` leaves
    at 1) in [0.5, 1.5], and the router kernel `router_scale` times larger."""
    model = build_hf(hf_config or gemma4_config(), seed=seed, scale=scale)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm_1.weight", "layernorm_2.weight", "router.scale")):
                param.add_(1.0)
            elif name.endswith("per_expert_scale"):
                param.copy_(0.5 + torch.rand(param.shape, generator=generator))
            elif name.endswith("router.proj.weight"):
                param.mul_(router_scale)
        for layer in model.model.layers:
            layer.layer_scalar.copy_(0.5 + torch.rand(1, generator=generator))
    return model


def logits_of(model, ids, mask):
    return to_numpy(model({"token_ids": ids, "padding_mask": mask}))


def assert_same_logits(model, hf, seq_len=13):
    """Our logits equal transformers' on a padded batch (13 columns: longer
    than the window of 4)."""
    ids, mask = padded_batch(seq_len)
    actual, expected = logits_of(model, ids, mask), hf_logits(hf, ids, mask)
    np.testing.assert_allclose(actual[mask], expected[mask], atol=TOLERANCE, rtol=TOLERANCE)
    return ids, mask, actual


def moved(a, b, mask):
    return np.max(np.abs(a[mask] - b[mask]))


def with_weights_of(model, **changes):
    """A model with `changes` to the config and `model`'s weights where the
    names and shapes agree; a weight the source lacks (or has in another
    shape) keeps its initial value."""
    other = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(model.config.replace(**changes)))
    source = model.backbone.weight_map()
    for name, variable in other.backbone.weight_map().items():
        if name in source and tuple(source[name].shape) == tuple(variable.shape):
            variable.assign(source[name])
    return other


def greedy_equals_full_forward(lm, prompts, new_tokens):
    """Cached greedy generation of a ragged batch picks, at every step, the
    argmax of an uncached forward pass over the whole row."""
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        ids[i, : len(p)], mask[i, : len(p)] = p, True
    output = lm.generate({"token_ids": ids, "padding_mask": mask}, max_new_tokens=new_tokens, stop_token_ids=None)
    rows = [row[m].tolist() for row, m in zip(output["token_ids"], output["padding_mask"])]
    for prompt, row in zip(prompts, rows):
        assert len(row) == len(prompt) + new_tokens and row[: len(prompt)] == prompt
        picks = to_numpy(lm({"token_ids": np.array([row], np.int32)}))[0].argmax(-1).tolist()
        assert row[len(prompt):] == picks[len(prompt) - 1 : -1]
    assert all(len(set(row[len(p):])) >= 3 for p, row in zip(prompts, rows)), rows


def assert_checkpoints_round_trip(ours, hf_model, tmp_path):
    """transformers' `save_pretrained` loads here with its logits, and
    `export_to_transformers` loads there with ours and back here with the
    same config; returns the exported model for variant checks."""
    hf_model.save_pretrained(str(tmp_path / "saved"))
    backbone = keras_gemma.GemmaBackbone.from_preset(str(tmp_path / "saved"))
    assert_same_logits(keras_gemma.GemmaCausalLM(backbone), hf_model)
    directory = str(tmp_path / "export")
    ours.backbone.export_to_transformers(directory)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    assert type(hf).__name__ == "Gemma4ForCausalLM"
    assert_same_logits(ours, hf)
    again = keras_gemma.GemmaBackbone.from_preset(directory)
    assert again.config == ours.config
    assert_same_logits(keras_gemma.GemmaCausalLM(again), hf)
    return hf


def assert_our_adapter_loads_into_peft(ours, tmp_path):
    """LoRA on every projection there is, written for PEFT, loads onto the
    model `export_to_transformers` writes with the same logits (and bites);
    returns (adapter directory, the padded batch, PEFT's logits)."""
    import peft

    lm = with_weights_of(ours)
    base_dir, adapter_dir = str(tmp_path / "base"), str(tmp_path / "adapter")
    lm.backbone.export_to_transformers(base_dir)
    lm.backbone.enable_lora(2, alpha=3, target_layers="all")
    rng = np.random.default_rng(0)
    for variable in lm.trainable_weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32") * 0.2)
    lm.backbone.save_lora_weights(adapter_dir, format="peft")
    ids, mask = padded_batch(13)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    without = hf_logits(base, ids, mask)
    expected = hf_logits(peft.PeftModel.from_pretrained(base, adapter_dir).eval(), ids, mask)
    assert np.abs(expected - without)[mask].max() > 0.1  # the adapter bites
    np.testing.assert_allclose(logits_of(lm, ids, mask)[mask], expected[mask], atol=TOLERANCE, rtol=TOLERANCE)
    return adapter_dir, (ids, mask), expected


def assert_lora_merges_and_int8_keeps_the_top_token(ours):
    """LoRA on every projection there is, counted per layer's shapes
    (`lora_parameter_count`); merged, the logits are the base's; int8
    weights keep the top token at 90% of positions. Returns the quantized
    model, the padded batch and the float logits."""
    from keras_gemma.lora import lora_parameter_count

    lm = with_weights_of(ours)
    ids, mask = padded_batch(13)
    logits = logits_of(lm, ids, mask)
    lm.backbone.enable_lora(2, target_layers="all")
    trainable = lm.trainable_weights
    assert trainable and all("lora" in variable.path for variable in trainable)
    assert sum(int(np.prod(w.shape)) for w in trainable) == lora_parameter_count(lm.config, 2, "all")
    lm.backbone.merge_lora_weights()
    np.testing.assert_allclose(logits_of(lm, ids, mask)[mask], logits[mask], atol=1e-5, rtol=1e-5)
    lm.backbone.quantize("int8")
    assert (logits_of(lm, ids, mask).argmax(-1) == logits.argmax(-1))[mask].mean() > 0.9
    return lm, (ids, mask), logits
