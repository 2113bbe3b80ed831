"""Sharding a Gemma model with `keras.distribution` (JAX).

`get_layout_map` shards every large weight along the model-parallel mesh
axis and, FSDP-style, along the data-parallel axis too; small weights (norms,
the projections' quantization scales, LoRA adapters) stay replicated; the
scales of int8/int4 expert banks are sharded like their banks. Attention is sharded by
head (Megatron-style: column-parallel q/k/v, row-parallel output) only when
the query and the key/value head counts (global layers' too) divide the
model axis; otherwise (MQA with one kv head, 4 heads on 8 devices, Gemma 4
26B's 2 global kv heads on 4 devices, or no config given) along the hidden
dimension, which every Gemma preset divides by 2, 4 and 8. A kv-head
axis of size 1 is never sharded.

Example (8 devices):
```python
mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), keras.distribution.list_devices())
layout_map = keras_gemma.GemmaBackbone.get_layout_map(mesh, config=config)
keras.distribution.set_distribution(
    keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch"))
backbone = keras_gemma.GemmaBackbone(config)  # variables are created sharded
```
"""

import keras

from keras_gemma.lora import TARGETS, kernel_shapes


def _axis(device_mesh, name):
    """`name` if the mesh has that axis, else None (replicated)."""
    return name if name in device_mesh.axis_names else None


def _axis_size(device_mesh, name):
    if name is None:
        return 1
    return device_mesh.shape[list(device_mesh.axis_names).index(name)]


def get_layout_map(device_mesh, model_parallel_dim_name="model", data_parallel_dim_name="batch", config=None):
    """A `keras.distribution.LayoutMap` for a Gemma backbone.

    Args:
        device_mesh: a `keras.distribution.DeviceMesh`.
        model_parallel_dim_name: the mesh axis weights are split along.
        data_parallel_dim_name: the mesh axis batches are split along; weights
            are also split along it (FSDP-style). A name missing from the mesh
            means "not sharded along it".
        config: optionally the model's `GemmaConfig`: enables head sharding
            where head counts allow, and checks every sharded dimension
            divides its mesh axis (a `ValueError` says which does not).

    Weight shapes (n query heads, k kv heads, h head_dim, d hidden, f
    feed-forward width, v vocabulary) and their layouts:
        token_embedding (v, d): (model, batch)
        attention query/key/value (n|k, d, h): (model, batch, None) by head,
            else (None, model, batch)
        attention output (n, h, d): (model, None, batch) by head, else
            (None, batch, model)
        feed_forward gate/up (d, f): (batch, model); down (f, d): (model, batch)
        moe gate_up (e, 2, d, g): (None, None, batch, model); down (e, g, d):
            (None, model, batch): each expert as the dense feed-forward,
            split along its width g, so the gathered (decode) dispatch
            takes whole experts on every device; the router and its scales
            (small) are replicated. Quantized banks (`quantization.BankQuantizer`)
            keep these layouts (an int4 bank is packed along its last
            axis, which must divide as well); their scales and zero points
            (e, 2, groups, g) and (e, groups, d) are sharded like the
            bank's output axis, their groups replicated.
    """
    model = _axis(device_mesh, model_parallel_dim_name)
    batch = _axis(device_mesh, data_parallel_dim_name)
    model_size = _axis_size(device_mesh, model)
    by_head = config is not None and all(
        heads % model_size == 0
        for heads in (config.num_query_heads, config.num_key_value_heads, config.num_global_key_value_heads)
    )
    layout_map = keras.distribution.LayoutMap(device_mesh)
    layout_map[r".*token_embedding/embeddings$"] = (model, batch)
    if by_head:
        layout_map[r".*attention/(query|key|value)/kernel$"] = (model, batch, None)
        layout_map[r".*attention/output/kernel$"] = (model, None, batch)
    else:
        layout_map[r".*attention/(query|key|value)/kernel$"] = (None, model, batch)
        layout_map[r".*attention/output/kernel$"] = (None, batch, model)
    layout_map[r".*feed_forward/(gate|up)/kernel$"] = (batch, model)
    layout_map[r".*feed_forward/down/kernel$"] = (model, batch)
    layout_map[r".*moe/gate_up$"] = (None, None, batch, model)
    layout_map[r".*moe/down$"] = (None, model, batch)
    layout_map[r".*moe/gate_up_(scale|zero)$"] = (None, None, None, model)
    layout_map[r".*moe/down_(scale|zero)$"] = (None, None, batch)
    if config is not None:
        problems = layout_problems(layout_map, config)
        if problems:
            raise ValueError(
                f"This mesh {dict(zip(device_mesh.axis_names, device_mesh.shape))} "
                "cannot shard this config: " + "; ".join(problems)
            )
    return layout_map


def weight_shapes(config):
    """Variable path suffix -> shape for the sharded weights of one block of
    each attention type (blocks of a type are alike; Gemma 4's global layers
    have head shapes of their own), without building the model."""
    shapes = {"token_embedding/embeddings": (config.vocabulary_size, config.hidden_dim)}
    for kind in sorted(set(config.layer_types)):
        i = config.layer_types.index(kind)
        block = f"decoder_block_{i}"
        for name, shape in kernel_shapes(config, i).items():
            shapes[f"{block}/{TARGETS[name][0]}/{name}/kernel"] = shape
        if config.num_experts is not None:
            e, d, g = config.num_experts, config.hidden_dim, config.moe_intermediate_dim
            shapes.update({f"{block}/moe/gate_up": (e, 2, d, g), f"{block}/moe/down": (e, g, d)})
    return shapes


def layout_problems(layout_map, config, shapes=None):
    """Where a layout does not fit `config`: wrong rank, or a sharded
    dimension its mesh axis does not divide. Empty when valid."""
    mesh = layout_map.device_mesh
    problems = []
    for path, shape in (shapes or weight_shapes(config)).items():
        layout = layout_map[path]
        if layout is None:
            continue
        axes = tuple(layout.axes)
        if len(axes) != len(shape):
            problems.append(f"{path} has shape {shape} but layout {axes}")
            continue
        for size, axis in zip(shape, axes):
            if axis is not None and size % _axis_size(mesh, axis):
                problems.append(f"{path} {shape}: {size} is not divisible by the {axis!r} axis ({_axis_size(mesh, axis)})")
    return problems
