"""Weight-only int8 / int4 quantization, on Keras' own `quantize`.

Every projection (`EinsumDense`) and the tied embedding / output head
(`TiedEmbedding`, a `keras.layers.Embedding`) are quantized by Keras itself;
the norms stay in float, and so do a mixture of experts' router and expert
banks (plain variables read by the experts' own gathers and einsums, which
Keras' quantization does not reach). Activations are left in float: Keras' int8 default
also quantizes each projection's inputs on the fly, which costs accuracy and
saves no memory, so `quantize` here switches that off.

A quantized backbone remembers `{"mode": ..., "config": ...}` in its config.
A backbone constructed with that record builds its int8/int4 variables
directly (no float copy first), so `model.save()` / `keras.saving.load_model`
and `save_weights` / `load_weights` round-trip.

Example:
```python
lm = keras_gemma.GemmaCausalLM(backbone)
lm.quantize("int8")  # or "int4" (groups of 128 along each input dimension)
lm.save("gemma_int8.keras")
```
"""

import contextlib
import dataclasses
import gc

import keras
import numpy as np
from keras import ops

MODES = ("int8", "int4")


@dataclasses.dataclass(frozen=True)
class QuantizationRecord:
    """How a backbone was quantized: the mode and the serialized Keras config."""

    mode: str
    config: dict

    def to_dict(self):
        return {"mode": self.mode, "config": self.config}

    @classmethod
    def from_dict(cls, record):
        if isinstance(record, cls):
            return record
        return cls(mode=record["mode"], config=record["config"])

    def keras_config(self):
        return keras.saving.deserialize_keras_object(self.config)


def default_config(mode):
    """Keras' config for `mode`, weight-only."""
    if mode == "int8":
        return keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)
    if mode == "int4":
        # Keras' int4 default: asymmetric groups of 128 along the input dim,
        # no activation quantization.
        return keras.quantizers.Int4QuantizationConfig(block_size=128)
    raise ValueError(f"Unsupported quantization mode {mode!r}; expected one of {MODES}.")


def resolve(mode=None, config=None, weight_only=True):
    """(mode, Keras QuantizationConfig) from a mode, a config, or both.

    Keras' `Layer.quantize` wrapper already turns a bare mode into Keras'
    default config (which, for int8, quantizes activations too), so weight-only
    is applied here, to whatever config arrives.
    """
    if config is not None:
        if mode is not None and mode != config.mode:
            raise ValueError(f"`mode={mode!r}` disagrees with the config's mode {config.mode!r}.")
        mode = config.mode
    if mode not in MODES:
        raise ValueError(f"Unsupported quantization mode {mode!r}; expected one of {MODES}.")
    if config is None:
        config = default_config(mode)
    if weight_only and config.activation_quantizer is not None:
        config = type(config).from_config({**config.get_config(), "activation_quantizer": None})
    return mode, config


def quantized_layers(backbone):
    """The layers quantization converts: the embedding and every projection."""
    return [
        layer
        for layer in backbone._flatten_layers(include_self=False)
        if isinstance(layer, (keras.layers.EinsumDense, keras.layers.Embedding))
    ]


def policy_name(mode, config, source_policy):
    """The dtype policy name Keras gives a layer quantized from `source_policy`."""
    if mode == "int4":
        block_size = getattr(config, "block_size", None)
        mode = f"int4/{-1 if block_size is None else block_size}"
    return f"{mode}_from_{source_policy.name}"


def quantize_backbone(backbone, mode=None, config=None, weight_only=True):
    """Quantizes `backbone` in place; see `GemmaBackbone.quantize`."""
    if backbone.quantization is not None:
        raise ValueError(
            f"This backbone is already quantized ({backbone.quantization.mode}). "
            "Quantize a float model instead."
        )
    if getattr(backbone, "lora", None) is not None:
        raise ValueError(
            "Quantize before enabling LoRA (an int8 base with float adapters), "
            "or call `merge_lora_weights()` first."
        )
    mode, config = resolve(mode, config, weight_only)
    with one_gc_collect():
        for layer in quantized_layers(backbone):
            layer.quantize(mode, type_check=False, config=config)
            _fix_torch_int8_gradient(layer)
    backbone.quantization = QuantizationRecord(mode, keras.saving.serialize_keras_object(config))
    refresh(backbone)


@contextlib.contextmanager
def one_gc_collect():
    """Runs `gc.collect()` once at the end instead of at every deleted variable.

    Keras' `Layer.__delattr__` calls `gc.collect()` whenever a variable is
    deleted (each `quantize` deletes the float kernel). On a loaded model one
    collection takes about 0.4 s, which made quantizing the 270M's 127 layers
    take over a minute; one collection at the end frees the same buffers.
    """
    collect = gc.collect
    gc.collect = lambda *args, **kwargs: 0
    try:
        yield
    finally:
        gc.collect = collect
        gc.collect()


def prepare_quantized_build(backbone, record):
    """Before `build`: give every quantized layer its quantized policy, so
    `build` creates int8/int4 variables straight away (used when loading)."""
    record = QuantizationRecord.from_dict(record)
    config = record.keras_config()
    for layer in quantized_layers(backbone):
        layer.quantization_config = config
        layer.dtype_policy = policy_name(record.mode, config, layer.dtype_policy)
        _fix_torch_int8_gradient(layer)
    return record


def _fix_torch_int8_gradient(layer):
    """Works around a Keras (3.15) bug in weight-only int8 `EinsumDense` on
    PyTorch: its forward rebinds `kernel_scale` to the dequantization layout
    before the custom gradient reads it, so the backward pass re-adjusts it
    and fails for kernels stored transposed (query/key/value, "btd,ndh").
    On PyTorch Keras' weight-only forward is exactly "dequantize, then float
    einsum"; this runs the same and lets autograd give the input gradient.
    """
    if keras.config.backend() != "torch" or not isinstance(layer, keras.layers.EinsumDense):
        return
    original = type(layer)._int8_call

    def int8_call(inputs, training=None):
        if layer.inputs_quantizer is not None:
            return original(layer, inputs, training=training)
        scale = layer._adjust_scale_for_dequant(ops.convert_to_tensor(layer.kernel_scale))
        kernel = ops.divide(ops.cast(ops.convert_to_tensor(layer._kernel), layer.compute_dtype), scale)
        x = ops.einsum(layer.equation, inputs, kernel)
        if layer.lora_enabled:
            lora_x = ops.matmul(ops.einsum(layer.equation, inputs, layer.lora_kernel_a), layer.lora_kernel_b)
            x = ops.cast(ops.add(x, (layer.lora_alpha / layer.lora_rank) * lora_x), layer.compute_dtype)
        if layer.bias is not None:
            x = ops.add(x, layer.bias)
        if layer.activation is not None:
            x = layer.activation(x)
        return x

    layer._int8_call = int8_call


def refresh(model):
    """Drops compiled functions and, on PyTorch, re-tracks parameters after
    variables were added or removed (quantize, enable/merge LoRA)."""
    model.train_function = model.test_function = model.predict_function = None
    if keras.config.backend() == "torch":
        for layer in model._flatten_layers():
            layer._track_variables()


def dequantized_embeddings(layer, dtype):
    """The float (vocab, d) table of an int8/int4-quantized `Embedding`,
    mirroring Keras' `Embedding._int8_call` / `_int4_call` lookups."""
    table = layer._embeddings
    if layer.quantization_mode == "int4":
        table = keras.quantizers.unpack_int4(table, layer.output_dim, axis=-1)
    elif layer.quantization_mode != "int8":
        raise ValueError(f"Cannot dequantize an embedding in mode {layer.quantization_mode!r}.")
    table = ops.cast(table, "float32")  # (v, d)
    scale = ops.cast(layer.embeddings_scale, "float32")
    block_size = getattr(layer, "_int4_block_size", None)
    if layer.quantization_mode == "int4" and block_size not in (None, -1):
        # Groups of `block_size` along d, asymmetric: (q - zero) * scale.
        zero = ops.cast(layer.embeddings_zero, "float32")  # (v, groups)
        vocabulary, width = layer.input_dim, layer.output_dim
        if width % block_size == 0:
            # g_idx is `i // block_size`: broadcast per group instead of
            # gathering two (v, d) tables (a third of the time, less memory).
            table = ops.reshape(table, (vocabulary, width // block_size, block_size))  # (v, groups, block)
            table = (table - zero[..., None]) * scale[..., None]
            table = ops.reshape(table, (vocabulary, width))  # (v, d)
        else:
            groups = ops.cast(layer.g_idx, "int32")  # (d,)
            table = (table - ops.take(zero, groups, axis=1)) * ops.take(scale, groups, axis=1)
    else:
        table = table / scale[:, None]
    return ops.cast(table, dtype)


def parameter_bytes(model):
    """Bytes held by the model's variables (its parameter memory)."""
    total = 0
    for variable in model.weights:
        dtype = keras.backend.standardize_dtype(variable.dtype)
        itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
        total += int(np.prod(variable.shape)) * itemsize
    return total
