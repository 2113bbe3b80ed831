"""llama.cpp's GGUF files: architecture from metadata, dequantized tensors.

Read with the `gguf` package (optional dependency). Tensors are dequantized to
float32 one at a time as they are assigned. Differences from HF's layout:
tensor names (`blk.{i}.attn_q.weight`, ...), and every RMSNorm weight stored
as `1 + scale` (llama.cpp's converter adds the 1, see `Gemma2Model` in
https://github.com/ggml-org/llama.cpp/blob/master/convert_hf_to_gguf.py);
projection matrices come out of dequantization in HF's (out, in) layout.

What GGUF metadata does not say, llama.cpp hard-codes, and so do we: Gemma 2
alternates local/global layers starting local; Gemma 3 has five local layers
per global one with local rope base 10,000; queries are scaled by
`head_dim ** -0.5` except for the 27B models, which use
`(hidden_dim / num_query_heads) ** -0.5` (llama.cpp picks that by model size;
we look the architecture up in `keras_gemma.presets.ARCHITECTURES`).
"""

import math
import os
import struct

import ml_dtypes
import numpy as np

from keras_gemma.checkpoints.huggingface import canonical_weights
from keras_gemma.checkpoints.weights import CheckpointError, LazyTensor
from keras_gemma.config import GLOBAL, LOCAL, GemmaConfig, layer_pattern
from keras_gemma.presets import ARCHITECTURES

ARCHITECTURE_NAMES = ("gemma", "gemma2", "gemma3")
GGUF_MAGIC = b"GGUF"
STRING, ARRAY = 8, 9
SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

# GGUF block tensor -> HF tensor (per layer). Gemma 1's `ffn_norm` is HF's
# `post_attention_layernorm` (the norm before the feed-forward).
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def is_gguf(path):
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


class GGUFTensor:
    """One tensor's header: name, numpy shape, ggml type, absolute byte offset and size."""

    def __init__(self, name, shape, tensor_type, offset, nbytes):
        self.name, self.shape, self.tensor_type, self.offset, self.nbytes = name, shape, tensor_type, offset, nbytes


class GGUFFile:
    """The metadata and tensor headers of a GGUF file; tensor data is read on demand.

    A small parser of our own (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):
    `gguf.GGUFReader` spends tens of seconds on a 262,144-entry vocabulary
    (one numpy view per string). The `gguf` package still dequantizes.
    """

    def __init__(self, path):
        self.path = path
        self.size = os.path.getsize(path)
        try:
            with open(path, "rb") as f:
                self._parse(f)
        except (struct.error, UnicodeDecodeError, KeyError, ValueError, OverflowError, MemoryError) as e:
            raise CheckpointError(
                f"Cannot read {path} ({self.size} bytes): the GGUF file is truncated or corrupt "
                f"({type(e).__name__}: {e})."
            ) from None
        end = max((t.offset + t.nbytes for t in self.tensors), default=0)
        if end > self.size:
            raise CheckpointError(
                f"{path} is truncated: its tensors need {end} bytes but the file has only "
                f"{self.size}. Download or assemble it again."
            )

    def _parse(self, f):
        data = f.read(min(self.size, 64 * 1024 * 1024))  # header, metadata and tensor infos
        if data[:4] != GGUF_MAGIC:
            raise CheckpointError(f"{self.path} is not a GGUF file (it does not start with b'GGUF').")
        offset = 4  # after the magic

        def read(fmt):
            nonlocal offset
            values = struct.unpack_from("<" + fmt, data, offset)
            offset += struct.calcsize("<" + fmt)
            return values[0] if len(values) == 1 else values

        def read_string():
            nonlocal offset
            length = read("Q")
            if offset + length > len(data):
                raise ValueError("string runs past the end of the header")
            text = data[offset:offset + length].decode("utf-8")
            offset += length
            return text

        def read_value(value_type):
            nonlocal offset
            if value_type == STRING:
                return read_string()
            if value_type == ARRAY:
                item_type, count = read("IQ")
                if item_type in (STRING, ARRAY):
                    return [read_value(item_type) for _ in range(count)]
                dtype = np.dtype("<" + SCALAR_FORMATS[item_type])
                values = np.frombuffer(data, dtype, count, offset)
                offset += dtype.itemsize * count
                return values
            return read(SCALAR_FORMATS[value_type])

        version, tensor_count, kv_count = read("IQQ")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        self.metadata = {}
        for _ in range(kv_count):
            key = read_string()
            self.metadata[key] = read_value(read("I"))
        infos = []
        for _ in range(tensor_count):
            name = read_string()
            dims = [read("Q") for _ in range(read("I"))]
            infos.append((name, dims, read("I"), read("Q")))
        alignment = int(self.metadata.get("general.alignment", 32))
        start = offset + (-offset % alignment)
        import gguf

        self.tensors = []
        for name, dims, tensor_type, tensor_offset in infos:
            qtype = gguf.GGMLQuantizationType(tensor_type)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            nbytes = math.prod(dims) // block * type_size
            shape = tuple(int(n) for n in reversed(dims))  # ggml lists the fastest axis first
            self.tensors.append(GGUFTensor(name, shape, qtype, start + tensor_offset, nbytes))

    def field(self, key, default=None):
        value = self.metadata.get(key, default)
        return value.tolist() if isinstance(value, np.ndarray) else value

    def load(self, tensor):
        """One tensor, dequantized to float32."""
        import gguf

        with open(self.path, "rb") as f:
            f.seek(tensor.offset)
            raw = f.read(tensor.nbytes)
        if len(raw) != tensor.nbytes:
            raise CheckpointError(f"{self.path} is truncated (reading {tensor.name}).")
        rows = math.prod(tensor.shape[:-1])
        data = np.frombuffer(raw, np.uint8).reshape(rows, -1)
        if tensor.tensor_type == gguf.GGMLQuantizationType.BF16:
            array = data.view(ml_dtypes.bfloat16).astype(np.float32)
        else:
            array = gguf.quants.dequantize(data, tensor.tensor_type)
        return np.asarray(array, dtype=np.float32).reshape(tensor.shape)


def open_reader(path):
    """A parsed `GGUFFile`, with a truncated or corrupt file reported by name."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ImportError("Reading GGUF files needs the `gguf` package: `pip install gguf`.") from None
    if not is_gguf(path):
        raise CheckpointError(f"{path} is not a GGUF file (it does not start with b'GGUF').")
    return GGUFFile(path)


def architecture(reader, path="the GGUF file"):
    arch = reader.field("general.architecture")
    if arch not in ARCHITECTURE_NAMES:
        raise CheckpointError(
            f"{path} holds a {arch!r} model (general.architecture), not Gemma; keras_gemma "
            f"loads only {', '.join(ARCHITECTURE_NAMES)}."
        )
    return arch


def _known_query_scalar(config):
    """query_pre_attn_scalar of the published architecture `config` is, if any."""
    for known in ARCHITECTURES.values():
        same = known.replace(
            query_pre_attn_scalar=config.query_pre_attn_scalar,
            max_sequence_length=config.max_sequence_length,
            layer_norm_epsilon=config.layer_norm_epsilon,
        )
        if same == config:
            return known.query_pre_attn_scalar
    return config.query_pre_attn_scalar


def config_from_gguf(reader, path="the GGUF file"):
    """A `GemmaConfig` from GGUF metadata."""
    arch = architecture(reader, path)

    def get(key, default=None):
        value = reader.field(f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(f"{path} lacks the metadata field {arch}.{key}.")
        return value

    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise CheckpointError(f"{path} has no token_embd.weight tensor.")
    num_layers, hidden = int(get("block_count")), int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    fields = dict(
        vocabulary_size=int(embedding.shape[0]),  # (v, d)
        num_layers=num_layers,
        hidden_dim=hidden,
        num_query_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length", hidden // heads)),
        intermediate_dim=int(get("feed_forward_length")),
        layer_norm_epsilon=float(np.float32(get("attention.layer_norm_rms_epsilon", 1e-6))),
        max_sequence_length=int(get("context_length", 8192)),
        global_rope_base=float(get("rope.freq_base", 10_000.0)),
        local_rope_base=float(get("rope.freq_base", 10_000.0)),
    )
    if arch in ("gemma2", "gemma3"):
        fields.update(use_post_norms=True, sliding_window_size=int(get("attention.sliding_window", 4096)))
    if arch == "gemma2":
        fields.update(
            layer_types=layer_pattern(num_layers, (LOCAL, GLOBAL)),
            attention_logit_softcap=float(get("attn_logit_softcapping", 50.0)),
            final_logit_softcap=float(get("final_logit_softcapping", 30.0)),
        )
    if arch == "gemma3":
        pattern = reader.field("gemma3.attention.sliding_window_pattern", 6)
        if isinstance(pattern, (list, tuple)):  # newer files: one bool per layer
            layer_types = tuple(LOCAL if local else GLOBAL for local in pattern)
        else:
            layer_types = tuple(GLOBAL if (i + 1) % int(pattern) == 0 else LOCAL for i in range(num_layers))
        scaling = 1.0
        if reader.field("gemma3.rope.scaling.type") == "linear":
            scaling = float(get("rope.scaling.factor"))
        fields.update(layer_types=layer_types, use_qk_norm=True, local_rope_base=10_000.0, global_rope_scaling=scaling)
    config = GemmaConfig(**fields)
    return config.replace(query_pre_attn_scalar=_known_query_scalar(config))


def _hf_name(gguf_name, config):
    """The HF tensor name of a GGUF tensor, or None if it has none."""
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    parts = gguf_name.split(".")
    if len(parts) != 4 or parts[0] != "blk" or parts[3] != "weight" or parts[2] not in BLOCK_NAMES:
        return None
    name = BLOCK_NAMES[parts[2]]
    if parts[2] == "ffn_norm" and not config.use_post_norms:
        name = "post_attention_layernorm"
    return f"model.layers.{parts[1]}.{name}.weight"


def _loader(reader, tensor, is_norm):
    def load():
        array = reader.load(tensor)
        return array - 1.0 if is_norm else array  # stored as 1 + scale

    return load


def read_weights(reader, config, path="the GGUF file"):
    """Canonical name -> `LazyTensor`; a tensor we cannot place is reported by its GGUF name."""
    hf, unknown = {}, {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name, config)
        if name is None:
            unknown[f"gguf:{tensor.name}"] = LazyTensor(tensor.shape, None)
            continue
        hf[name] = LazyTensor(tensor.shape, _loader(reader, tensor, tensor.name.endswith("norm.weight")))
    return {**canonical_weights(config, hf), **unknown}
