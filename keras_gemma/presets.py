"""The preset registry: every known Gemma model as data.

Each entry names an architecture (a `GemmaConfig`), the Kaggle handle its
keras-hub weights live under, and what kind of checkpoint it is.
"""

import dataclasses

from keras_gemma.config import GLOBAL, LOCAL, GemmaConfig, layer_pattern

GEMMA_VOCAB = 256_000
GEMMA3_VOCAB = 262_144

GEMMA2_PATTERN = (LOCAL, GLOBAL)
GEMMA3_PATTERN = (LOCAL,) * 5 + (GLOBAL,)


def dims(num_layers, hidden_dim, num_query_heads, num_key_value_heads, intermediate_dim, head_dim=256):
    """The sizes of one model, as `GemmaConfig` keyword arguments."""
    return dict(
        num_layers=num_layers,
        hidden_dim=hidden_dim,
        num_query_heads=num_query_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_dim=intermediate_dim,
        head_dim=head_dim,
    )


def gemma1(sizes):
    return GemmaConfig(vocabulary_size=GEMMA_VOCAB, max_sequence_length=8192, **sizes)


def gemma2(sizes, query_pre_attn_scalar=None):
    return GemmaConfig(
        vocabulary_size=GEMMA_VOCAB,
        layer_types=layer_pattern(sizes["num_layers"], GEMMA2_PATTERN),
        sliding_window_size=4096,
        query_pre_attn_scalar=query_pre_attn_scalar,
        attention_logit_softcap=50.0,
        final_logit_softcap=30.0,
        use_post_norms=True,
        max_sequence_length=8192,
        **sizes,
    )


def gemma3(sizes, sliding_window_size, query_pre_attn_scalar=None, global_rope_scaling=1.0, max_sequence_length=131_072):
    return GemmaConfig(
        vocabulary_size=GEMMA3_VOCAB,
        layer_types=layer_pattern(sizes["num_layers"], GEMMA3_PATTERN),
        sliding_window_size=sliding_window_size,
        query_pre_attn_scalar=query_pre_attn_scalar,
        use_post_norms=True,
        use_qk_norm=True,
        global_rope_base=1_000_000.0,
        local_rope_base=10_000.0,
        global_rope_scaling=global_rope_scaling,
        max_sequence_length=max_sequence_length,
        **sizes,
    )


def gemma4(sizes, sliding_window_size, global_head_dim, num_global_key_value_heads, max_sequence_length, **experts):
    """Gemma 4 text decoders, as `checkpoints.huggingface.config_from_hf`
    reads the released config.json: keys as values on global layers,
    proportional rope there (a quarter of the frequency pairs), the value
    norm, attention scaling 1.0 (the q/k norms set it), a layer scalar; with
    `num_experts`, `top_k_experts`, `moe_intermediate_dim`, a mixture of
    experts beside each block's dense feed-forward."""
    return GemmaConfig(
        vocabulary_size=GEMMA3_VOCAB,
        layer_types=layer_pattern(sizes["num_layers"], GEMMA3_PATTERN),
        sliding_window_size=sliding_window_size,
        query_pre_attn_scalar=1.0,
        final_logit_softcap=30.0,
        use_post_norms=True,
        use_qk_norm=True,
        global_rope_base=1_000_000.0,
        local_rope_base=10_000.0,
        global_rope_fraction=0.25,
        global_head_dim=global_head_dim,
        num_global_key_value_heads=num_global_key_value_heads,
        global_keys_as_values=True,
        use_value_norm=True,
        use_layer_scalar=True,
        max_sequence_length=max_sequence_length,
        **experts,
        **sizes,
    )


ARCHITECTURES = {
    "gemma_2b": gemma1(dims(18, 2048, 8, 1, 16384)),
    "gemma_7b": gemma1(dims(28, 3072, 16, 16, 24576)),
    "gemma2_2b": gemma2(dims(26, 2304, 8, 4, 9216)),
    "gemma2_9b": gemma2(dims(42, 3584, 16, 8, 14336)),
    "gemma2_27b": gemma2(dims(46, 4608, 32, 16, 36864, head_dim=128), query_pre_attn_scalar=144),
    "gemma3_270m": gemma3(dims(18, 640, 4, 1, 2048), 512, max_sequence_length=32_768),
    "gemma3_1b": gemma3(dims(26, 1152, 4, 1, 6912), 512, max_sequence_length=32_768),
    "gemma3_4b": gemma3(dims(34, 2560, 8, 4, 10240), 1024, global_rope_scaling=8.0),
    "gemma3_12b": gemma3(dims(48, 3840, 16, 8, 15360), 1024, global_rope_scaling=8.0),
    "gemma3_27b": gemma3(
        dims(62, 5376, 32, 16, 21504, head_dim=128), 1024, query_pre_attn_scalar=168, global_rope_scaling=8.0
    ),
    # google/gemma-4-26B-A4B(-it) config.json's text_config.
    "gemma4_26b_a4b": gemma4(
        dims(30, 2816, 16, 8, 2112), 1024, global_head_dim=512, num_global_key_value_heads=2,
        max_sequence_length=262_144, num_experts=128, top_k_experts=8, moe_intermediate_dim=704,
    ),
}

# Published parameter counts (text-only), ../shared/REFERENCE.md section 2.
PUBLISHED_PARAMETERS = {
    "gemma_2b": 2_506_172_416,
    "gemma_7b": 8_537_680_896,
    "gemma2_2b": 2_614_341_888,
    "gemma2_9b": 9_241_705_984,
    "gemma2_27b": 27_227_128_320,
    "gemma3_270m": 268_098_176,
    "gemma3_1b": 999_885_952,
    "gemma3_4b": 3_880_099_328,
    "gemma3_12b": 11_765_788_416,
    "gemma3_27b": 27_009_002_240,
}


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named checkpoint: its architecture and where its weights live."""

    name: str
    architecture: str
    kaggle_handle: str
    instruct: bool
    description: str

    @property
    def config(self):
        return ARCHITECTURES[self.architecture]


def _entries():
    # (kaggle model, preset name, version, architecture, instruct, description)
    rows = [
        ("keras/gemma", "gemma_2b_en", 3, "gemma_2b", False, "Gemma 2B base"),
        ("keras/gemma", "gemma_instruct_2b_en", 3, "gemma_2b", True, "Gemma 2B instruct"),
        ("keras/gemma", "gemma_1.1_instruct_2b_en", 4, "gemma_2b", True, "Gemma 1.1 2B instruct"),
        ("keras/gemma", "gemma_7b_en", 4, "gemma_7b", False, "Gemma 7B base"),
        ("keras/gemma", "gemma_instruct_7b_en", 4, "gemma_7b", True, "Gemma 7B instruct"),
        ("keras/gemma", "gemma_1.1_instruct_7b_en", 5, "gemma_7b", True, "Gemma 1.1 7B instruct"),
        ("keras/codegemma", "code_gemma_2b_en", 2, "gemma_2b", False, "CodeGemma 2B"),
        ("keras/codegemma", "code_gemma_1.1_2b_en", 2, "gemma_2b", False, "CodeGemma 1.1 2B"),
        ("keras/codegemma", "code_gemma_7b_en", 3, "gemma_7b", False, "CodeGemma 7B"),
        ("keras/codegemma", "code_gemma_instruct_7b_en", 3, "gemma_7b", True, "CodeGemma 7B instruct"),
        ("keras/codegemma", "code_gemma_1.1_instruct_7b_en", 3, "gemma_7b", True, "CodeGemma 1.1 7B instruct"),
        ("keras/gemma2", "gemma2_2b_en", 2, "gemma2_2b", False, "Gemma 2 2B base"),
        ("keras/gemma2", "gemma2_instruct_2b_en", 2, "gemma2_2b", True, "Gemma 2 2B instruct"),
        ("keras/gemma2", "gemma2_9b_en", 4, "gemma2_9b", False, "Gemma 2 9B base"),
        ("keras/gemma2", "gemma2_instruct_9b_en", 4, "gemma2_9b", True, "Gemma 2 9B instruct"),
        ("keras/gemma2", "gemma2_27b_en", 3, "gemma2_27b", False, "Gemma 2 27B base"),
        ("keras/gemma2", "gemma2_instruct_27b_en", 3, "gemma2_27b", True, "Gemma 2 27B instruct"),
        ("keras/gemma3", "gemma3_270m", 3, "gemma3_270m", False, "Gemma 3 270M base"),
        ("keras/gemma3", "gemma3_instruct_270m", 4, "gemma3_270m", True, "Gemma 3 270M instruct"),
        ("keras/gemma3", "gemma3_1b", 3, "gemma3_1b", False, "Gemma 3 1B base"),
        ("keras/gemma3", "gemma3_instruct_1b", 3, "gemma3_1b", True, "Gemma 3 1B instruct"),
        ("keras/gemma3", "gemma3_4b_text", 2, "gemma3_4b", False, "Gemma 3 4B base, text only"),
        ("keras/gemma3", "gemma3_instruct_4b_text", 3, "gemma3_4b", True, "Gemma 3 4B instruct, text only"),
        ("keras/gemma3", "gemma3_12b_text", 3, "gemma3_12b", False, "Gemma 3 12B base, text only"),
        ("keras/gemma3", "gemma3_instruct_12b_text", 3, "gemma3_12b", True, "Gemma 3 12B instruct, text only"),
        ("keras/gemma3", "gemma3_27b_text", 4, "gemma3_27b", False, "Gemma 3 27B base, text only"),
        ("keras/gemma3", "gemma3_instruct_27b_text", 3, "gemma3_27b", True, "Gemma 3 27B instruct, text only"),
        ("google/shieldgemma", "shieldgemma_2b_en", 2, "gemma2_2b", True, "ShieldGemma 2B"),
        ("google/shieldgemma", "shieldgemma_9b_en", 2, "gemma2_9b", True, "ShieldGemma 9B"),
        ("google/shieldgemma", "shieldgemma_27b_en", 2, "gemma2_27b", True, "ShieldGemma 27B"),
    ]
    for model, name, version, arch, instruct, description in rows:
        handle = f"kaggle://{model}/keras/{name}/{version}"
        yield Preset(name, arch, handle, instruct, description)


PRESETS = {preset.name: preset for preset in _entries()}


def list_presets():
    """Names of every built-in preset."""
    return sorted(PRESETS)


def get_preset(name):
    """The `Preset` called `name`; an unknown name lists the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"Unknown preset {name!r}. Valid presets are: "
            + ", ".join(list_presets())
            + ". `from_preset` also takes a local directory or .gguf file path, "
            "kaggle://<owner>/<model>/keras/<variation>[/<version>] and hf://<org>/<name>."
        ) from None
