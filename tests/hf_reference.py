"""Tiny Hugging Face transformers models as an independent reference.

Each builder makes a small random HF model whose config makes one
generation's mechanisms bite, then larger-than-default random weights so
soft-caps saturate and norms' scales matter.
"""

import numpy as np
import torch
import transformers

import keras_gemma
from keras_gemma.checkpoints.huggingface import canonical_weights, config_from_hf
from keras_gemma.checkpoints.weights import assign_weights

VOCAB = 96


def gemma1_config(**overrides):
    args = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
    )
    return transformers.GemmaConfig(**{**args, **overrides})


def gemma2_config(**overrides):
    args = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        query_pre_attn_scalar=24,  # 27B-style: not head_dim
        sliding_window=4, attn_logit_softcapping=4.0, final_logit_softcapping=6.0,
        max_position_embeddings=256,
    )
    return transformers.Gemma2Config(**{**args, **overrides})


def gemma3_config(**overrides):
    args = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=7,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        query_pre_attn_scalar=24, sliding_window=4, max_position_embeddings=256,
        layer_types=["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    )
    return transformers.Gemma3TextConfig(**{**args, **overrides})


MODEL_CLASSES = {
    "gemma": transformers.GemmaForCausalLM,
    "gemma2": transformers.Gemma2ForCausalLM,
    "gemma3_text": transformers.Gemma3ForCausalLM,
    "gemma4_text": transformers.Gemma4ForCausalLM,
    "vaultgemma": transformers.VaultGemmaForCausalLM,
}


def build_hf(hf_config, seed=0, scale=0.25):
    """A float32 HF model with N(0, scale) weights (norm scales included)."""
    torch.manual_seed(seed)
    hf_config._attn_implementation = "eager"
    model = MODEL_CLASSES[hf_config.model_type](hf_config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return model


def state_dict_numpy(hf_model):
    return {k: v.detach().cpu().numpy() for k, v in hf_model.state_dict().items()}


def ours_from_hf(hf_model, dtype="float32"):
    """Our `GemmaCausalLM` holding the HF model's weights."""
    config = config_from_hf(hf_model.config.to_dict())
    backbone = keras_gemma.GemmaBackbone(config, dtype=dtype)
    assign_weights(backbone, canonical_weights(config, state_dict_numpy(hf_model)), "HF model")
    return keras_gemma.GemmaCausalLM(backbone)


def padded_batch(seq_len=13, seed=0):
    """Token ids and mask: a full row, a right-padded row and a left-padded row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, VOCAB, size=(3, seq_len)).astype("int32")
    mask = np.ones((3, seq_len), bool)
    mask[1, seq_len - 4:] = False
    mask[2, :5] = False
    ids[~mask] = 0
    return ids, mask


def positions_of(mask):
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def hf_logits(hf_model, ids, mask):
    with torch.no_grad():
        out = hf_model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask.astype("int64")),
            position_ids=torch.tensor(positions_of(mask), dtype=torch.long),
        )
    return out.logits.float().numpy()
