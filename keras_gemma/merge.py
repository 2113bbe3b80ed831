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
ROW_BLOCK_ELEMENTS = 1 << 22  # large tensors (the embedding) are written in blocks of 16 MB of float32


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

    everyone = [x for x in [base_input, *inputs] if x]

    def merged(name, span=None):
        """The merged tensor `name`, or only its rows `span` (slerp: `span` and the whole tensor's angle)."""
        def read(x):
            return _load(x.tensors[name]) if span is None else _load_rows(x.tensors[name], span)

        arrays = [read(x) for x in inputs]
        if method == "linear":
            return linear(arrays, weights, normalize)
        base_array = read(base_input)
        if method == "slerp":
            if span is None:
                coef_a, coef_b = slerp_coefficients(t, [(base_array, arrays[0])])
            else:  # the angle needs the whole tensor: one pass over its blocks first, once
                if name not in slerp_angles:
                    slerp_angles[name] = slerp_coefficients(t, (
                        (_load_rows(base_input.tensors[name], s), _load_rows(inputs[0].tensors[name], s))
                        for s in block_spans[name]
                    ))
                coef_a, coef_b = slerp_angles[name]
            return np.float32(coef_a) * base_array + np.float32(coef_b) * arrays[0]
        if method == "task_arithmetic":
            return task_arithmetic(base_array, arrays, weights, normalize, lambda_)
        if span is not None and name not in ties_trims:  # the thresholds need the whole tensor: once
            base_tensor = base_input.tensors[name]
            ties_trims[name] = [
                Trim((_load_rows(x.tensors[name], s) - _load_rows(base_tensor, s) for s in block_spans[name]),
                     density, int(np.prod(base_tensor.shape)))
                for x, density in zip(inputs, densities)
            ]
        return ties(base_array, arrays, weights, densities, normalize, lambda_, ties_trims.get(name) if span else None)

    def merged_blocks(name):
        """The merged tensor as blocks of rows, when every input reads rows and the method allows it."""
        tensors = [x.tensors[name] for x in everyone]
        shape = tensors[0].shape
        if len(shape) < 2 or np.prod(shape) <= ROW_BLOCK_ELEMENTS or not all(x.load_rows for x in tensors):
            return None
        step = max(1, ROW_BLOCK_ELEMENTS // int(np.prod(shape[1:])))
        block_spans[name] = [(a, min(a + step, shape[0])) for a in range(0, shape[0], step)]
        return lambda: (merged(name, span) for span in block_spans[name])

    block_spans, slerp_angles, ties_trims = {}, {}, {}
    first = inputs[0]
    config = first.config
    lazy = {name: LazyTensor(tensor.shape, lambda n=name: merged(n)) for name, tensor in first.tensors.items()}
    if output is not None:
        return _write_hf(config, lazy, {name: merged_blocks(name) for name in lazy}, output, dtype, everyone)
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


def slerp_coefficients(t, pairs):
    """slerp's two coefficients from the tensors' blocks `pairs` ((v0 block, v1 block), ...), in one pass."""
    sq_a = sq_b = dot = 0.0
    for a, b in pairs:  # dot of the normalized tensors = raw dot / (|a| |b|), in float64
        a, b = a.astype(np.float64), b.astype(np.float64)
        sq_a, sq_b, dot = sq_a + np.sum(a * a), sq_b + np.sum(b * b), dot + np.sum(a * b)
    norm_a, norm_b = np.sqrt(sq_a), np.sqrt(sq_b)
    norm_a = norm_a if norm_a > EPS else 1.0
    norm_b = norm_b if norm_b > EPS else 1.0
    dot = float(np.clip(dot / (norm_a * norm_b), -1, 1))
    if abs(dot) > SLERP_DOT_THRESHOLD:
        return 1 - t, t
    theta = np.arccos(dot)
    return np.sin((1 - t) * theta) / np.sin(theta), np.sin(t * theta) / np.sin(theta)


def task_arithmetic(base, arrays, weights, normalize=False, lambda_=1.0):
    """`base + lambda * sum(w_i * (x_i - base))` (over `sum(w_i)` when `normalize`)."""
    mixed = linear([x - base for x in arrays], weights, normalize=False)
    total = sum(weights)
    if normalize:
        mixed /= np.float32(total if abs(total) >= EPS else 1)
    return base + np.float32(lambda_) * mixed


def ties(base, arrays, weights, densities, normalize=True, lambda_=1.0, trims=None):
    """TIES: trim each task vector to its largest magnitudes, elect a sign, average the agreeing.

    `trims` (one `Trim` per model, for merging a tensor in blocks of rows) hold
    the whole tensor's magnitude thresholds; by default they come from `arrays`.
    """
    if trims is None:
        trims = [Trim([x - base], d, base.size) for x, d in zip(arrays, densities)]
    w = np.asarray(weights, np.float32).reshape((-1,) + (1,) * base.ndim)
    deltas = np.stack([trim(x - base) for x, trim in zip(arrays, trims)]) * w
    majority = np.where(deltas.sum(axis=0) >= 0, 1, -1)
    agree = np.sign(deltas) == majority  # a trimmed (zero) delta never agrees
    mixed = np.where(agree, deltas, 0).sum(axis=0)
    if normalize:
        divisor = (w * agree).sum(axis=0)
        mixed /= np.where(divisor == 0, 1, divisor)
    return base + np.float32(lambda_) * mixed


class Trim:
    """Keeps a task vector's k = max(1, int(density * size)) largest magnitudes
    (mergekit's `magnitude` sparsification), applied to its blocks of rows in order.

    The threshold is the k-th largest magnitude of the whole tensor (one float32
    copy of its magnitudes, partitioned in place); of the magnitudes equal to
    it, the first ones in row-major order are kept until k are.
    """

    def __init__(self, delta_blocks, density, size):
        self.threshold, self.equal_left = -np.inf, size  # density >= 1: keep everything
        if density >= 1:
            return
        if density <= 0:
            self.threshold, self.equal_left = np.inf, 0
            return
        k = max(1, int(density * size))
        magnitudes, filled = np.empty(size, np.float32), 0
        for block in delta_blocks:
            magnitudes[filled:filled + block.size] = np.abs(block).reshape(-1)
            filled += block.size
        magnitudes.partition(size - k)
        self.threshold = magnitudes[size - k]
        self.equal_left = k - int(np.count_nonzero(magnitudes[size - k:] > self.threshold))

    def __call__(self, delta):
        magnitude = np.abs(delta)
        equal = (magnitude == self.threshold).reshape(-1)
        keep_equal = equal & (np.cumsum(equal) <= self.equal_left)
        self.equal_left -= int(np.count_nonzero(keep_equal))
        keep = (magnitude > self.threshold) | keep_equal.reshape(delta.shape)
        return np.where(keep, delta, 0).astype(np.float32)


# -- inputs and outputs -----------------------------------------------------------

def _load(tensor):
    return np.asarray(tensor.load(), dtype=np.float32)


def _load_rows(tensor, span):
    return np.asarray(tensor.load_rows(*span), dtype=np.float32)


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
        key: LazyTensor(tuple(v.shape), lambda v=v: keras.ops.convert_to_numpy(v),
                        lambda a, b, v=v: keras.ops.convert_to_numpy(v[a:b]))
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


def _write_hf(config, lazy, blocks, output, dtype, inputs):
    """Streams the merged tensors into a Hugging Face checkpoint at `output`
    (in blocks of rows where `blocks[name]` gives them and the layout is the same)."""
    import ml_dtypes

    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}.get(str(dtype))
    if np_dtype is None:
        raise ValueError(f"dtype must be 'float32', 'bfloat16' or 'float16' to write a checkpoint, got {dtype!r}.")
    hf_config = huggingface.config_to_hf(config)
    hf_config["dtype"] = str(dtype)
    tensors = {}
    for hf_name, name, kind in huggingface.tensor_names(config):
        shape = huggingface.from_canonical(np.empty(lazy[name].shape, np.int8), kind, config).shape
        if kind == "copy" and blocks[name] is not None:
            tensors[hf_name] = (shape, np_dtype, blocks[name])
        else:
            tensors[hf_name] = (shape, np_dtype, lambda n=name, k=kind: huggingface.from_canonical(lazy[n].load(), k, config))
    with preset._atomic_directory(output) as tmp:
        preset._write_json(os.path.join(tmp, "config.json"), hf_config)
        safetensors_format.write_tensors(os.path.join(tmp, "model.safetensors"), tensors, {"format": "pt"})
        tokenizer = next((x.tokenizer_file for x in inputs if x.tokenizer_file), None)
        if tokenizer:
            shutil.copyfile(tokenizer, os.path.join(tmp, preset.HF_TOKENIZER_FILE))
    return output

