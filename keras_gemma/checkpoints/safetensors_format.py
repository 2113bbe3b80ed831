"""Reading and writing `.safetensors` files one tensor at a time.

A small reader of our own rather than `safetensors.safe_open`: its numpy
framework cannot hold bfloat16 (the dtype most Gemma checkpoints ship in),
and we want a truncated file reported by name before anything is loaded.
Format: 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}}`, then the raw
little-endian bytes (https://github.com/huggingface/safetensors#format).
"""

import inspect
import json
import os
import struct

import ml_dtypes
import numpy as np

from keras_gemma.checkpoints.weights import CheckpointError, LazyTensor

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
DTYPE_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_header(path):
    """(header dict, data start offset) of a safetensors file, checked for truncation."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated or not a safetensors file ({size} bytes).")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(
                f"{path} is truncated or not a safetensors file: its header claims "
                f"{header_len} bytes but the file has {size}."
            )
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:
            raise CheckpointError(f"{path} has a corrupt safetensors header: {e}") from None
    header.pop("__metadata__", None)
    start = 8 + header_len
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if start + end > size:
        raise CheckpointError(
            f"{path} is truncated: its header needs {start + end} bytes but the "
            f"file has only {size}. Download it again."
        )
    return header, start


def read_tensors(path):
    """Name -> `LazyTensor` (float32 on load) for every tensor in one file."""
    header, start = read_header(path)
    out = {}
    for name, entry in header.items():
        if entry["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}.")
        out[name] = LazyTensor(entry["shape"], _loader(path, start, entry), _rows_loader(path, start, entry))
    return out


def _rows_loader(path, start, entry):
    """Reads rows [first, stop) of a tensor (a slice along its first axis) without the rest."""
    def load_rows(first, stop):
        row_bytes = np.dtype(DTYPES[entry["dtype"]]).itemsize * int(np.prod(entry["shape"][1:], dtype=np.int64))
        begin = entry["data_offsets"][0] + first * row_bytes
        shape = [stop - first, *entry["shape"][1:]]
        return _loader(path, start, {**entry, "shape": shape, "data_offsets": [begin, begin + (stop - first) * row_bytes]})()

    return load_rows


def _loader(path, start, entry):
    def load():
        dtype = np.dtype(DTYPES[entry["dtype"]])
        begin, end = entry["data_offsets"]
        with open(path, "rb") as f:
            f.seek(start + begin)
            data = f.read(end - begin)
        if len(data) != end - begin:
            raise CheckpointError(f"{path} is truncated (reading {entry}).")
        array = np.frombuffer(data, dtype=dtype).reshape(entry["shape"])  # little-endian hosts
        return array.astype(np.float32) if dtype.kind == "f" or dtype == DTYPES["BF16"] else array

    return load


def read_checkpoint(directory):
    """All tensors of a Hugging Face directory: one `model.safetensors` or an index of shards."""
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index} is corrupt: {e!r}") from None
        files = sorted(set(weight_map.values()))
    elif os.path.exists(single):
        files = ["model.safetensors"]
    else:
        found = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
        if not found:
            others = [f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth"))]
            hint = f" (found {', '.join(others)}: only safetensors is supported)" if others else ""
            raise CheckpointError(f"{directory} has no model.safetensors{hint}.")
        files = found
    tensors = {}
    for name in files:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            raise CheckpointError(f"{path} is listed in the index but missing.")
        tensors.update(read_tensors(path))
    return tensors


def write_tensors(path, tensors, metadata=None):
    """Writes `tensors` (name -> (shape, dtype, load)) streaming, one tensor in memory at a time."""
    header, offset = {}, 0
    for name, (shape, dtype, _) in tensors.items():
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keep tensor data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, (shape, dtype, load) in tensors.items():
            value = load()
            # `load` may return blocks of rows (a generator) so a large tensor is never whole in memory.
            blocks = value if inspect.isgenerator(value) else [value]
            rows = 0
            for block in blocks:
                array = np.ascontiguousarray(block, dtype=dtype)
                if array.shape[1:] != tuple(shape[1:]):
                    raise ValueError(f"{name}: expected shape {tuple(shape)}, got rows of {array.shape}.")
                rows += array.shape[0] if array.ndim else 1
                f.write(array.reshape(-1).view(np.uint8))
            if rows != (shape[0] if len(shape) else 1):
                raise ValueError(f"{name}: expected shape {tuple(shape)}, got {rows} rows.")
