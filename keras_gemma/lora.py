"""LoRA on Keras' own `EinsumDense.enable_lora`: adapters, their files, merging.

Keras adds two float32 matrices per targeted projection, `lora_kernel_a`
(kernel shape without its last axis, plus `rank`) and `lora_kernel_b`
(`rank`, last kernel axis), and computes
`kernel + (alpha / rank) * lora_kernel_a @ lora_kernel_b`; `lora_kernel_b`
starts at zero, so enabling LoRA leaves the outputs unchanged. On an
int8/int4 base (`quantize` first) the adapters stay float: QLoRA-style.

Everything else (embedding, norms, base kernels, a mixture of experts' router
and expert banks) is frozen.

Example:
```python
backbone.enable_lora(4, alpha=8, target_layers=("query", "value"))
lm.compile(...); lm.fit(...)
backbone.save_lora_weights("task.lora.npz")  # the adapter only
backbone.merge_lora_weights()  # fold into the base kernels for export
```
"""

import dataclasses
import hashlib
import json
import os

import keras
import numpy as np
from keras import ops

from keras_gemma.checkpoints import peft_format
from keras_gemma.quantization import one_gc_collect, refresh

FORMAT = "keras_gemma.lora"
FORMAT_VERSION = 1

# Target name -> (sub-layer of a decoder block, attribute of its EinsumDense).
TARGETS = {
    "query": ("attention", "query_dense"),
    "key": ("attention", "key_dense"),
    "value": ("attention", "value_dense"),
    "output": ("attention", "output_dense"),
    "gate": ("feed_forward", "gate"),
    "up": ("feed_forward", "up"),
    "down": ("feed_forward", "down"),
}
DEFAULT_TARGETS = ("query", "value")
# Parts of a mixture of experts (`layers.MixtureOfExperts`): plain variables,
# not `EinsumDense`, so Keras has no LoRA for them; they stay frozen.
EXPERT_PARTS = ("moe", "experts", "router", "gate_up", "expert_gate", "expert_up", "expert_down")


@dataclasses.dataclass(frozen=True)
class LoraState:
    """What `enable_lora` did, so that merging can undo it."""

    rank: int
    alpha: float
    targets: tuple
    frozen_layers: tuple = dataclasses.field(default=(), repr=False, compare=False)


def resolve_targets(target_layers):
    """Target names in canonical order, from a name, a list, or `"all"`."""
    if target_layers == "all":
        return tuple(TARGETS)
    if isinstance(target_layers, str):
        target_layers = (target_layers,)
    names = list(target_layers)
    experts = [name for name in names if name in EXPERT_PARTS]
    if experts:
        raise ValueError(
            f"LoRA on the mixture of experts ({experts}) is not supported: its router and expert banks "
            f"stay frozen. Target the attention and dense feed-forward projections among {list(TARGETS)}."
        )
    unknown = [name for name in names if name not in TARGETS]
    if unknown or not names:
        raise ValueError(
            f"Unknown LoRA target(s) {unknown or names}: `target_layers` must be "
            f'"all" or a non-empty list among {list(TARGETS)}.'
        )
    return tuple(name for name in TARGETS if name in names)


def targeted_layers(backbone, targets):
    """(canonical name, EinsumDense) for every targeted projection."""
    for i, block in enumerate(backbone.blocks):
        for name in targets:
            parent, attribute = TARGETS[name]
            layer = getattr(getattr(block, parent), attribute)
            if layer is not None:  # None: a Gemma 4 global layer's values are its keys, or a shared layer's
                yield f"blocks.{i}.{parent}.{name}", layer


def kernel_shapes(config, layer_index):
    """Target name -> the float kernel shape of its projection in layer
    `layer_index` (whose head shapes and feed-forward width may be its own).
    A layer whose values are its keys has no "value"; one that shares
    another layer's keys and values has neither "key" nor "value"."""
    n, d = config.num_query_heads, config.hidden_dim
    k, h = config.layer_key_value_heads(layer_index), config.layer_head_dim(layer_index)
    f = config.layer_intermediate_dim(layer_index)
    shapes = {
        "query": (n, d, h), "key": (k, d, h), "value": (k, d, h),
        "output": (n, h, d), "gate": (d, f), "up": (d, f), "down": (f, d),
    }
    if config.layer_shares_kv(layer_index):
        del shapes["key"], shapes["value"]
    elif config.layer_keys_as_values(layer_index):
        del shapes["value"]
    return shapes


def lora_parameter_count(config, rank, target_layers=DEFAULT_TARGETS):
    """Trainable parameters `enable_lora(rank, target_layers=...)` adds.

    Per projection with kernel shape (a..., z): `prod(a...) * rank + rank * z`.
    """
    total = 0
    for i in range(config.num_layers):
        kernels = kernel_shapes(config, i)
        total += sum(
            int(np.prod(kernels[name][:-1])) * rank + rank * kernels[name][-1]
            for name in resolve_targets(target_layers)
            if name in kernels
        )
    return total


def enable_lora(backbone, rank, alpha=None, target_layers=DEFAULT_TARGETS):
    """See `GemmaBackbone.enable_lora`."""
    if backbone.lora is not None:
        raise ValueError(
            f"LoRA is already enabled on this backbone ({_describe(backbone.lora)}). "
            "Call `merge_lora_weights()` first, or start from a fresh model."
        )
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"LoRA `rank` must be a positive integer, got {rank!r}.")
    if alpha is None:
        alpha = rank
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"LoRA `alpha` must be a positive number, got {alpha!r}.")
    targets = resolve_targets(target_layers)
    selected = dict(targeted_layers(backbone, targets))
    for name, layer in selected.items():
        if layer.lora_enabled:
            raise ValueError(f"LoRA is already enabled on `{name}`.")

    # Freeze every leaf layer that is not a target; Keras' `enable_lora`
    # freezes the target's own kernel.
    selected_ids = {id(layer) for layer in selected.values()}
    frozen = []
    for layer in backbone._flatten_layers(include_self=False):
        is_leaf = not list(layer._flatten_layers(include_self=False))
        if is_leaf and id(layer) not in selected_ids and layer.trainable:
            layer.trainable = False
            frozen.append(layer)
    for layer in selected.values():
        layer.enable_lora(rank, lora_alpha=alpha)
    backbone.lora = LoraState(rank, alpha, targets, tuple(frozen))
    refresh(backbone)


def merge_lora_weights(backbone):
    """See `GemmaBackbone.merge_lora_weights`."""
    state = _require(backbone)
    with one_gc_collect():  # _disable_lora deletes two variables per layer
        for _, layer in targeted_layers(backbone, state.targets):
            _merge_layer(state, layer)
    for layer in state.frozen_layers:
        layer.trainable = True
    backbone.lora = None
    refresh(backbone)


def _merge_layer(state, layer):
    """Folds one layer's adapter into its kernel and removes the adapter."""
    if layer.quantization_mode is None:
        delta = (state.alpha / state.rank) * ops.matmul(layer.lora_kernel_a, layer.lora_kernel_b)
        merged = ops.cast(layer._kernel, "float32") + delta
        layer._kernel.assign(ops.cast(merged, layer._kernel.dtype))
    else:
        # Keras dequantizes, adds the delta and re-quantizes (what it
        # also does when saving a LoRA layer).
        kernel, scale, zero = layer._get_kernel_with_merged_lora()
        layer._kernel.assign(kernel)
        layer.kernel_scale.assign(scale)
        if zero is not None:
            layer.kernel_zero.assign(zero)
    _disable_lora(layer)


def _disable_lora(layer):
    """Removes a layer's adapter variables (Keras has no `disable_lora`)."""
    del layer.lora_kernel_a
    del layer.lora_kernel_b
    layer.lora_enabled = False
    layer.lora_rank = None
    layer.lora_alpha = None
    if layer.quantization_mode is None:
        layer._kernel.trainable = True


def config_fingerprint(config):
    """A hash of everything in a config that shapes the weights or the math."""
    fields = config.to_dict()
    fields.pop("dropout", None)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def save_lora_weights(backbone, path, format="keras"):
    """See `GemmaBackbone.save_lora_weights`."""
    state = _require(backbone)
    if format == "peft":
        peft_format.save(backbone, state, list(targeted_layers(backbone, state.targets)), path)
        return
    if format != "keras":
        raise ValueError(f'Unknown LoRA adapter format {format!r}: use "keras" (default) or "peft".')
    arrays = {}
    for name, layer in targeted_layers(backbone, state.targets):
        arrays[f"{name}.lora_a"] = keras.ops.convert_to_numpy(layer.lora_kernel_a)
        arrays[f"{name}.lora_b"] = keras.ops.convert_to_numpy(layer.lora_kernel_b)
    metadata = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "rank": state.rank,
        "alpha": state.alpha,
        "targets": list(state.targets),
        "config_fingerprint": config_fingerprint(backbone.config),
        "config": backbone.config.to_dict(),
        "base_quantization": backbone.quantization.mode if backbone.quantization else None,
    }
    # A file object, so that numpy does not append ".npz" to the name.
    with open(path, "wb") as f:
        np.savez(f, __metadata__=np.array(json.dumps(metadata)), **arrays)


def load_lora_weights(backbone, path):
    """See `GemmaBackbone.load_lora_weights`."""
    if os.path.isdir(path):
        return _load_peft(backbone, path)
    with np.load(path, allow_pickle=False) as data:
        if "__metadata__" not in data.files:
            raise ValueError(f"{path} is not a keras_gemma LoRA adapter file (no metadata).")
        metadata = json.loads(str(data["__metadata__"]))
        arrays = {key: data[key] for key in data.files if key != "__metadata__"}
    if metadata.get("format") != FORMAT or metadata.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} is not a keras_gemma LoRA adapter file of version {FORMAT_VERSION} "
            f"(format {metadata.get('format')!r}, version {metadata.get('version')!r})."
        )
    if metadata["config_fingerprint"] != config_fingerprint(backbone.config):
        theirs, ours = metadata["config"], backbone.config.to_dict()
        differences = {key: (theirs.get(key), ours[key]) for key in ours if theirs.get(key) != ours[key] and key != "dropout"}
        raise ValueError(
            f"The LoRA adapter in {path} was trained for a different model; "
            f"config fields that differ (adapter, this model): {differences}. Load it into the "
            "model it was trained on (the same preset), or train a new adapter for this one."
        )
    rank, alpha, targets = metadata["rank"], metadata["alpha"], tuple(metadata["targets"])
    if backbone.lora is None:
        enable_lora(backbone, rank, alpha=alpha, target_layers=targets)
    elif (backbone.lora.rank, backbone.lora.alpha, backbone.lora.targets) != (rank, alpha, targets):
        raise ValueError(
            f"The LoRA adapter in {path} has rank {rank}, alpha {alpha}, targets "
            f"{list(targets)}, but this model's LoRA is {_describe(backbone.lora)}. Load it "
            "into a model without LoRA enabled (loading enables LoRA as the adapter needs), or "
            "into one whose `enable_lora` used the adapter's rank, alpha and targets."
        )
    for name, layer in targeted_layers(backbone, targets):
        for suffix, variable in (("lora_a", layer.lora_kernel_a), ("lora_b", layer.lora_kernel_b)):
            value = arrays.get(f"{name}.{suffix}")
            if value is None or tuple(value.shape) != tuple(variable.shape):
                raise ValueError(
                    f"The LoRA adapter in {path} has no matching `{name}.{suffix}` "
                    f"of shape {tuple(variable.shape)} (found "
                    f"{None if value is None else tuple(value.shape)}). The file is incomplete or was "
                    "saved by another version: save the adapter again with `save_lora_weights`."
                )
            variable.assign(value)


def _load_peft(backbone, directory):
    """A PEFT adapter directory into the backbone (enabling LoRA as it needs)."""
    config = backbone.config
    targets, rank, factors = peft_format.read(directory, config.num_layers, lambda i: kernel_shapes(config, i))
    state = backbone.lora
    if state is not None and (state.rank, state.targets) != (rank, targets):
        raise ValueError(
            f"The PEFT adapter in {directory} needs LoRA rank {rank} on {list(targets)}, but this "
            f"model's LoRA is {_describe(state)}. Load it into a model without LoRA enabled "
            "(loading enables what the adapter needs)."
        )
    if state is None:
        enable_lora(backbone, rank, alpha=rank, target_layers=targets)  # scaling 1: PEFT's is in B
    scaling = backbone.lora.alpha / backbone.lora.rank
    for name, layer in targeted_layers(backbone, targets):
        a, b = factors[int(name.split(".")[1]), name.rsplit(".", 1)[1]]
        layer.lora_kernel_a.assign(a)
        layer.lora_kernel_b.assign(b / scaling)


def _require(backbone):
    if backbone.lora is None:
        raise ValueError("LoRA is not enabled on this backbone; call `enable_lora(rank)` first.")
    return backbone.lora


def _describe(state):
    return f"rank {state.rank}, alpha {state.alpha}, targets {list(state.targets)}"


