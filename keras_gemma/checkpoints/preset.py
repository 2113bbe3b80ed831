"""`from_preset`, `save_to_preset` and `export_to_transformers`.

A handle is one of:

- a built-in preset name (`keras_gemma.list_presets()`), fetched from Kaggle;
- `kaggle://<owner>/<model>/keras/<variation>[/<version>]`;
- `hf://<org>/<name>` (Hugging Face Hub; needs `huggingface_hub`);
- a local directory in keras-hub / keras-nlp preset layout (what
  `save_to_preset` writes for a float model, Gemma 4 included: keras-hub
  loads it too), in
  Hugging Face layout (`config.json` with `model_type`, safetensors,
  `tokenizer.model`), or a keras_gemma native preset (what `save_to_preset`
  writes for an int8/int4 model, or a Gemma 4 config keras-hub's
  `Gemma4Backbone` cannot express; see `quantized_format.py`);
- a `.gguf` file (llama.cpp; needs `gguf`), or a directory holding one.

The model classes come from the caller (`GemmaCausalLM.from_preset` passes
itself; its `backbone_cls` and `preprocessor_cls` name the rest, as in
keras-hub), so this module imports none of them.

Weights stream into the model one tensor at a time (`LazyTensor`), so peak
memory is about one copy of the model; a progress bar appears for large
checkpoints.
"""

import contextlib
import json
import math
import os
import shutil
import tempfile

import numpy as np

from keras_gemma import chat_template
from keras_gemma.checkpoints import download, gguf_format, keras_hub_format as kh
from keras_gemma.checkpoints import huggingface, quantized_format, safetensors_format
from keras_gemma.checkpoints.weights import CheckpointError, LazyTensor, assign_weights
from keras_gemma.presets import PRESETS, get_preset

KERAS_HUB = "keras_hub"
QUANTIZED = "keras_gemma_quantized"  # keras-hub's layout, our config and Keras' save_weights
HUGGING_FACE = "huggingface"
GGUF = "gguf"
PROGRESS_THRESHOLD_BYTES = 256 * 1024 * 1024
HF_TOKENIZER_FILE = "tokenizer.model"
HF_CHAT_TEMPLATE_FILE = "chat_template.jinja"
HF_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


class Source:
    """A resolved preset: its format and local path (directory or .gguf file)."""

    def __init__(self, kind, path, handle):
        self.kind, self.path, self.handle = kind, path, handle

    def __repr__(self):
        return f"Source({self.kind!r}, {self.path!r})"

    def file(self, name):
        return os.path.join(self.path, name)

    def gguf(self):
        """The parsed GGUF file (parsed once)."""
        if getattr(self, "_gguf", None) is None:
            self._gguf = gguf_format.open_reader(self.path)
        return self._gguf


# -- resolving ----------------------------------------------------------------

def preset_handle(name):
    """The Kaggle handle of a built-in preset (unknown names list the valid ones)."""
    return get_preset(name).kaggle_handle


def _download_builtin(builtin):
    """A built-in preset's Kaggle directory; a failed download also names its
    Hugging Face copy, which `from_preset` loads too."""
    try:
        return download.kaggle_download(builtin.kaggle_handle)
    except download.DownloadError as e:
        if builtin.hf_handle is None:
            raise
        raise type(e)(f"{e} The same model is on Hugging Face: from_preset({builtin.hf_handle!r}).") from None


def _looks_like_path(handle):
    return os.sep in handle or "/" in handle or handle.startswith((".", "~")) or handle.endswith(".gguf")


def resolve(handle):
    """A `Source` for `handle`, downloading it first if needed."""
    if isinstance(handle, os.PathLike):
        handle = os.fspath(handle)
    if not isinstance(handle, str):
        raise TypeError(f"A preset handle must be a string or path, got {type(handle).__name__}.")
    if handle in PRESETS:
        return _local_source(_download_builtin(PRESETS[handle]), handle)
    if handle.startswith(download.KAGGLE_SCHEME):
        return _local_source(download.kaggle_download(handle), handle)
    if handle.startswith(download.HF_SCHEME):
        return _local_source(download.hf_download(handle), handle)
    path = os.path.expanduser(handle)
    if os.path.exists(path):
        return _local_source(path, handle)
    if _looks_like_path(handle):
        raise FileNotFoundError(
            f"No preset at {handle!r}: no such file or directory. A handle is a preset name, "
            "kaggle://<owner>/<model>/keras/<variation>[/<version>], hf://<org>/<name>, a preset "
            "directory or a .gguf file."
        )
    get_preset(handle)  # raises, listing the valid names
    raise AssertionError("unreachable")


def _local_source(path, handle):
    if os.path.isfile(path):
        if gguf_format.is_gguf(path) or path.endswith(".gguf"):
            return Source(GGUF, path, handle)
        raise CheckpointError(f"{path} is a file but not a GGUF file; pass a preset directory instead.")
    config_path = os.path.join(path, kh.CONFIG_FILE)
    if not os.path.exists(config_path) and os.path.exists(os.path.join(path, kh.TOKENIZER_FILE)):
        return Source(KERAS_HUB, path, handle)  # a tokenizer (or preprocessor) on its own
    if not os.path.exists(config_path):
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return Source(GGUF, os.path.join(path, ggufs[0]), handle)
        hint = f" It holds several .gguf files ({', '.join(ggufs)}): pass one." if ggufs else ""
        raise CheckpointError(f"{path} is not a preset: it has no {kh.CONFIG_FILE}.{hint}")
    config_json = _read_json(config_path)
    if quantized_format.is_quantized_config(config_json):
        return Source(QUANTIZED, path, handle)
    if kh.is_keras_hub_config(config_json):
        return Source(KERAS_HUB, path, handle)
    if "model_type" in config_json:
        return Source(HUGGING_FACE, path, handle)
    raise CheckpointError(
        f"{config_path} is neither a keras-hub preset config (class_name, registered_name) "
        "nor a Hugging Face config (model_type)."
    )


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON (truncated or corrupt?): {e}") from None


# -- loading ------------------------------------------------------------------

def load_config(source):
    """The `GemmaConfig` of a resolved source."""
    if source.kind == KERAS_HUB:
        path = source.file(kh.CONFIG_FILE)
        if not os.path.exists(path):
            raise CheckpointError(f"{source.path} holds a tokenizer but no model: {path} is missing.")
        try:
            config = kh.config_from_keras_hub(_read_json(path), path)
        except CheckpointError as e:
            builtin = PRESETS.get(source.handle)
            if builtin is None or builtin.hf_handle is None:
                raise
            # A Kaggle copy we cannot read (a mechanism not supported here, a
            # config from a newer keras-hub): the Hugging Face copy may load.
            raise CheckpointError(f"{e} The same model is on Hugging Face: from_preset({builtin.hf_handle!r}).") from None
        return kh.exact_config(source.path, config)
    if source.kind == HUGGING_FACE:
        return huggingface.config_from_hf(_read_json(source.file(kh.CONFIG_FILE)))
    if source.kind == QUANTIZED:
        return quantized_format.read_config(_read_json(source.file(kh.CONFIG_FILE)), source.file(kh.CONFIG_FILE))
    return gguf_format.config_from_gguf(source.gguf(), source.path)


def _arrays(source, config):
    """Canonical name -> `LazyTensor` for every tensor of the source."""
    if source.kind == KERAS_HUB:
        class_name = _read_json(source.file(kh.CONFIG_FILE))["class_name"]
        return kh.read_weights(source.path, config, class_name)
    if source.kind == HUGGING_FACE:
        return huggingface.canonical_weights(config, safetensors_format.read_checkpoint(source.path))
    return gguf_format.read_weights(source.gguf(), config, source.path)


def _with_progress(arrays, label):
    """Wraps each `LazyTensor` so loading it advances a progress bar (large
    checkpoints only), counted in bytes: tensors differ in size by 1000x (the
    embedding table is most of a Gemma 3 270M), so a count of tensors
    predicts the time left badly."""
    sizes = {k: 4 * math.prod(v.shape) for k, v in arrays.items() if isinstance(v, LazyTensor) and v.load is not None}
    total = sum(sizes.values())
    if total < PROGRESS_THRESHOLD_BYTES:
        return arrays
    bar = _progress_bar(total, label)
    done = [0]

    def wrap(tensor, size):
        def load():
            value = tensor.load()
            done[0] += size
            bar.update(done[0])
            return value

        return LazyTensor(tensor.shape, load)

    return {k: wrap(v, sizes[k]) if k in sizes else v for k, v in arrays.items()}


def _progress_bar(total_bytes, label):
    """A bar over `total_bytes` (float32 bytes) with Progbar's `update(current)`.

    The time left is the average rate so far (tqdm's `smoothing=0`), and
    reads `?` until the first tensor is in, instead of extrapolating from the
    first instant.
    """
    try:
        from tqdm.auto import tqdm
    except ImportError:
        import keras

        print(f"{label} ({total_bytes / 2**20:,.0f} MiB in float32)")
        return keras.utils.Progbar(total_bytes, unit_name="byte")
    bar = tqdm(
        total=total_bytes, desc=label, unit="B", unit_scale=True, unit_divisor=1024, smoothing=0,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}, {remaining} left]",
    )

    class Bar:  # Progbar's interface: update(current)
        def update(self, current):
            bar.update(current - bar.n)
            if current >= total_bytes:
                bar.close()

    return Bar()


def load_backbone(handle, cls, dtype=None, load_weights=True, sliding_window_size=None):
    """A backbone of class `cls` (`GemmaBackbone`) from `handle` (see the module docstring)."""
    source = resolve(handle)
    return _backbone(source, dtype, load_weights, cls, sliding_window_size)


def _backbone(source, dtype, load_weights, cls, sliding_window_size=None):
    if source.kind == QUANTIZED:
        config_json = _read_json(source.file(kh.CONFIG_FILE))
        backbone = quantized_format.load_backbone(source.path, config_json, cls, dtype, load_weights)
    else:
        config = load_config(source)
        backbone = cls(config, dtype=dtype)
        if load_weights:
            arrays = _with_progress(_arrays(source, config), f"Loading {source.handle}")
            assign_weights(backbone, arrays, source=_describe(source))
    if sliding_window_size is not None:
        backbone.set_sliding_window(sliding_window_size)
    return backbone


def _describe(source):
    kind = {KERAS_HUB: "keras-hub preset", QUANTIZED: "keras_gemma quantized preset", HUGGING_FACE: "Hugging Face checkpoint", GGUF: "GGUF file"}[source.kind]
    return f"{kind} {source.path}"


def _keras_hub_layout(source):
    """Tokenizer and preprocessor files where keras-hub keeps them."""
    return source.kind in (KERAS_HUB, QUANTIZED)


def _tokenizer(source, cls):
    if source.kind == GGUF:
        return cls.from_gguf(source.path)
    path = source.file(kh.VOCABULARY_PATH if _keras_hub_layout(source) else HF_TOKENIZER_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"{source.path} has no tokenizer: {path} is missing.")
    kwargs = {}
    if not _keras_hub_layout(source):
        chat_format = _hf_chat_format(source)
        if chat_format is not None:
            kwargs["chat_format"] = chat_format.name
    try:
        tokenizer = cls(path, **kwargs)
        if _keras_hub_layout(source) and tokenizer.chat_format is chat_template.GEMMA4 and _is_gemma4_e(source):
            tokenizer = cls(path, chat_format=chat_template.GEMMA4_E.name)
        return tokenizer
    except (RuntimeError, OSError) as e:
        raise CheckpointError(f"Cannot read the tokenizer {path} (truncated or corrupt?): {e}") from None


def _is_gemma4_e(source):
    """Whether a keras-hub preset is a Gemma 4 E model (per-layer embeddings:
    E2B, E4B), whose chat format has no empty thought on the generation
    prompt (`chat_template.GEMMA4_E`). keras-hub's Gemma4Tokenizer does not
    say; the backbone's config.json beside it does."""
    path = source.file(kh.CONFIG_FILE)
    if not os.path.exists(path):
        return False
    with contextlib.suppress(ValueError, OSError, CheckpointError):
        config_json = _read_json(path)
        if config_json.get("class_name") == kh.GEMMA4_CLASS:
            return bool((config_json.get("config") or {}).get("hidden_size_per_layer_input"))
        if quantized_format.is_quantized_config(config_json):
            return quantized_format.read_config(config_json, path).per_layer_input_dim > 0
    return False


def _hf_chat_format(source):
    """The chat format of a Hugging Face checkpoint's own chat template
    (`chat_template.jinja`, else `tokenizer_config.json`), or None."""
    template = None
    if os.path.exists(source.file(HF_CHAT_TEMPLATE_FILE)):
        with open(source.file(HF_CHAT_TEMPLATE_FILE), encoding="utf-8") as f:
            template = f.read()
    elif os.path.exists(source.file(HF_TOKENIZER_CONFIG_FILE)):
        with contextlib.suppress(ValueError, OSError, CheckpointError):
            template = _read_json(source.file(HF_TOKENIZER_CONFIG_FILE)).get("chat_template")
    if not isinstance(template, str):  # absent, or a list of named templates
        return None
    return chat_template.chat_format_for_template(template)


def load_tokenizer(handle, cls):
    """A tokenizer of class `cls` (`GemmaTokenizer`) from `handle`."""
    return _tokenizer(resolve(handle), cls)


def _preprocessor(source, cls, **kwargs):
    tokenizer = _tokenizer(source, cls.tokenizer_cls)
    if _keras_hub_layout(source) and os.path.exists(source.file(kh.PREPROCESSOR_FILE)):
        saved = _read_json(source.file(kh.PREPROCESSOR_FILE)).get("config", {})
        for key in ("sequence_length", "add_start_token", "add_end_token"):
            if key in saved and saved[key] is not None:
                kwargs.setdefault(key, saved[key])
    return cls(tokenizer, **kwargs)


def load_preprocessor(handle, cls, **kwargs):
    """A preprocessor of class `cls` (`GemmaCausalLMPreprocessor`, its
    tokenizer a `cls.tokenizer_cls`) from `handle` (sequence length from
    preprocessor.json if saved)."""
    return _preprocessor(resolve(handle), cls, **kwargs)


def _has_tokenizer(source):
    if source.kind == GGUF:
        return True
    name = kh.VOCABULARY_PATH if _keras_hub_layout(source) else HF_TOKENIZER_FILE
    return os.path.exists(source.file(name))


def load_causal_lm(handle, cls, dtype=None, load_weights=True, preprocessor=True, sliding_window_size=None):
    """A model of class `cls` (`GemmaCausalLM`, built from a `cls.backbone_cls`
    and a `cls.preprocessor_cls`) from `handle`, with a preprocessor when the
    preset has a tokenizer."""
    source = resolve(handle)
    backbone = _backbone(source, dtype, load_weights, cls.backbone_cls, sliding_window_size)
    pre = _preprocessor(source, cls.preprocessor_cls) if preprocessor and _has_tokenizer(source) else None
    lm = cls(backbone, preprocessor=pre)
    lm.preset_handle = source.handle  # where it came from: `chat` warns on a base model
    return lm


# -- saving -------------------------------------------------------------------

@contextlib.contextmanager
def _atomic_directory(directory):
    """Yields a temporary directory; on success its files replace `directory`'s.

    A fresh `directory` appears all at once (one rename). Into an existing
    preset, each file is moved with an atomic replace only after every file
    was written, so an exception while writing leaves the old preset intact.
    """
    directory = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise FileExistsError(f"{directory} exists and is not a directory.")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    try:
        yield tmp
        if not os.path.exists(directory):
            os.rename(tmp, directory)
            return
        _merge_into(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _merge_into(tmp, directory):
    written = set()
    for root, _, files in os.walk(tmp):
        for name in files:
            written.add(os.path.relpath(os.path.join(root, name), tmp))
    # Weights written in one layout make the other layout's files stale.
    if kh.WEIGHTS_FILE in written:
        for name in os.listdir(directory):
            if name == kh.SHARDED_WEIGHTS_FILE or (name.startswith("model_") and name.endswith(".weights.h5")):
                os.remove(os.path.join(directory, name))
    for rel in sorted(written):
        target = os.path.join(directory, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(os.path.join(tmp, rel), target)


def _write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=4)


def _keras_hub_class(config):
    try:
        return kh.backbone_class_for(config)
    except ValueError as e:
        raise ValueError(f"This model cannot be saved as a keras-hub preset: {e}") from None


def _refuse_lora(backbone, action):
    """Saving reads the base weights only: never drop trained adapters silently."""
    state = backbone.lora
    if state is not None:
        raise ValueError(
            f"This model has LoRA adapters enabled (rank {state.rank}, targets {list(state.targets)}), "
            f"which {action} would drop. Call `backbone.merge_lora_weights()` first to fold them "
            "into the weights, or save the adapters alone with `backbone.save_lora_weights(path)`."
        )


def _write_backbone(backbone, directory):
    """Writes config.json, metadata.json and model.weights.h5; returns (config dict, keras-hub class name)."""
    if quantized_format.is_native(backbone):
        config_json = quantized_format.config_json(backbone)
        _write_json(os.path.join(directory, kh.CONFIG_FILE), config_json)
        _write_json(os.path.join(directory, kh.METADATA_FILE), quantized_format.metadata_json(backbone))
        backbone.save_weights(os.path.join(directory, kh.WEIGHTS_FILE))
        return config_json, _tokenizer_class_for_config(backbone.config)
    config_json = kh.config_to_keras_hub(backbone.config, backbone.dtype_policy.name)
    _write_json(os.path.join(directory, kh.CONFIG_FILE), config_json)
    _write_json(os.path.join(directory, kh.METADATA_FILE), kh.metadata_json(backbone))
    kh.write_weights(os.path.join(directory, kh.WEIGHTS_FILE), backbone, config_json["class_name"])
    return config_json, config_json["class_name"]


def _check_savable(backbone, directory):
    _refuse_lora(backbone, "save_to_preset")
    if quantized_format.is_native(backbone):
        quantized_format.warn_not_keras_hub(backbone, directory)
    else:
        _keras_hub_class(backbone.config)


def save_backbone(backbone, directory):
    """Writes `backbone` as a keras-hub preset (config.json, model.weights.h5,
    metadata.json), or a quantized one (or a Gemma 4 one keras-hub cannot
    express) as keras_gemma's native preset."""
    _check_savable(backbone, directory)
    with _atomic_directory(directory) as tmp:
        _write_backbone(backbone, tmp)


def _tokenizer_class_for_config(config):
    """The keras-hub backbone class whose tokenizer fits `config` (by
    generation, then vocabulary, when keras-hub cannot express it)."""
    try:
        return kh.backbone_class_for(config)
    except ValueError:
        if config.gemma4_mechanisms():
            return kh.GEMMA4_CLASS
        return "Gemma3Backbone" if config.vocabulary_size >= 262_144 else "GemmaBackbone"


def _class_for_tokenizer(tokenizer, directory):
    """The backbone class a lone tokenizer belongs to: the preset's, else guessed from the vocabulary."""
    config_path = os.path.join(directory, kh.CONFIG_FILE)
    if os.path.exists(config_path):
        with contextlib.suppress(ValueError, OSError, CheckpointError):
            config_json = _read_json(config_path)
            if quantized_format.is_quantized_config(config_json):
                return _tokenizer_class_for_config(quantized_format.read_config(config_json, config_path))
            if config_json.get("class_name") in kh.GEMMA_CLASSES:
                return config_json["class_name"]
    if tokenizer.chat_format in (chat_template.GEMMA4, chat_template.GEMMA4_E):
        return kh.GEMMA4_CLASS
    vocabulary_size = tokenizer.vocabulary_size()
    return "Gemma3Backbone" if vocabulary_size >= 262_144 else "GemmaBackbone"


def _write_tokenizer(tokenizer, directory, class_name):
    tokenizer_config = kh.tokenizer_json(class_name, tokenizer.get_vocabulary())
    _write_json(os.path.join(directory, kh.TOKENIZER_FILE), tokenizer_config)
    assets = os.path.join(directory, os.path.dirname(kh.VOCABULARY_PATH))
    os.makedirs(assets, exist_ok=True)
    tokenizer.save_assets(assets)
    return tokenizer_config


def _write_preprocessor(preprocessor, directory, class_name):
    tokenizer_config = _write_tokenizer(preprocessor.tokenizer, directory, class_name)
    config = kh.preprocessor_json(
        class_name, tokenizer_config, preprocessor.sequence_length,
        preprocessor.add_start_token, preprocessor.add_end_token,
    )
    _write_json(os.path.join(directory, kh.PREPROCESSOR_FILE), config)
    return config


def save_tokenizer(tokenizer, directory):
    """Writes tokenizer.json and assets/tokenizer/vocabulary.spm (keras-hub layout)."""
    with _atomic_directory(directory) as tmp:
        _write_tokenizer(tokenizer, tmp, _class_for_tokenizer(tokenizer, directory))


def save_preprocessor(preprocessor, directory):
    """Writes preprocessor.json plus the tokenizer (keras-hub layout)."""
    with _atomic_directory(directory) as tmp:
        _write_preprocessor(preprocessor, tmp, _class_for_tokenizer(preprocessor.tokenizer, directory))


def save_causal_lm(causal_lm, directory):
    """Writes a complete keras-hub task preset: backbone, task.json and, if any,
    the preprocessor (a quantized model, or a Gemma 4 one keras-hub cannot
    express: keras_gemma's native preset)."""
    backbone = causal_lm.backbone
    _check_savable(backbone, directory)
    with _atomic_directory(directory) as tmp:
        config_json, class_name = _write_backbone(backbone, tmp)
        preprocessor_config = None
        if causal_lm.preprocessor is not None:
            preprocessor_config = _write_preprocessor(causal_lm.preprocessor, tmp, class_name)
        task = quantized_format.task_json if quantized_format.is_native(backbone) else kh.task_json
        _write_json(os.path.join(tmp, kh.TASK_FILE), task(config_json, preprocessor_config))


# -- Hugging Face export --------------------------------------------------------

def _numpy_dtype(variable):
    import keras
    import ml_dtypes

    name = keras.backend.standardize_dtype(variable.dtype)
    return {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}.get(name, np.dtype(np.float32))


def export_to_transformers(backbone, directory, tokenizer=None):
    """Writes a Hugging Face checkpoint: config.json, model.safetensors and tokenizer.model.

    `transformers.AutoModelForCausalLM.from_pretrained(directory)` loads it.
    Refuses a quantized model and one with LoRA adapters enabled.
    """
    import keras

    _refuse_lora(backbone, "export_to_transformers")
    if backbone.quantization is not None:
        raise ValueError(
            f"export_to_transformers writes float weights, but this model is quantized "
            f"({backbone.quantization.mode}): its kernels are integers with separate scales. "
            "Export the float model before calling quantize(), or keep the quantized model "
            "with save_to_preset (a keras_gemma quantized preset)."
        )
    config = backbone.config
    hf_config = huggingface.config_to_hf(config)
    variables = backbone.weight_map()
    dtypes = {_numpy_dtype(v) for v in variables.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float32)
    hf_config["dtype"] = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}.get(dtype, "bfloat16")
    tensors = {}
    for hf_name, name, kind in huggingface.tensor_names(config):
        variable = variables[name]
        shape = huggingface.from_canonical(np.empty(tuple(variable.shape), np.int8), kind, config).shape

        def load(v=variable, k=kind):
            return huggingface.from_canonical(keras.ops.convert_to_numpy(v), k, config)

        tensors[hf_name] = (shape, dtype, load)
    with _atomic_directory(directory) as tmp:
        _write_json(os.path.join(tmp, "config.json"), hf_config)
        _write_json(
            os.path.join(tmp, "generation_config.json"),
            {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0},
        )
        safetensors_format.write_tensors(os.path.join(tmp, "model.safetensors"), tensors, {"format": "pt"})
        if tokenizer is not None:
            with open(os.path.join(tmp, HF_TOKENIZER_FILE), "wb") as f:
                f.write(tokenizer.proto)
            _write_json(
                os.path.join(tmp, "tokenizer_config.json"),
                {
                    "tokenizer_class": "GemmaTokenizer",
                    "add_bos_token": True,
                    "add_eos_token": False,
                    "bos_token": "<bos>",
                    "eos_token": "<eos>",
                    "pad_token": "<pad>",
                    "unk_token": "<unk>",
                },
            )
