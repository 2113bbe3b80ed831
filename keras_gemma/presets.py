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
GEMMA4_PATTERN = (LOCAL,) * 5 + (GLOBAL,)


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


def gemma4(
    sizes, sliding_window_size, global_head_dim=512, num_global_key_value_heads=None,
    global_keys_as_values=False, pattern=GEMMA4_PATTERN, max_sequence_length=262_144, **mechanisms,
):
    """A dense Gemma 4 text decoder (google-deepmind/gemma `gm/nn/gemma4/_gemma4.py`
    `_gemma4_config`; transformers' `Gemma4TextConfig`): global layers with
    their own head width, a quarter of their rope pairs rotating, scale-free
    value norm, attention scaling 1.0 (the q/k norms set the scale), stored
    layer scalars and a final soft-cap of 30. The last layer is global
    (transformers forces it). `mechanisms`: the E models' per-layer
    embeddings and key/value sharing."""
    layer_types = layer_pattern(sizes["num_layers"], pattern)[:-1] + (GLOBAL,)
    return GemmaConfig(
        vocabulary_size=GEMMA3_VOCAB,
        layer_types=layer_types,
        sliding_window_size=sliding_window_size,
        query_pre_attn_scalar=1.0,
        final_logit_softcap=30.0,
        use_post_norms=True,
        use_qk_norm=True,
        use_value_norm=True,
        use_layer_scalar=True,
        global_rope_base=1_000_000.0,
        local_rope_base=10_000.0,
        global_rope_fraction=0.25,
        global_head_dim=global_head_dim,
        num_global_key_value_heads=num_global_key_value_heads,
        global_keys_as_values=global_keys_as_values,
        max_sequence_length=max_sequence_length,
        **sizes,
        **mechanisms,
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
    # VaultGemma 1B (google/vaultgemma-1b; transformers' `vaultgemma`): Gemma 2's
    # block without its post-norms, every layer global, no soft-caps, 1024
    # positions. That is Gemma 1's math; only HF's name for the pre-ffw norm
    # differs (`pre_feedforward_layernorm`, checkpoints/huggingface.py).
    "vaultgemma_1b": gemma1(dims(26, 1152, 4, 4, 6912)).replace(max_sequence_length=1024),
    # Gemma 4 31B (google/gemma-4-31B config.json `text_config`): 60 layers,
    # five sliding (window 1024, not the E2B/E4B's 512) then one global; global
    # layers 512 wide with 4 key/value heads that are also the values.
    "gemma4_31b": gemma4(
        dims(60, 5376, 32, 16, 21504), 1024, num_global_key_value_heads=4, global_keys_as_values=True
    ),
    # Gemma 4 E2B and E4B (google/gemma-4-E2B, -E4B config.json `text_config`):
    # a 256-wide per-layer embedding per layer, the trailing 20 (18) layers
    # reading the keys and values of the last earlier layer of their type,
    # E2B's shared layers with a double-wide feed-forward; window 512.
    "gemma4_e2b": gemma4(
        dims(35, 1536, 8, 1, 6144), 512, pattern=(LOCAL,) * 4 + (GLOBAL,), max_sequence_length=131_072,
        per_layer_input_dim=256, num_kv_shared_layers=20, use_double_wide_mlp=True,
    ),
    "gemma4_e4b": gemma4(
        dims(42, 2560, 8, 2, 10240), 512, max_sequence_length=131_072,
        per_layer_input_dim=256, num_kv_shared_layers=18,
    ),
    # Gemma 4 26B-A4B (google/gemma-4-26B-A4B config.json `text_config`):
    # 128 experts (8 per token, each 704 wide) beside every block's dense
    # feed-forward; window 1024; global layers with 2 key/value heads that
    # are also the values.
    "gemma4_26b_a4b": gemma4(
        dims(30, 2816, 16, 8, 2112), 1024, num_global_key_value_heads=2, global_keys_as_values=True,
        num_experts=128, top_k_experts=8, moe_intermediate_dim=704,
    ),
}

# Published parameter counts of the text models (the model cards' and
# keras-hub's preset metadata; sources of the newer ones beside them).
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
    # keras-hub's `vault_gemma_1b_en` metadata.
    "vaultgemma_1b": 1_038_741_120,
    # The text decoder of gemma-4-31b-it as its safetensors headers sum
    # (language model 30,697,345,340 + vision tower 569,550,384 + projector
    # 6,193,152 = 31,273,088,876, HF's "31.3B"); the model card's "30.7B".
    "gemma4_31b": 30_697_345_340,
    # transformers' Gemma4ForCausalLM on the released E2B/E4B text configs
    # (tests/test_gemma4_e.py builds it on the meta device and counts). The
    # model cards' "5.1B / 8B with embeddings" add the vision and audio
    # encoders; E2B's "2.3B effective" is this less the per-layer table
    # (262,144 x 35 x 256).
    "gemma4_e2b": 4_628_569_379,
    "gemma4_e4b": 7_463_013_418,
    # The model card's "25.2B total" (3.8B active); transformers' model on
    # the released config counts the same (tests/test_gemma4_moe.py).
    "gemma4_26b_a4b": 25_233_141_790,
}


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named checkpoint: its architecture and where its weights live.

    `kaggle_handle` is keras-hub's preset (what `from_preset(name)` loads);
    `hf_handle` the same model on the Hugging Face Hub (`hf://google/...`,
    which `from_preset` also loads), or None.
    """

    name: str
    architecture: str
    kaggle_handle: str
    instruct: bool
    description: str
    hf_handle: str = None

    @property
    def config(self):
        return ARCHITECTURES[self.architecture]


def _entries():
    # (kaggle model, preset name, version, architecture, instruct, description[, HF repo])
    # Kaggle handles are keras-hub's (`keras_hub/src/models/*/..._presets.py`).
    rows = [
        ("keras/gemma", "gemma_2b_en", 3, "gemma_2b", False, "Gemma 2B base", "google/gemma-2b"),
        ("keras/gemma", "gemma_instruct_2b_en", 3, "gemma_2b", True, "Gemma 2B instruct", "google/gemma-2b-it"),
        ("keras/gemma", "gemma_1.1_instruct_2b_en", 4, "gemma_2b", True, "Gemma 1.1 2B instruct", "google/gemma-1.1-2b-it"),
        ("keras/gemma", "gemma_7b_en", 4, "gemma_7b", False, "Gemma 7B base", "google/gemma-7b"),
        ("keras/gemma", "gemma_instruct_7b_en", 4, "gemma_7b", True, "Gemma 7B instruct", "google/gemma-7b-it"),
        ("keras/gemma", "gemma_1.1_instruct_7b_en", 5, "gemma_7b", True, "Gemma 1.1 7B instruct", "google/gemma-1.1-7b-it"),
        ("keras/codegemma", "code_gemma_2b_en", 2, "gemma_2b", False, "CodeGemma 2B", "google/codegemma-2b"),
        ("keras/codegemma", "code_gemma_1.1_2b_en", 2, "gemma_2b", False, "CodeGemma 1.1 2B", "google/codegemma-1.1-2b"),
        ("keras/codegemma", "code_gemma_7b_en", 3, "gemma_7b", False, "CodeGemma 7B", "google/codegemma-7b"),
        ("keras/codegemma", "code_gemma_instruct_7b_en", 3, "gemma_7b", True, "CodeGemma 7B instruct", "google/codegemma-7b-it"),
        (
            "keras/codegemma", "code_gemma_1.1_instruct_7b_en", 3, "gemma_7b", True, "CodeGemma 1.1 7B instruct",
            "google/codegemma-1.1-7b-it",
        ),
        ("keras/gemma2", "gemma2_2b_en", 2, "gemma2_2b", False, "Gemma 2 2B base", "google/gemma-2-2b"),
        ("keras/gemma2", "gemma2_instruct_2b_en", 2, "gemma2_2b", True, "Gemma 2 2B instruct", "google/gemma-2-2b-it"),
        ("keras/gemma2", "gemma2_9b_en", 4, "gemma2_9b", False, "Gemma 2 9B base", "google/gemma-2-9b"),
        ("keras/gemma2", "gemma2_instruct_9b_en", 4, "gemma2_9b", True, "Gemma 2 9B instruct", "google/gemma-2-9b-it"),
        ("keras/gemma2", "gemma2_27b_en", 3, "gemma2_27b", False, "Gemma 2 27B base", "google/gemma-2-27b"),
        ("keras/gemma2", "gemma2_instruct_27b_en", 3, "gemma2_27b", True, "Gemma 2 27B instruct", "google/gemma-2-27b-it"),
        ("keras/gemma3", "gemma3_270m", 3, "gemma3_270m", False, "Gemma 3 270M base", "google/gemma-3-270m"),
        ("keras/gemma3", "gemma3_instruct_270m", 4, "gemma3_270m", True, "Gemma 3 270M instruct", "google/gemma-3-270m-it"),
        ("keras/gemma3", "gemma3_1b", 3, "gemma3_1b", False, "Gemma 3 1B base", "google/gemma-3-1b-pt"),
        ("keras/gemma3", "gemma3_instruct_1b", 3, "gemma3_1b", True, "Gemma 3 1B instruct", "google/gemma-3-1b-it"),
        # The Hugging Face repos of 4B+ are the vision+text models; their text part is this.
        ("keras/gemma3", "gemma3_4b_text", 2, "gemma3_4b", False, "Gemma 3 4B base, text only", "google/gemma-3-4b-pt"),
        (
            "keras/gemma3", "gemma3_instruct_4b_text", 3, "gemma3_4b", True, "Gemma 3 4B instruct, text only",
            "google/gemma-3-4b-it",
        ),
        ("keras/gemma3", "gemma3_12b_text", 3, "gemma3_12b", False, "Gemma 3 12B base, text only", "google/gemma-3-12b-pt"),
        (
            "keras/gemma3", "gemma3_instruct_12b_text", 3, "gemma3_12b", True, "Gemma 3 12B instruct, text only",
            "google/gemma-3-12b-it",
        ),
        ("keras/gemma3", "gemma3_27b_text", 4, "gemma3_27b", False, "Gemma 3 27B base, text only", "google/gemma-3-27b-pt"),
        (
            "keras/gemma3", "gemma3_instruct_27b_text", 3, "gemma3_27b", True, "Gemma 3 27B instruct, text only",
            "google/gemma-3-27b-it",
        ),
        # ShieldGemma: Gemma 2 safety classifiers; `GemmaCausalLM.classify` gives P("Yes").
        ("google/shieldgemma", "shieldgemma_2b_en", 2, "gemma2_2b", True, "ShieldGemma 2B", "google/shieldgemma-2b"),
        ("google/shieldgemma", "shieldgemma_9b_en", 2, "gemma2_9b", True, "ShieldGemma 9B", "google/shieldgemma-9b"),
        ("google/shieldgemma", "shieldgemma_27b_en", 2, "gemma2_27b", True, "ShieldGemma 27B", "google/shieldgemma-27b"),
        # Releases on earlier architectures (keras-hub's gemma3 and gemma presets).
        (
            "keras/function-gemma", "function_gemma_instruct_270m", 1, "gemma3_270m", True,
            "FunctionGemma 270M instruct, tuned for function calling", "google/functiongemma-270m-it",
        ),
        (
            "keras/medgemma", "medgemma_instruct_27b_text", 1, "gemma3_27b", True,
            "MedGemma 27B instruct, text only (medical text)", "google/medgemma-27b-text-it",
        ),
        (
            "keras/vaultgemma", "vault_gemma_1b_en", 2, "vaultgemma_1b", False,
            "VaultGemma 1B base, pretrained with differential privacy", "google/vaultgemma-1b",
        ),
        # TranslateGemma's presets are vision+text models; the text part loads here.
        (
            "keras/translategemma", "translategemma_4b_it", 1, "gemma3_4b", True,
            "TranslateGemma 4B instruct (55 languages), text part", "google/translategemma-4b-it",
        ),
        (
            "keras/translategemma", "translategemma_12b_it", 1, "gemma3_12b", True,
            "TranslateGemma 12B instruct (55 languages), text part", "google/translategemma-12b-it",
        ),
        (
            "keras/translategemma", "translategemma_27b_it", 1, "gemma3_27b", True,
            "TranslateGemma 27B instruct (55 languages), text part", "google/translategemma-27b-it",
        ),
        # Gemma 4 (keras-hub's gemma4_presets.py); vision+text models, the text decoder loads here.
        ("keras/gemma4", "gemma4_2b", 2, "gemma4_e2b", False, "Gemma 4 E2B base, text decoder", "google/gemma-4-E2B"),
        (
            "keras/gemma4", "gemma4_instruct_2b", 2, "gemma4_e2b", True, "Gemma 4 E2B instruct, text decoder",
            "google/gemma-4-E2B-it",
        ),
        ("keras/gemma4", "gemma4_4b", 2, "gemma4_e4b", False, "Gemma 4 E4B base, text decoder", "google/gemma-4-E4B"),
        (
            "keras/gemma4", "gemma4_instruct_4b", 2, "gemma4_e4b", True, "Gemma 4 E4B instruct, text decoder",
            "google/gemma-4-E4B-it",
        ),
        (
            "keras/gemma4", "gemma4_26b_a4b", 2, "gemma4_26b_a4b", False,
            "Gemma 4 26B-A4B base (mixture of experts, 3.8B active), text decoder", "google/gemma-4-26B-A4B",
        ),
        (
            "keras/gemma4", "gemma4_instruct_26b_a4b", 2, "gemma4_26b_a4b", True,
            "Gemma 4 26B-A4B instruct (mixture of experts, 3.8B active), text decoder", "google/gemma-4-26B-A4B-it",
        ),
        ("keras/gemma4", "gemma4_31b", 2, "gemma4_31b", False, "Gemma 4 31B base, text decoder", "google/gemma-4-31B"),
        (
            "keras/gemma4", "gemma4_instruct_31b", 2, "gemma4_31b", True, "Gemma 4 31B instruct, text decoder",
            "google/gemma-4-31B-it",
        ),
    ]
    for model, name, version, arch, instruct, description, *hf in rows:
        handle = f"kaggle://{model}/keras/{name}/{version}"
        yield Preset(name, arch, handle, instruct, description, f"hf://{hf[0]}" if hf else None)


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
