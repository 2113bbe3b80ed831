"""`GemmaBackbone`: token ids and padding mask in, final hidden states out."""

import dataclasses
import math
import warnings

import keras
from keras import ops

from keras_gemma import distribution as distribution_lib
from keras_gemma import lora as lora_lib
from keras_gemma import precision
from keras_gemma import quantization as quantization_lib
from keras_gemma.checkpoints import preset
from keras_gemma.config import LOCAL, GemmaConfig
from keras_gemma.layers import DecoderBlock, RMSNorm, TiedEmbedding, rotary_tables

CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(GemmaConfig))
REMAT_MODES = (None, "blocks")


def _as_config(config, kwargs):
    """A `GemmaConfig` from a config, a dict, or keyword arguments."""
    fields = {key: kwargs.pop(key) for key in list(kwargs) if key in CONFIG_FIELDS}
    if config is None:
        return GemmaConfig(**fields)
    if isinstance(config, dict):
        config = GemmaConfig.from_dict(config)
    if fields:
        config = config.replace(**fields)
    return config


_float16_warned = set()


def _warn_if_float16_overflows(config, compute_dtype):
    """Once per process and model kind: Gemma 3 and Gemma 2 27B in float16."""
    if compute_dtype != "float16":
        return
    kind = None
    if config.use_qk_norm:
        kind = "Gemma 3"
    elif config.attention_logit_softcap and config.hidden_dim >= 4608:
        kind = "Gemma 2 27B"
    if kind is None or kind in _float16_warned:
        return
    _float16_warned.add(kind)
    warnings.warn(
        f"{kind} in float16: its activations pass float16's largest number (65504), which turns logits "
        "into NaN in other libraries. keras_gemma computes the feed-forward products in float32 and "
        "clips the residual stream so the model stays finite, but its outputs drift from float32's. "
        "Use dtype='bfloat16' (the same memory, float32's range) or 'float32'.",
        stacklevel=3,
    )


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaBackbone(keras.Model):
    """The Gemma decoder stack, for every generation of Gemma.

    The architecture is one `GemmaConfig`; pass it, a dict of its fields, or
    the fields as keyword arguments.

    Args:
        config: a `GemmaConfig` (or dict), or None to build one from kwargs.
        dtype: a Keras dtype or `DTypePolicy`, e.g. `"bfloat16"` or
            `"mixed_bfloat16"`. Norms, softmax and soft-caps always compute in
            float32.
        remat: `"blocks"` recomputes each decoder block in the backward
            pass of training (`keras.remat`), so activation memory holds one
            block's instead of every block's; None (the default) keeps them.
            Off outside training (generation, scoring).
        quantization: set by `get_config` on a quantized backbone (`{"mode":
            "int8" or "int4", "config": ...}`): builds int8/int4 variables
            directly, ready for `load_weights`. Use `quantize()` otherwise.

    Example:
    ```python
    backbone = keras_gemma.GemmaBackbone(
        vocabulary_size=1000, num_layers=2, hidden_dim=64,
        num_query_heads=4, num_key_value_heads=1, head_dim=16,
        intermediate_dim=128,
    )
    hidden = backbone({
        "token_ids": np.array([[2, 17, 9]]),
        "padding_mask": np.array([[1, 1, 1]]),
    })  # (1, 3, 64)
    ```
    """

    def __init__(self, config=None, dtype=None, quantization=None, remat=None, **kwargs):
        if remat not in REMAT_MODES:
            raise ValueError(f"`remat` must be one of {REMAT_MODES}, got {remat!r}.")
        config = _as_config(config, kwargs)
        super().__init__(dtype=dtype, **kwargs)
        self.config = config
        self.remat = remat
        _warn_if_float16_overflows(config, self.compute_dtype)
        policy = self.dtype_policy
        self.token_embedding = TiedEmbedding(
            config.vocabulary_size,
            config.hidden_dim,
            embeddings_initializer=keras.initializers.VarianceScaling(
                scale=1.0, mode="fan_in", distribution="untruncated_normal"
            ),
            name="token_embedding",
            dtype=policy,
        )
        self.blocks = [
            DecoderBlock(config, i, name=f"decoder_block_{i}", dtype=policy)
            for i in range(config.num_layers)
        ]
        self.final_norm = RMSNorm(config.layer_norm_epsilon, name="final_norm", dtype=policy)
        self.per_layer_token_embedding = self.per_layer_model_projection = self.per_layer_projection_norm = None
        if config.per_layer_input_dim:  # Gemma 4 E2B/E4B: every layer's per-layer inputs, packed
            width = config.num_layers * config.per_layer_input_dim
            self.per_layer_token_embedding = keras.layers.Embedding(
                config.per_layer_vocabulary_size, width, name="per_layer_token_embedding", dtype=policy,
                embeddings_initializer=keras.initializers.RandomNormal(stddev=0.02),
            )
            self.per_layer_model_projection = keras.layers.EinsumDense(
                "btd,de->bte", (None, width), name="per_layer_model_projection", dtype=policy,  # e = layers * p
            )
            self.per_layer_projection_norm = RMSNorm(
                config.layer_norm_epsilon, name="per_layer_projection_norm", dtype=policy
            )
        # Key/value sharing, worked out once: layer i attends to the keys and
        # values of layer `kv_sources[i]` (itself, or an earlier one), and
        # owns cache entry `cache_slots[i]` (None: it has no cache).
        self.kv_sources = [config.kv_source(i) for i in range(config.num_layers)]
        owners = [i for i in range(config.num_layers) if self.kv_sources[i] == i]
        self.cache_slots = [owners.index(i) if i in owners else None for i in range(config.num_layers)]
        self.last_kv_layer = owners[-1]
        self.kv_read_by_others = {j for i, j in enumerate(self.kv_sources) if j != i}
        # Distinct (head_dim, base, scaling, fraction), so rotary tables are built once per call.
        self.rope_settings = sorted({block.rope for block in self.blocks})
        self.lora = None  # a `lora.LoraState` while LoRA is enabled
        self.quantization = None  # a `quantization.QuantizationRecord` once quantized
        if quantization is not None:
            self.quantization = quantization_lib.prepare_quantized_build(self, quantization)
        self.build()

    def build(self, input_shape=None):
        self.token_embedding.build((None, None))
        for block in self.blocks:
            block.build()
        self.final_norm.build((None, None, self.config.hidden_dim))
        if self.per_layer_token_embedding is not None:
            self.per_layer_token_embedding.build((None, None))
            self.per_layer_model_projection.build((None, None, self.config.hidden_dim))
            self.per_layer_projection_norm.build((None, None, None, self.config.per_layer_input_dim))
        self.built = True

    def call(self, inputs, training=None):
        hidden, _ = self.hidden_states(
            inputs["token_ids"], inputs.get("padding_mask"), training=training, segment_ids=inputs.get("segment_ids")
        )
        return hidden

    def hidden_states(
        self, token_ids, padding_mask=None, positions=None, cache=None, cache_index=None, training=None,
        last_only=False, layer_intercept_fn=None, segment_ids=None,
    ):
        """The decoder stack, with an optional cache (see `Attention.call`).

        Args:
            token_ids: (b, t) int.
            padding_mask: (b, t) bool/int, 1 for real tokens. Padding may sit
                on either side; rotary positions count real tokens only.
            positions: (b, t) rotary positions; by default
                `cumsum(padding_mask) - 1`, so a left-padded row sees the
                same positions as the unpadded one. They must not decrease
                along a row's real tokens.
            cache: None or the list from `init_cache` (an entry per layer
                that computes keys and values: `cache_slots`).
            cache_index: the index of `token_ids` in the padded sequence
                (decode steps).
            last_only: the last column's hidden state only, (b, 1, d) (a
                prompt chunk: the last block that computes keys and values
                computes them for every column, the rest for the last, and
                so do the key/value-shared blocks after it; Gemma 3 270M, a
                512-token prompt: 1/18 fewer products).
            layer_intercept_fn: `fn(x, i) -> x`, given the token embeddings
                (b, t, d) as `i = -1` (before their `sqrt(hidden_dim)`
                scaling), then each block's output as `i = 0, 1, ...`; what
                it returns goes on (keras-hub's `score` argument, which drops
                what it returns for the embeddings).
            segment_ids: (b, t) int, which packed sample each token belongs
                to (`preprocessor(..., packing=True)`): a query sees only
                keys of its own segment, and positions (by default) restart
                at 0 in each. No cache.

        Returns:
            `(hidden (b, t, d), updated cache or None)`.
        """
        with precision.matmul_precision(self.compute_dtype):
            return self._hidden_states(
                token_ids, padding_mask, positions, cache, cache_index, training, last_only, layer_intercept_fn,
                segment_ids,
            )

    def _hidden_states(
        self, token_ids, padding_mask, positions, cache, cache_index, training, last_only, layer_intercept_fn,
        segment_ids=None,
    ):
        token_ids = ops.convert_to_tensor(token_ids)
        if padding_mask is None:
            padding_mask = ops.ones(ops.shape(token_ids), "bool")
        padding_mask = ops.cast(padding_mask, "bool")
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("`segment_ids` (packed training rows) cannot be used with a cache.")
            segment_ids = ops.cast(segment_ids, "int32")
        if positions is None and segment_ids is not None:
            positions = segment_positions(segment_ids, padding_mask)
        if positions is None:
            positions = ops.maximum(ops.cumsum(ops.cast(padding_mask, "int32"), axis=1) - 1, 0)
        positions = ops.cast(positions, "int32")
        key_positions = ops.where(padding_mask, positions, -1)  # (b, t)

        intercept = layer_intercept_fn or (lambda x, i: x)
        x = intercept(self.token_embedding(token_ids), -1)  # (b, t, d)
        x = x * ops.cast(math.sqrt(self.config.hidden_dim), x.dtype)
        per_layer_inputs = self._per_layer_inputs(token_ids, x)  # (b, t, layers, p) or None
        rotary = {
            rope: rotary_tables(positions, *rope)
            for rope in self.rope_settings
        }
        new_cache = [] if cache is not None else None
        remat = self.remat == "blocks" and training and cache is None
        shared = {}  # layer index -> the keys and values (`Attention.call`'s kv) later layers read
        for i, block in enumerate(self.blocks):
            slot, source = self.cache_slots[i], self.kv_sources[i]
            # (A block whose keys and values later blocks read is not rematerialized: they are its outputs too.)
            x, layer_cache, kv = (_rematerialized(block) if remat and i not in self.kv_read_by_others else block)(
                x,
                rotary[block.rope],
                positions,
                key_positions,
                cache=None if cache is None or slot is None else cache[slot],
                cache_index=cache_index,
                training=training,
                last_only=last_only and i >= self.last_kv_layer,
                segment_ids=segment_ids,
                per_layer_input=None if per_layer_inputs is None else per_layer_inputs[:, :, i],
                shared_kv=shared.get(source) if source != i else None,
            )
            if i in self.kv_read_by_others:
                shared[i] = kv
            x = intercept(x, i)
            if cache is not None and slot is not None:
                new_cache.append(layer_cache)
        return self.final_norm(x), new_cache

    def _per_layer_inputs(self, token_ids, x):
        """Gemma 4's per-layer embeddings (b, t, layers, p) from the token ids
        and the scaled token embeddings x (b, t, d), as transformers'
        `get_per_layer_inputs` and `project_per_layer_inputs`; None when off."""
        if self.per_layer_token_embedding is None:
            return None
        config = self.config
        shape = (ops.shape(x)[0], ops.shape(x)[1], config.num_layers, config.per_layer_input_dim)
        tokens = self.per_layer_token_embedding(token_ids)  # (b, t, layers * p)
        tokens = ops.reshape(tokens * ops.cast(math.sqrt(config.per_layer_input_dim), tokens.dtype), shape)
        projected = self.per_layer_model_projection(x) * ops.cast(config.hidden_dim**-0.5, x.dtype)
        projected = self.per_layer_projection_norm(ops.reshape(projected, shape))  # (b, t, layers, p)
        return (projected + ops.cast(tokens, projected.dtype)) * ops.cast(2**-0.5, projected.dtype)

    def init_cache(self, batch_size, max_length, dtype=None):
        """An empty cache: per layer `(keys, values, key_positions)`, keys
        and values (b, slots, k, h), positions (b, slots).

        Global layers hold `max_length` slots, sliding-window layers a ring
        (`layers.ring_length`). Empty slots have position -1. Layers that
        share another's keys and values have no entry (`cache_slots`).
        """
        dtype = dtype or self.compute_dtype
        cache = []
        for block, slot in zip(self.blocks, self.cache_slots):
            if slot is None:
                continue
            attention = block.attention
            slots = attention.cache_length(max_length)
            kv_shape = (batch_size, slots, attention.num_key_value_heads, attention.head_dim)
            cache.append(
                (
                    ops.zeros(kv_shape, dtype),
                    ops.zeros(kv_shape, dtype),
                    ops.full((batch_size, slots), -1, "int32"),
                )
            )
        return cache

    def weight_map(self):
        """Every weight under a canonical, checkpoint-neutral name.

        Names and shapes (n query heads, k kv heads, h head_dim, d hidden,
        f feed-forward width, v vocabulary; k and h are the layer's own):
            token_embedding (v, d); final_norm (d,);
            blocks.{i}.{pre_attention_norm,post_attention_norm,pre_ffw_norm,
            post_ffw_norm} (d,); blocks.{i}.attention.query (n, d, h),
            .key (k, d, h), .value (k, d, h) (absent where values are the
            keys), .output (n, h, d), .query_norm (h,), .key_norm (h,);
            blocks.{i}.feed_forward.gate (d, f), .up (d, f), .down (f, d);
            blocks.{i}.layer_scalar (1,) (Gemma 4).
        Per-layer embeddings (Gemma 4 E2B/E4B; L layers, p their width, u
        the per-layer vocabulary): per_layer_token_embedding (u, L * p),
        per_layer_model_projection (d, L * p), per_layer_projection_norm
        (p,); blocks.{i}.per_layer_input_gate (d, p),
        .per_layer_projection (p, d), .post_per_layer_input_norm (d,).
        Key/value-shared layers have no .key, .value or .key_norm; with
        `use_double_wide_mlp` their f is twice `intermediate_dim`.
        With a mixture of experts (e experts, g their width):
            blocks.{i}.{pre_moe_norm,post_moe_norm,post_dense_ffw_norm} (d,);
            blocks.{i}.moe.router (d, e), .router_scale (d,) and
            .expert_scale (e,) (multipliers, ones at init), .gate_up
            (e, 2, d, g) (each expert's gate kernel, then its up kernel),
            .down (e, g, d).
        Norm scales are zero-centred (the model multiplies by 1 + scale).
        On a quantized backbone the projections, the embedding and the
        expert banks are the raw int8 (int4: packed) storage, without their
        scales: load float checkpoints into a float backbone, then `quantize`.
        """
        weights = {"token_embedding": _variable(self.token_embedding, "embeddings")}
        for i, block in enumerate(self.blocks):
            prefix = f"blocks.{i}"
            for norm_name in (
                "pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm",
                "pre_moe_norm", "post_moe_norm", "post_dense_ffw_norm",
            ):
                norm = getattr(block, norm_name)
                if norm is not None:
                    weights[f"{prefix}.{norm_name}"] = norm.scale
            attention = block.attention
            for name, dense in (
                ("query", attention.query_dense),
                ("key", attention.key_dense),
                ("value", attention.value_dense),
                ("output", attention.output_dense),
            ):
                if dense is not None:
                    weights[f"{prefix}.attention.{name}"] = _variable(dense, "kernel")
            for name in ("query_norm", "key_norm"):
                if getattr(attention, name) is not None:
                    weights[f"{prefix}.attention.{name}"] = getattr(attention, name).scale
            for name in ("gate", "up", "down"):
                weights[f"{prefix}.feed_forward.{name}"] = _variable(getattr(block.feed_forward, name), "kernel")
            if block.moe is not None:
                for name in ("router", "router_scale", "expert_scale", "gate_up", "down"):
                    weights[f"{prefix}.moe.{name}"] = getattr(block.moe, name)
            if block.use_layer_scalar:
                weights[f"{prefix}.layer_scalar"] = block.layer_scalar
            if block.per_layer_input_dim:
                for name in ("per_layer_input_gate", "per_layer_projection"):
                    weights[f"{prefix}.{name}"] = _variable(getattr(block, name), "kernel")
                weights[f"{prefix}.post_per_layer_input_norm"] = block.post_per_layer_input_norm.scale
        weights["final_norm"] = self.final_norm.scale
        if self.per_layer_token_embedding is not None:
            weights["per_layer_token_embedding"] = _variable(self.per_layer_token_embedding, "embeddings")
            weights["per_layer_model_projection"] = _variable(self.per_layer_model_projection, "kernel")
            weights["per_layer_projection_norm"] = self.per_layer_projection_norm.scale
        return weights

    # -- presets (keras_gemma/checkpoints/preset.py) ---------------------------

    @classmethod
    def from_preset(cls, handle, dtype=None, load_weights=True, sliding_window_size=None):
        """A backbone from a preset name, `kaggle://` or `hf://` handle,
        keras-hub or Hugging Face directory, or `.gguf` file.

        Args:
            handle: e.g. `"gemma3_270m"`, `"kaggle://keras/gemma3/keras/gemma3_1b/3"`,
                `"hf://google/gemma-3-1b-pt"`, `"./my_preset"`, `"model.gguf"`.
            dtype: the dtype policy, e.g. `"bfloat16"` (default: Keras' default).
            load_weights: False builds the architecture with random weights.
            sliding_window_size: a window for the sliding-window layers other
                than the checkpoint's (see `set_sliding_window`).

        Example:
        ```python
        backbone = keras_gemma.GemmaBackbone.from_preset("gemma3_270m", dtype="bfloat16")
        ```
        """
        return preset.load_backbone(
            handle, cls, dtype=dtype, load_weights=load_weights, sliding_window_size=sliding_window_size
        )

    def set_sliding_window(self, size):
        """Sets the sliding-window (local) layers' window to `size` keys, the
        query's own included; global layers are unchanged, and so are the
        weights. The Gemma 2 report (table 10) shrinks the window at
        inference as a speed lever: 4096 -> 1024 moved perplexity from 1.63
        to 1.64. Decode steps then read a smaller ring cache in those
        layers, and long prompts attend over fewer keys.

        Raises:
            ValueError: `size` not a positive integer, or a model without
                sliding-window layers (Gemma 1).
        """
        if LOCAL not in self.config.layer_types:
            raise ValueError("This model has no sliding-window layers (all of its layers are global).")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"`sliding_window_size` must be a positive integer, got {size!r}.")
        self.config = dataclasses.replace(self.config, sliding_window_size=size)
        for index, block in enumerate(self.blocks):
            block.attention.window = self.config.window(index)

    def save_to_preset(self, directory):
        """Writes a keras-hub preset (config.json, model.weights.h5, metadata.json).

        The class is keras-hub's `GemmaBackbone`, `Gemma3Backbone` or (Gemma 4,
        text only) `Gemma4Backbone`. A quantized (int8/int4) backbone, or a
        Gemma 4 one whose config `Gemma4Backbone` cannot express, is written
        as keras_gemma's native preset instead (same files; our config with
        the quantization record and Keras' `save_weights`): `from_preset`
        loads it with identical outputs, but keras-hub cannot load it, and a
        warning says so (and why). With
        LoRA enabled this raises: call `merge_lora_weights()` first, or save
        the adapters with `save_lora_weights`.
        """
        preset.save_backbone(self, directory)

    def export_to_transformers(self, directory, tokenizer=None):
        """Writes a Hugging Face checkpoint (config.json, model.safetensors, tokenizer.model).

        Float models only: a quantized model, or one with LoRA enabled (call
        `merge_lora_weights()` first), raises ValueError.
        """
        preset.export_to_transformers(self, directory, tokenizer=tokenizer)

    # -- LoRA, quantization, sharding (keras_gemma/lora.py, quantization.py, distribution.py)

    def enable_lora(self, rank, alpha=None, target_layers=lora_lib.DEFAULT_TARGETS):
        """Adds LoRA adapters to the chosen projections and freezes everything else.

        Args:
            rank: the adapters' rank.
            alpha: the update is scaled by `alpha / rank` (default: `rank`).
            target_layers: `"all"` or names among `query`, `key`, `value`,
                `output`, `gate`, `up`, `down` (the dense feed-forward's; a
                mixture of experts' router and expert banks stay frozen).

        Example:
        ```python
        backbone.enable_lora(4, target_layers=("query", "value"))
        ```
        """
        lora_lib.enable_lora(self, rank, alpha=alpha, target_layers=target_layers)

    def save_lora_weights(self, path, format="keras"):
        """Writes only the adapters: `format="keras"` a `.npz` file with rank,
        alpha, targets and the config; `"peft"` a PEFT adapter directory
        (`adapter_config.json`, `adapter_model.safetensors`) that
        `peft.PeftModel.from_pretrained` loads onto `export_to_transformers`' model."""
        lora_lib.save_lora_weights(self, path, format=format)

    def load_lora_weights(self, path):
        """Restores adapters from `save_lora_weights`, or a PEFT adapter
        directory (enabling LoRA if needed); refuses adapters for another
        model, rank, alpha or targets, changing nothing."""
        lora_lib.load_lora_weights(self, path)

    def merge_lora_weights(self):
        """Folds the adapters into the base kernels (re-quantizing a quantized base)
        and removes them, leaving a plain model for export."""
        lora_lib.merge_lora_weights(self)

    def quantize(self, mode=None, config=None, weight_only=True, **kwargs):
        """Weight-only `"int8"` or `"int4"` quantization of every projection,
        of the tied embedding / output head and of a mixture of experts'
        banks (norms and the experts' router stay float).

        Args:
            mode: `"int8"` or `"int4"`.
            config: optionally a `keras.quantizers.Int8QuantizationConfig` /
                `Int4QuantizationConfig` (int4 default: groups of 128).
            weight_only: drop the config's activation quantizer (Keras' int8
                default quantizes each projection's inputs too).
        """
        kwargs.pop("type_check", None)
        if kwargs.pop("filters", None) is not None or kwargs:
            raise ValueError(f"GemmaBackbone.quantize takes only `mode`, `config` and `weight_only`, got {sorted(kwargs) or ['filters']}.")
        quantization_lib.quantize_backbone(self, mode, config, weight_only)

    @staticmethod
    def get_layout_map(device_mesh, model_parallel_dim_name="model", data_parallel_dim_name="batch", config=None):
        """A `keras.distribution.LayoutMap` sharding the weights over `device_mesh`;
        see `keras_gemma.distribution.get_layout_map`."""
        return distribution_lib.get_layout_map(device_mesh, model_parallel_dim_name, data_parallel_dim_name, config=config)

    def get_config(self):
        config = {
            "config": self.config.to_dict(),
            "name": self.name,
            "trainable": self.trainable,
            "dtype": _serialized_policy(self.dtype_policy),
        }
        if self.remat is not None:
            config["remat"] = self.remat
        if self.quantization is not None:
            config["quantization"] = self.quantization.to_dict()
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("dtype"), dict):
            config["dtype"] = keras.dtype_policies.deserialize(config["dtype"])
        return cls(**config)


def _serialized_policy(policy):
    """`keras.dtype_policies.serialize(policy)`, written out for a plain
    policy: Keras' function imports TensorFlow wherever it is installed."""
    if type(policy) is keras.dtype_policies.DTypePolicy:
        return {"module": "keras", "class_name": "DTypePolicy", "config": policy.get_config(), "registered_name": None}
    return keras.dtype_policies.serialize(policy)


def segment_positions(segment_ids, padding_mask):
    """Rotary positions (b, t) that restart at 0 in each packed segment: a
    token's count of earlier real tokens with its segment id."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (b, t, t)
    index = ops.arange(ops.shape(segment_ids)[1])
    earlier = (index[None, :] <= index[:, None])[None]  # (1, t, t): key at or before query
    counted = ops.logical_and(ops.logical_and(same, earlier), padding_mask[:, None, :])
    return ops.maximum(ops.sum(ops.cast(counted, "int32"), axis=2) - 1, 0)


def _rematerialized(block):
    """`block`'s call, recomputed in the backward pass: only x (its first
    argument) is differentiated; the rest are constants of the closure."""

    def call(x, *args, **kwargs):
        return keras.remat(lambda x: block(x, *args, **kwargs)[0])(x), None, None

    return call


def _variable(layer, name):
    """The variable behind `layer.<name>`, past LoRA/quantization wrappers."""
    variable = getattr(layer, "_" + name, None)
    return variable if variable is not None else getattr(layer, name)
