"""Weight averaging and merging: `keras_gemma.merge`.

The methods follow mergekit's definitions (https://github.com/arcee-ai/mergekit),
tensor by tensor in float32:

- `linear`: `sum(w_i * x_i) / sum(w_i)` (model soups, arXiv:2203.05482);
- `slerp`: spherical interpolation between `base` and one model at `t`, the
  angle taken over each whole tensor (linear when nearly collinear);
- `task_arithmetic`: `base + lambda * sum(w_i * (x_i - base))` (arXiv:2212.04089);
- `ties`: each task vector `x_i - base` keeps its `density` largest
  magnitudes, a sign is elected per element by the weighted sum, and only the
  agreeing deltas are averaged (arXiv:2306.01708).

Inputs stream: one canonical tensor of every input is read, merged and handed
on (assigned to the new model, or written to the output file) before the next
is read, so merging two checkpoints never holds a whole second or third copy.
It reuses the checkpoint readers and writers of `checkpoints/preset.py`.
"""

import dataclasses
import os
import shutil

import numpy as np

from keras_gemma.checkpoints import huggingface, preset, safetensors_format
from keras_gemma.checkpoints.weights import LazyTensor, assign_weights

METHODS = ("linear", "slerp", "task_arithmetic", "ties")
SLERP_DOT_THRESHOLD = 0.9995  # mergekit's: beyond it the two tensors are treated as collinear
EPS = 1e-8


@dataclasses.dataclass
class _Input:
    """One model to merge: its config, canonical lazy tensors and where its tokenizer is."""

    name: str
    config: object
    tensors: dict
    causal_lm: object = None  # a `GemmaCausalLM` passed in (its preprocessor is reused)
    tokenizer_file: str = None  # a Hugging Face `tokenizer.model` to copy into `output`
    handle: str = None


def merge(models, method="linear", weights=None, base=None, t=0.5, density=1.0,
          lambda_=1.0, normalize=None, output=None, dtype="float32"):
    """Merges Gemma models of one architecture into one.

    Args:
        models: a list of `GemmaCausalLM`s, `GemmaBackbone`s or preset handles
            (anything `GemmaCausalLM.from_preset` takes except quantized presets).
        method: `"linear"`, `"slerp"`, `"task_arithmetic"` or `"ties"`.
        weights: one weight per model (default 1 each).
        base: the model the others are measured from (required by `slerp`,
            `task_arithmetic` and `ties`; ignored by `linear`).
        t: `slerp`'s interpolation factor (0 gives `base`, 1 the model).
        density: `ties`' fraction of each task vector kept (float or one per model).
        lambda_: scale of the merged task vector (`task_arithmetic`, `ties`).
        normalize: divide by the weights' sum (default: True for `linear` and
            `ties`, False for `task_arithmetic`, as in mergekit).
        output: a directory to write a Hugging Face checkpoint to (config.json,
            model.safetensors, and tokenizer.model when an input has one),
            streamed one tensor at a time; `None` returns a `GemmaCausalLM`.
        dtype: the merged weights' dtype (`"float32"`, `"bfloat16"`, `"float16"`).

    Returns:
        A `GemmaCausalLM`, or `output` when given.

    Example:
    ```python
    soup = keras_gemma.merge([lm_a, lm_b], method="linear", weights=[0.5, 0.5])
    keras_gemma.merge(["ft_a", "ft_b"], method="ties", base="gemma3_270m",
                      density=0.5, output="merged")
    ```
    """
    if method not in METHODS:
        raise ValueError(f"Unknown merge method {method!r}; choose one of {', '.join(METHODS)}.")
    if isinstance(models, (str, os.PathLike)) or not hasattr(models, "__len__"):
        raise TypeError("`models` must be a list of models or preset handles.")
    if not models:
        raise ValueError("`merge` needs at least one model.")
    weights = [1.0] * len(models) if weights is None else [float(w) for w in weights]
    if len(weights) != len(models):
        raise ValueError(f"Got {len(weights)} weights for {len(models)} models: give one weight per model.")
    densities = [float(density)] * len(models) if np.isscalar(density) else [float(d) for d in density]
    if len(densities) != len(models):
        raise ValueError(f"Got {len(densities)} densities for {len(models)} models: give one per model.")
    if method != "linear" and base is None:
        raise ValueError(f"Method {method!r} needs `base=`: the model the others were fine-tuned from.")
    if method == "slerp" and len(models) != 1:
        raise ValueError(f"slerp interpolates `base` and exactly one model; got {len(models)} models.")

    inputs = [_read_input(m, i) for i, m in enumerate(models)]
    base_input = _read_input(base, "base") if method != "linear" else None
    _check_same_architecture(inputs + ([base_input] if base_input else []))
    if normalize is None:
        normalize = method != "task_arithmetic"

    def merged(name):
        arrays = [_load(x.tensors[name]) for x in inputs]
        if method == "linear":
            return linear(arrays, weights, normalize)
        base_array = _load(base_input.tensors[name])
        if method == "slerp":
            return slerp(t, base_array, arrays[0])
        if method == "task_arithmetic":
            return task_arithmetic(base_array, arrays, weights, normalize, lambda_)
        return ties(base_array, arrays, weights, densities, normalize, lambda_)

    first = inputs[0]
    config = first.config
    lazy = {name: LazyTensor(tensor.shape, lambda n=name: merged(n)) for name, tensor in first.tensors.items()}
    if output is not None:
        return _write_hf(config, lazy, output, dtype, [x for x in [base_input, *inputs] if x])
    from keras_gemma.causal_lm import GemmaCausalLM

    backbone = GemmaCausalLM.backbone_cls(config, dtype=dtype)
    assign_weights(backbone, lazy, source="merged model")
    return GemmaCausalLM(backbone, preprocessor=_preprocessor([x for x in [*inputs, base_input] if x]))


# -- the methods (mergekit's math, float32 numpy) ------------------------------

def linear(arrays, weights, normalize=True):
    """`sum(w_i * x_i)`, divided by `sum(w_i)` when `normalize`."""
    result = np.zeros_like(arrays[0])
    for array, weight in zip(arrays, weights):
        result += np.float32(weight) * array
    return result / np.float32(sum(weights)) if normalize else result


def slerp(t, v0, v1):
    """Spherical interpolation from `v0` (t=0) to `v1` (t=1) over the whole tensor."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    norm_a, norm_b = np.linalg.norm(a), np.linalg.norm(b)
    norm_a = norm_a if norm_a > EPS else np.float32(1)
    norm_b = norm_b if norm_b > EPS else np.float32(1)
    dot = float(np.clip(np.dot(a / norm_a, b / norm_b), -1, 1))
    if abs(dot) > SLERP_DOT_THRESHOLD:
        coef_a, coef_b = 1 - t, t
    else:
        theta = np.arccos(dot)
        coef_a, coef_b = np.sin((1 - t) * theta) / np.sin(theta), np.sin(t * theta) / np.sin(theta)
    return (np.float32(coef_a) * v0 + np.float32(coef_b) * v1).astype(np.float32)


def task_arithmetic(base, arrays, weights, normalize=False, lambda_=1.0):
    """`base + lambda * sum(w_i * (x_i - base))` (over `sum(w_i)` when `normalize`)."""
    mixed = linear([x - base for x in arrays], weights, normalize=False)
    total = sum(weights)
    if normalize:
        mixed /= np.float32(total if abs(total) >= EPS else 1)
    return base + np.float32(lambda_) * mixed


def ties(base, arrays, weights, densities, normalize=True, lambda_=1.0):
    """TIES: trim each task vector to its largest magnitudes, elect a sign, average the agreeing."""
    w = np.asarray(weights, np.float32).reshape((-1,) + (1,) * base.ndim)
    deltas = np.stack([_keep_largest(x - base, d) for x, d in zip(arrays, densities)]) * w
    majority = np.where(deltas.sum(axis=0) >= 0, 1, -1)
    agree = np.sign(deltas) == majority  # a trimmed (zero) delta never agrees
    mixed = np.where(agree, deltas, 0).sum(axis=0)
    if normalize:
        divisor = (w * agree).sum(axis=0)
        mixed /= np.where(divisor == 0, 1, divisor)
    return base + np.float32(lambda_) * mixed


def _keep_largest(delta, density):
    """`delta` with all but its `density` fraction of largest magnitudes zeroed (at least one kept)."""
    if density >= 1:
        return delta
    if density <= 0:
        return np.zeros_like(delta)
    k = max(1, int(density * delta.size))
    flat = delta.reshape(-1)
    keep = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:]
    out = np.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(delta.shape)


# -- inputs and outputs -----------------------------------------------------------

def _load(tensor):
    return np.asarray(tensor.load(), dtype=np.float32)


def _read_input(model, index):
    name = f"model {index}" if index != "base" else "base"
    if isinstance(model, (str, os.PathLike)):
        source = preset.resolve(model)
        if source.kind == preset.QUANTIZED:
            raise ValueError(f"{name} ({model!r}) is a quantized preset: merge the float models it was made from.")
        config = preset.load_config(source)
        tokenizer = source.file(preset.HF_TOKENIZER_FILE) if source.kind == preset.HUGGING_FACE else None
        return _Input(f"{name} ({model!r})", config, preset._arrays(source, config),
                      tokenizer_file=tokenizer if tokenizer and os.path.exists(tokenizer) else None, handle=model)
    backbone = getattr(model, "backbone", model)
    if not hasattr(backbone, "weight_map"):
        raise TypeError(f"{name} must be a GemmaCausalLM, a GemmaBackbone or a preset handle, got {type(model).__name__}.")
    preset._refuse_lora(backbone, "merge")
    if backbone.quantization is not None:
        raise ValueError(f"{name} is quantized ({backbone.quantization.mode}): merge float models.")
    import keras

    tensors = {
        key: LazyTensor(tuple(v.shape), lambda v=v: keras.ops.convert_to_numpy(v))
        for key, v in backbone.weight_map().items()
    }
    return _Input(name, backbone.config, tensors, causal_lm=model if model is not backbone else None)


def _check_same_architecture(inputs):
    first = inputs[0]
    for other in inputs[1:]:
        if other.config == first.config:
            continue
        differences = [
            f"{f.name} ({getattr(first.config, f.name)!r} vs {getattr(other.config, f.name)!r})"
            for f in dataclasses.fields(first.config)
            if getattr(first.config, f.name) != getattr(other.config, f.name)
        ]
        raise ValueError(
            f"Cannot merge models of different architectures: {other.name} differs from "
            f"{first.name} in {', '.join(differences)}. Merge only fine-tunes of one model."
        )


def _preprocessor(inputs):
    for x in inputs:
        if x.causal_lm is not None and x.causal_lm.preprocessor is not None:
            return x.causal_lm.preprocessor
    for x in inputs:
        if x.handle is not None:
            source = preset.resolve(x.handle)
            if preset._has_tokenizer(source):
                from keras_gemma.causal_lm import GemmaCausalLM

                return preset.load_preprocessor(x.handle, GemmaCausalLM.preprocessor_cls)
    return None


def _write_hf(config, lazy, output, dtype, inputs):
    """Streams the merged tensors into a Hugging Face checkpoint at `output`."""
    import ml_dtypes

    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}.get(str(dtype))
    if np_dtype is None:
        raise ValueError(f"dtype must be 'float32', 'bfloat16' or 'float16' to write a checkpoint, got {dtype!r}.")
    hf_config = huggingface.config_to_hf(config)
    hf_config["dtype"] = str(dtype)
    tensors = {}
    for hf_name, name, kind in huggingface.tensor_names(config):
        shape = huggingface.from_canonical(np.empty(lazy[name].shape, np.int8), kind, config).shape
        tensors[hf_name] = (shape, np_dtype, lambda n=name, k=kind: huggingface.from_canonical(lazy[n].load(), k, config))
    with preset._atomic_directory(output) as tmp:
        preset._write_json(os.path.join(tmp, "config.json"), hf_config)
        safetensors_format.write_tensors(os.path.join(tmp, "model.safetensors"), tensors, {"format": "pt"})
        tokenizer = next((x.tokenizer_file for x in inputs if x.tokenizer_file), None)
        if tokenizer:
            shutil.copyfile(tokenizer, os.path.join(tmp, preset.HF_TOKENIZER_FILE))
    return output

