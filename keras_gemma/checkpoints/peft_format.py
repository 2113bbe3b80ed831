"""LoRA adapters as PEFT writes them: `adapter_config.json` and
`adapter_model.safetensors`, for the model `export_to_transformers` writes.

PEFT's LoRA on a Linear `W (out, in)` adds `scaling * B @ A`, A `(R, in)`,
B `(out, R)`, `scaling = lora_alpha / R`. Keras' LoRA on our projections is
the same for `output` and the feed-forward, but on `query`/`key`/`value`
(kernel `(heads, d, h)`) its A is per head `(heads, d, r)` and its B shared
`(r, h)`: a rank-`heads * r` update in PEFT's form (A the heads' A stacked,
B block-diagonal), written with PEFT's `rank_pattern` / `alpha_pattern`.
Reading a PEFT adapter does the reverse: a rank-R `q_proj` update is a
rank-`heads * R` Keras update (A zero outside its head's block), and every
target gets the largest rank needed (padded with zeros): exact, not minimal.
"""

import json
import os
import re

import keras
import numpy as np

from keras_gemma.checkpoints import safetensors_format
from keras_gemma.checkpoints.preset import _atomic_directory, _write_json

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model.model.layers"

# Our target name -> (PEFT module name, its path inside a decoder layer, kind).
MODULES = {
    "query": ("q_proj", "self_attn.q_proj", "qkv"),
    "key": ("k_proj", "self_attn.k_proj", "qkv"),
    "value": ("v_proj", "self_attn.v_proj", "qkv"),
    "output": ("o_proj", "self_attn.o_proj", "out"),
    "gate": ("gate_proj", "mlp.gate_proj", "dense"),
    "up": ("up_proj", "mlp.up_proj", "dense"),
    "down": ("down_proj", "mlp.down_proj", "dense"),
}
MODULES_BY_NAME = {module: path for module, path, _ in MODULES.values()}


def _pattern_value(pattern, full_name, default):
    """PEFT's `rank_pattern` / `alpha_pattern` lookup (`peft.utils.other.get_pattern_key`):
    the first key that matches the end of the module's dotted name."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", full_name):
            return value
    return default


def to_peft(kind, a, b):
    """Keras factors (A kernel.shape[:-1] + (r,), B (r, z)) -> PEFT's (A (R, in), B (out, R))."""
    if kind == "qkv":  # a (heads, d, r), b (r, h)
        heads, _, r = a.shape
        h = b.shape[1]
        peft_a = np.concatenate([a[m].T for m in range(heads)], axis=0)  # (heads * r, d)
        peft_b = np.zeros((heads * h, heads * r), a.dtype)
        for m in range(heads):
            peft_b[m * h : (m + 1) * h, m * r : (m + 1) * r] = b.T
        return peft_a, peft_b
    if kind == "out":  # a (n, h, r): the input is heads-major (n * h), as in `from_canonical`
        return a.reshape(-1, a.shape[-1]).T, b.T
    return a.T, b.T  # a (in, r), b (r, out)


def from_peft(kind, peft_a, peft_b, kernel_shape, rank):
    """PEFT's factors (scaling folded into B) -> Keras factors of `rank`, zero-padded."""
    r = peft_a.shape[0]
    if kind == "qkv":
        heads, d, h = kernel_shape
        a = np.zeros((heads, d, rank), np.float32)
        b = np.zeros((rank, h), np.float32)
        for m in range(heads):
            a[m, :, m * r : (m + 1) * r] = peft_a.T
            b[m * r : (m + 1) * r] = peft_b[m * h : (m + 1) * h].T
        return a, b
    a = np.zeros(tuple(kernel_shape[:-1]) + (rank,), np.float32)
    b = np.zeros((rank, kernel_shape[-1]), np.float32)
    a[..., :r] = peft_a.T.reshape(tuple(kernel_shape[:-1]) + (r,))
    b[:r] = peft_b.T
    return a, b


def keras_rank(kind, peft_rank, kernel_shape):
    return peft_rank * kernel_shape[0] if kind == "qkv" else peft_rank


def save(backbone, state, layers, directory):
    """Writes `layers` ((name, EinsumDense) of `lora.targeted_layers`) as a PEFT adapter."""
    tensors, heads_of = {}, {}  # heads_of: PEFT module -> {layer index: heads}
    for name, layer in layers:
        index, target = int(name.split(".")[1]), name.rsplit(".", 1)[1]
        module, path, kind = MODULES[target]
        a = keras.ops.convert_to_numpy(layer.lora_kernel_a).astype(np.float32)
        b = keras.ops.convert_to_numpy(layer.lora_kernel_b).astype(np.float32)
        peft_a, peft_b = to_peft(kind, a, b)
        if kind == "qkv":
            heads_of.setdefault(module, {})[index] = a.shape[0]
        for suffix, array in (("lora_A", peft_a), ("lora_B", peft_b)):
            tensors[f"{PREFIX}.{index}.{path}.{suffix}.weight"] = (array.shape, np.float32, lambda x=array: x)
    # A query/key/value update has rank `rank * heads` in PEFT's form (the same
    # alpha / rank): one pattern entry per module, or per layer where layers
    # differ in heads (Gemma 4's global layers).
    rank_pattern, alpha_pattern = {}, {}
    for module, heads in heads_of.items():
        uniform = len(set(heads.values())) == 1
        for index, count in heads.items():
            key = module if uniform else f"layers.{index}.{MODULES_BY_NAME[module]}"
            rank_pattern[key], alpha_pattern[key] = state.rank * count, state.alpha * count
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": state.rank,
        "lora_alpha": state.alpha,
        "target_modules": sorted(MODULES[t][0] for t in state.targets),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    with _atomic_directory(directory) as tmp:
        _write_json(os.path.join(tmp, CONFIG_FILE), adapter_config)
        safetensors_format.write_tensors(os.path.join(tmp, WEIGHTS_FILE), tensors, {"format": "pt"})


def read(directory, num_layers, kernel_shapes):
    """`(targets, rank, {(layer index, target): (A, B)})` in Keras' form, with
    PEFT's scaling folded into B (Keras scaling 1), from a PEFT adapter.

    `kernel_shapes(layer_index)`: our kernel shape per target in that layer
    (`lora.kernel_shapes`); a target missing there (the values of a Gemma 4
    global layer, which are its keys) is a projection neither model has in
    that layer, and is skipped.
    Everything is checked and converted before the caller touches the model.
    """
    config_path, weights_path = (os.path.join(directory, f) for f in (CONFIG_FILE, WEIGHTS_FILE))
    if not (os.path.exists(config_path) and os.path.exists(weights_path)):
        raise ValueError(f"{directory} is not a PEFT adapter: it needs {CONFIG_FILE} and {WEIGHTS_FILE}.")
    with open(config_path) as f:
        adapter = json.load(f)
    if adapter.get("peft_type") != "LORA" or adapter.get("use_dora") or adapter.get("bias", "none") != "none":
        raise ValueError(f"{directory} is not a plain PEFT LoRA adapter (DoRA, biases and other PEFT types are not supported).")
    by_module = {module: target for target, (module, _, _) in MODULES.items()}
    modules = adapter["target_modules"]
    modules = [modules] if isinstance(modules, str) else modules
    unknown = [m for m in modules if m not in by_module]
    if unknown:
        raise ValueError(f"The PEFT adapter in {directory} targets {unknown}, which Gemma's LoRA cannot hold (known: {sorted(by_module)}).")
    targets = tuple(t for t in MODULES if MODULES[t][0] in modules)
    tensors = safetensors_format.read_tensors(weights_path)
    factors, peft_ranks, used = {}, {}, set()
    for index, target in ((i, t) for i in range(num_layers) for t in targets):
        module, path, kind = MODULES[target]
        name = (index, target)
        kernel_shape = kernel_shapes(index).get(target)
        if kernel_shape is None:
            continue
        pair = []
        for suffix in ("lora_A", "lora_B"):
            key = f"{PREFIX}.{index}.{path}.{suffix}.weight"
            if key not in tensors:
                raise ValueError(f"The PEFT adapter in {directory} has no `{key}`: it was made for another architecture.")
            pair.append(tensors[key].load().astype(np.float32))
            used.add(key)
        peft_a, peft_b = pair
        r = peft_a.shape[0]
        expected_a = (r, int(np.prod(kernel_shape[:-1])) // (kernel_shape[0] if kind == "qkv" else 1))
        expected_b = (int(np.prod(kernel_shape[::2])) if kind == "qkv" else kernel_shape[-1], r)
        if peft_a.shape != expected_a or peft_b.shape != expected_b:
            raise ValueError(
                f"The PEFT adapter in {directory} does not fit this model: `{module}` of layer {index} has "
                f"lora_A {peft_a.shape} and lora_B {peft_b.shape}, this model needs {expected_a} and "
                f"{expected_b}. Load it into the model it was made for."
            )
        full_name = f"{PREFIX}.{index}.{path}"
        r_config = _pattern_value(adapter.get("rank_pattern"), full_name, adapter["r"])
        alpha = _pattern_value(adapter.get("alpha_pattern"), full_name, adapter["lora_alpha"])
        if r_config != r:
            raise ValueError(f"The PEFT adapter in {directory}: `{module}` of layer {index} has rank {r}, its config says {r_config}.")
        scaling = alpha / (np.sqrt(r) if adapter.get("use_rslora") else r)
        factors[name] = (kind, peft_a, peft_b * scaling, kernel_shape)
        peft_ranks[name] = keras_rank(kind, r, kernel_shape)
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(
            f"The PEFT adapter in {directory} has tensors this model has no place for (e.g. `{extra[0]}`, "
            f"{len(extra)} in all): it was made for another architecture (this one has {num_layers} layers)."
        )
    rank = max(peft_ranks.values())
    return targets, rank, {
        name: from_peft(kind, a, b, shape, rank) for name, (kind, a, b, shape) in factors.items()
    }
