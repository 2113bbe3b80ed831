"""Weight-only int8 / int4 quantization, on Keras' own `quantize`.

Every projection (`EinsumDense`) and the tied embedding / output head
(`TiedEmbedding`, a `keras.layers.Embedding`) are quantized by Keras itself.
A mixture of experts' banks (plain variables, which Keras' quantization does
not reach) are quantized here with Keras' own quantizers, each expert's
kernel as Keras quantizes a Dense kernel (`BankQuantizer`). The norms and
the experts' router stay in float. Activations are left in float: Keras' int8 default
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
        config = type(config).from_config({**serialize_config(config)["config"], "activation_quantizer": None})
    return mode, config


def quantized_layers(backbone):
    """The layers quantization converts: the embedding, every projection and
    the mixtures of experts (their banks)."""
    return [
        layer
        for layer in backbone._flatten_layers(include_self=False)
        if isinstance(layer, (keras.layers.EinsumDense, keras.layers.Embedding)) or _has_banks(layer)
    ]


def _has_banks(layer):
    """Whether `layer` is a `layers.MixtureOfExperts` (by its attribute: layers.py imports this module)."""
    return hasattr(layer, "bank_quantizer")


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
    backbone.quantization = QuantizationRecord(mode, serialize_config(config))
    refresh(backbone)


def serialize_config(config):
    """What `keras.saving.serialize_keras_object(config)` gives for a Keras
    quantization config or quantizer, written here because Keras' function
    imports TensorFlow wherever it is installed (to test for its shapes), and
    under JAX or PyTorch keras_gemma must not. Classes from outside
    `keras.quantizers` go through Keras' function."""
    if config is None:
        return None
    if type(config).__module__.split(".")[:2] != ["keras", "src"]:
        return keras.saving.serialize_keras_object(config)
    if isinstance(config, keras.quantizers.QuantizationConfig):
        fields = {
            "weight_quantizer": serialize_config(config.weight_quantizer),
            "activation_quantizer": serialize_config(config.activation_quantizer),
        }
        if hasattr(config, "block_size"):
            fields["block_size"] = config.block_size
    else:
        fields = config.get_config()
    return {"module": "keras.quantizers", "class_name": type(config).__name__, "config": fields, "registered_name": None}


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
        if _has_banks(layer):
            layer.bank_quantizer = BankQuantizer.of(record.mode, config)
            continue
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


@dataclasses.dataclass(frozen=True)
class BankQuantizer:
    """int8/int4 storage of an expert bank: a stack of (in, out) kernels,
    shape (..., in, out) (`layers.MixtureOfExperts`' gate_up (e, 2, d, g)
    and down (e, g, d)).

    Each kernel is quantized as Keras quantizes a Dense kernel: int8 per
    output channel (`keras.quantizers.abs_max_quantize`: `q = round(w *
    scale)`, `w ~ q / scale`); int4 as this module's projections are,
    asymmetric in groups of `block_size` inputs
    (`abs_max_quantize_grouped_with_zero_point`: `w ~ (q - zero) * scale`),
    or, with no `block_size`, per output channel in [-8, 7] without a zero
    point. int4 values are packed in pairs along `out` (`pack_int4`).

    Beside a bank `name` (int8 values; int4: packed, (..., in, ceil(out /
    2))) live `name_scale` (..., groups, out) and, for int4 in groups,
    `name_zero` (..., groups, out) int8; int8 and per-channel int4 have
    one group. Scales keep the bank's leading axes, so the chosen experts'
    are gathered with their kernels.

    Args:
        mode: `"int8"` or `"int4"`.
        block_size: int4 only: inputs per group; None: per output channel.
    """

    mode: str
    block_size: int = None

    @classmethod
    def of(cls, mode, config=None):
        """The bank quantizer matching Keras' `config` for the projections."""
        block_size = getattr(config, "block_size", None) if mode == "int4" else None
        return cls(mode, None if block_size in (None, -1) else int(block_size))

    @property
    def grouped(self):
        return self.block_size is not None

    def variables(self, shape):
        """`{suffix: (shape, dtype)}` of what stores a bank of `shape` (dtype
        None: the layer's variable dtype)."""
        *lead, inputs, outputs = shape
        groups = -(-inputs // self.block_size) if self.grouped else 1
        values = (*lead, inputs, (outputs + 1) // 2 if self.mode == "int4" else outputs)
        stored = {"": (values, "int8"), "_scale": ((*lead, groups, outputs), None)}
        if self.grouped:
            stored["_zero"] = ((*lead, groups, outputs), "int8")
        return stored

    def quantize(self, bank):
        """`{suffix: numpy array}` (as `variables`) of a float bank (..., in, out)."""
        bank = ops.convert_to_numpy(bank)
        *lead, inputs, outputs = bank.shape
        parts = {suffix: [] for suffix in self.variables(bank.shape)}
        for kernel in bank.reshape(-1, inputs, outputs):  # Keras' numpy path, one kernel at a time
            if self.grouped:
                quantized = keras.quantizers.abs_max_quantize_grouped_with_zero_point(
                    kernel, block_size=self.block_size, value_range=(-8, 7), to_numpy=True
                )  # values, scale and zero point, each (groups, out)
            else:
                quantized = keras.quantizers.abs_max_quantize(
                    kernel, axis=0, value_range=(-127, 127) if self.mode == "int8" else (-8, 7), to_numpy=True
                )  # values, scale (1, out)
            for suffix, array in zip(parts, quantized):
                parts[suffix].append(ops.convert_to_numpy(array))
        stored = {suffix: np.stack(arrays).reshape(*lead, *arrays[0].shape) for suffix, arrays in parts.items()}
        if self.mode == "int4":
            stored[""] = ops.convert_to_numpy(keras.quantizers.pack_int4(stored[""], axis=-1)[0])
        return stored

    def dequantize(self, values, scale, zero=None, outputs=None, dtype="float32"):
        """The float bank (..., in, out) in `dtype` from its stored parts;
        `outputs`: the unpacked width (int4)."""
        if self.mode == "int4":
            values = keras.quantizers.unpack_int4(values, outputs, axis=-1)
        inputs = values.shape[-2]

        def per_input(part):  # (..., groups, out) -> (..., in, out)
            part = ops.cast(part, dtype)
            if part.shape[-2] == 1:
                return part
            return ops.repeat(part, self.block_size, axis=-2)[..., :inputs, :]

        values = ops.cast(values, dtype)
        if zero is None:
            return values / per_input(scale)
        return (values - per_input(zero)) * per_input(scale)


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
