"""The model's backend- and device-specific choices, so that `layers.py` is
`keras.ops` only: which form each product takes, where the kernels live in
memory, and how a decode step writes its cache slot.

- `einsum`, `matmul`: `keras.ops`, except bfloat16 under JAX on CPU (below);
  `matmul` splits a batch-1 decode step's products into row blocks on
  XLA:CPU.
- `decode_logits`: the output head of a decode step, per compiler;
  `screened_logits` at batch 1 on JAX (`screens_head`).
- `store_in_order`: PyTorch float32 kernels in (out, in) memory order.
- `out_in_kernels`: the weights some decode steps read from copies: JAX,
  bfloat16, batch 1, (out, in)-ordered (`times_out_in`); PyTorch, float32,
  3 rows or more, packed by oneDNN (`packed_copy`).
- `attends_one_query_by_matmul`: a decode step's attention form.
- `writes_in_place` (PyTorch), `orders_cache_write` (TensorFlow): the cache
  write.

XLA:CPU runs a bfloat16 x bfloat16 -> bfloat16 dot by converting both
operands to float32 first, so it is no faster than float32 and reads every
weight twice over. Asked for a float32 result, the same dot runs its
bfloat16 kernel. Measured on a 2-core AMD EPYC (Zen 5), JAX 0.10:

- (512, 640) x (640, 2048): float32 3.7 ms, bfloat16 3.6 ms, bfloat16 with a
  float32 result 1.7 ms (780 GFLOP/s).
- Gemma 3's 262k x 640 output head, 8 rows: float32 19 ms, bfloat16 with a
  float32 result 14 ms.

A product with a single row (batch-1 decoding) takes a matrix-vector path
that is an order of magnitude slower in bfloat16 (the head: 182 ms), so one
row goes in as two (12 ms), where a decode step does not read the kernel
from an (out, in) copy (`out_in_kernels`). Results come back in the input dtype, so every
layer sees what it would on another backend; float32 accumulation is what
JAX does on accelerators anyway. float16 has no such kernel there (a
float32 result measured about the same), so it stays with `keras.ops`, as
do other backends and dtypes.
"""

import contextlib
import contextvars
import math
import weakref

import numpy as np

import keras
from keras import ops


def einsum(equation, x, y):
    """`ops.einsum(equation, x, y)`: see the module docstring."""
    if not accumulates_in_float32(x, y):
        return ops.einsum(equation, x, y)
    import jax.numpy as jnp

    inputs, _, output = equation.replace(" ", "").partition("->")
    x_letters, _, y_letters = inputs.partition(",")
    # One row: x's own axes (not in y) are all 1, and the first of them
    # leads both x and the output, so it can take a second row.
    rows = [size for letter, size in zip(x_letters, x.shape) if letter not in y_letters]
    first = x_letters[:1]
    one_row = first not in y_letters and output.startswith(first) and all(size == 1 for size in rows)
    return _float32_result(lambda a, b, **kw: jnp.einsum(equation, a, b, **kw), x, y, 0 if one_row else None)


def matmul(x, y):
    """`ops.matmul(x, y)` for x (..., m, k), y (..., k, n): see the module
    docstring; one row per product, x (g, 1, d), goes by `_row_blocks`."""
    if x.ndim == y.ndim == 3 and x.shape[1] == 1 and splits_one_row(x.dtype) and splits_one_row(y.dtype):
        return _row_blocks(x, y)
    if not accumulates_in_float32(x, y) or x.ndim < 2 or y.ndim < 2:
        return ops.matmul(x, y)
    import jax.numpy as jnp

    return _float32_result(jnp.matmul, x, y, -2 if x.shape[-2] == 1 else None)


ROW_BLOCKS = 4


def _row_blocks(x, y):
    """x (g, 1, d) times y (g, d, f): (g, 1, f), one row per product (a
    batch-1 decode step through a weight matrix, or through its per-head
    slices).

    On XLA:CPU (JAX, TensorFlow) in float32, d is split into blocks so that
    there are `ROW_BLOCKS` products, run as one batched matmul, and their
    partial sums added: XLA:CPU runs a lone one-row product well below the
    machine's memory bandwidth, and the same bytes as a batch near it (the
    output head, whose table is (v, d), takes a faster form of its own:
    `decode_logits`). Measured on Gemma 3
    270M shapes, 2-core CPU:
    - The 18 feed-forward blocks as a chain of one-row products (640 x
      2048): JAX 8.2 -> 6.2 ms, TensorFlow 9.8 -> 7.5 ms.
    - Whole decode steps (feed-forward and the one-head key and value
      projections), alternated in one process, median ms per step: batch 1
      JAX 28.4 -> 26.8, TensorFlow 35.0 -> 28.9 (noisy); at a 2048-token
      context JAX 30.3 -> 27.3, TensorFlow 31.0 -> 25.2. Tokens identical.
    - At batch 8 splitting was slower (JAX 41.4 -> 43.3 ms), and bfloat16
      on JAX (its float32-result products) no faster. PyTorch's products go
      to oneDNN (`generation/compile.py`).
    """
    g, d, f = y.shape
    blocks = ROW_BLOCKS // g
    if blocks <= 1 or d % blocks:
        return ops.matmul(x, y)
    out = ops.matmul(ops.reshape(x, (g * blocks, 1, d // blocks)), ops.reshape(y, (g * blocks, d // blocks, f)))
    return ops.sum(ops.reshape(out, (g, blocks, 1, f)), axis=1)


def splits_one_row(dtype):
    """Whether `matmul` splits one-row products in this dtype (`_row_blocks`)."""
    backend = keras.config.backend()
    return backend in ("jax", "tensorflow") and keras.backend.standardize_dtype(dtype) == "float32" and on_cpu()


def _float32_result(product, x, y, row_axis):
    """`product(x, y)` asked for a float32 result, cast back to x's dtype.
    With a `row_axis` (x's single row, also the output's), x goes in with
    that row twice and the output keeps the first."""
    import jax

    x, y = ops.convert_to_tensor(x), ops.convert_to_tensor(y)
    if row_axis is not None:
        x = jax.numpy.concatenate([x, x], axis=row_axis)
    out = product(x, y, preferred_element_type="float32")
    if row_axis is not None:
        out = jax.lax.slice_in_dim(out, 0, 1, axis=row_axis)
    return out.astype(x.dtype)


def accumulates_in_float32(x, y):
    """Whether `einsum`/`matmul` of x and y take the JAX bfloat16 form."""
    if keras.config.backend() != "jax":
        return False
    dtypes = {keras.backend.standardize_dtype(a.dtype) for a in (x, y)}
    return dtypes == {"bfloat16"} and on_cpu()


def decode_logits(kernel, x, dequantized=False):
    """Logits (b, v) of a decode step from x (b, d) and the (v, d) table
    (`dequantized`: computed from a quantized one).

    Reading the table is most of a decode step, and the fastest form of this
    product differs per compiler (measured on a 2-core CPU, Gemma 3's
    262k x 640 table):
    - XLA:CPU (JAX, TensorFlow), batch 1, any dtype: x (1, d) times the
      transposed table, both cast to float32, the logits cast back to x's
      dtype. XLA makes this one loop fusion over the table's rows, each a
      contiguous d-long dot, the cast (or an int8 table's scaling, done by
      the caller) inside the loop, so the table is read once in its own
      dtype. JAX, the head alone, median
      ms: float32 22.6 against 29.0 for (v, d) x (d, 1); bfloat16 10-16
      against 25-28 for its float32-result product. Whole decode steps on a
      slow day (memory-bound: 24 GB/s), median ms: JAX float32 48-50 ->
      42-44, bfloat16 52-56 -> 36-39, int8 130 -> 60; TensorFlow float32
      57 -> 47, bfloat16 61 -> 52, int8 78 -> 70 (against 4 row blocks).
      Not above one row: with two, bfloat16 took 280 ms this way.
    - XLA:CPU in float32, batch >= 2: the table as 4 row blocks, a batched
      matmul. TensorFlow: 24.5 against 41 ms at batch 8 (its XLA runs the
      whole (v, d) x (d, b) product on a slow path for 2 <= b <= 8). JAX:
      37-38 against 41-43 ms for a broadcast multiply-and-sum and 55-59
      for its dot (batch 8, a slow day); batch-8 decode steps alternated
      in processes: 100-103 -> 83-100 ms. Not for JAX with a dequantized
      table (not measured in blocks), which keeps the multiply-and-sum.
    - JAX on CPU otherwise, batch >= 2: a broadcast multiply-and-sum,
      which XLA fuses into one pass over the table: 19 ms at batch 8 against
      31 for its dot. Elsewhere it would materialise a (v, b, d) product.
    - JAX on CPU in bfloat16, batch >= 2: (b, d) x (d, v),
      `einsum` (14 ms at batch 8).
    - PyTorch: (b, d) x (d, v), the form its traced generation functions
      send to oneDNN with the table as the weight (`generation/compile.py`);
      with the table as oneDNN's input instead, a traced batch-8 prefill
      took 15 s.
    - Otherwise the table as the left operand, (v, d) x (d, b): ~25% faster
      on XLA:CPU at batch 8 than (b, d) x (d, v), equal elsewhere.
    """
    b, d = ops.shape(x)[0], ops.shape(x)[1]
    v = kernel.shape[0]
    backend = keras.config.backend()
    if b == 1 and backend in ("jax", "tensorflow") and on_cpu():
        logits = ops.matmul(ops.cast(x, "float32"), ops.transpose(ops.cast(kernel, "float32")))
        return ops.cast(logits, x.dtype)
    if accumulates_in_float32(x, kernel):
        return einsum("bd,vd->bv", x, kernel)
    if v % 4 == 0 and splits_one_row(x.dtype) and (backend == "tensorflow" or not dequantized):
        # x broadcast over the blocks as a real operand: given as (1, d, b),
        # XLA folds the batched matmul back into the slow single product.
        x = ops.broadcast_to(ops.transpose(x)[None], (4, d, b))
        blocks = ops.matmul(ops.reshape(kernel, (4, v // 4, d)), x)  # (4, v/4, b)
        return ops.reshape(ops.transpose(blocks, (2, 0, 1)), (b, v))
    if backend == "jax" and b is not None and b > 1 and on_cpu():
        return ops.transpose(ops.sum(kernel[:, None, :] * x[None], axis=-1))
    if backend == "torch":
        return ops.matmul(x, ops.transpose(kernel))
    return ops.transpose(ops.matmul(kernel, ops.transpose(x)))


def store_in_order(dense, order):
    """On PyTorch in float32, `dense.kernel` keeps its shape and values with
    its memory in the axis order `order` (a permutation of its axes): the
    layout of an (out, in) matrix, which PyTorch's generation multiplies by
    fastest (`generation/compile.py`). Assignments (`copy_`) keep the order.

    Measured on the 2-core CPU, Gemma 3 270M shapes: oneDNN reads an (f, d)
    gate or up kernel 2.4x faster per decode step than a (d, f) one (~110
    against ~270 us, weights out of cache), and a batch-1 step's product
    by an (out, in) matrix goes to MKL's matrix-vector kernel, 1.4-2x
    faster again. A no-op elsewhere and for quantized layers (loading one
    builds them so); bfloat16 products (oneDNN inside `matmul`) slowed down
    in this order (36 -> 58 ms per step).
    """
    dense.out_in_order = order  # for `out_in_kernels`
    if keras.config.backend() != "torch" or dense.quantization_mode is not None:
        return
    if not dense.dtype_policy.compute_dtype == dense.kernel.dtype == "float32":
        return
    kernel = dense.kernel.value  # no LoRA yet at build time
    inverse = sorted(range(len(order)), key=order.__getitem__)
    kernel.data = kernel.data.permute(*order).contiguous().permute(*inverse)


def stored_in_order(dense, order):
    """Whether `dense.kernel` (LoRA included) is stored in the memory order
    `order` (`store_in_order`); always False off PyTorch."""
    if keras.config.backend() != "torch" or dense.quantization_mode is not None:
        return False
    kernel = dense.kernel
    kernel = kernel.value if isinstance(kernel, keras.Variable) else kernel
    return kernel.permute(*order).is_contiguous()


# While a decode function is traced: the ids of the kernels read from
# (out, in) copies (JAX, `reads_out_in`), and PyTorch's packed copies by the
# data pointer and (out, in) shape of the matrix they copy (`packed_copy`).
_OUT_IN = contextvars.ContextVar("out_in", default=frozenset())
_PACKED = contextvars.ContextVar("packed", default={})

# The dtypes whose kernels JAX's batch-1 decode steps read from (out, in)
# copies (tests add float32).
OUT_IN_DTYPES = ("bfloat16",)


def out_in_kernels(lm):
    """`(variable, order, out)` for each weight that some decode steps read
    from a copy (`reads_copies`): `order` the permutation of its axes that
    reads as an (out, in) matrix (`store_in_order`'s), `out` that matrix's
    row count. `[]` if none.

    - JAX on CPU, batch 1: bfloat16 kernels (not quantized, no LoRA), in
      (out, in) memory order. XLA:CPU has no fast bfloat16 matrix-vector
      product: by a kernel in Keras' (in, out) order a batch-1 step's
      products ran at ~13 GB/s (`einsum`'s two-row form; the one-row form
      is 10x slower), where x by an (out, in) matrix, both cast to float32,
      is one loop fusion over contiguous rows that reads the bfloat16
      weights at 28-37 GB/s (as `decode_logits` does with the head).
      Measured on the 2-core CPU, Gemma 3 270M shapes, per product,
      weights out of cache: gate/up 207 -> 79 us, query 94 -> 36 us; whole
      batch-1 decode steps 25 -> 19-21 ms, float32 22. The copies hold 200
      MB for 270M. Float32 is left as is: its row-block products already
      run at ~23 GB/s, and a copy would be 400 MB.
    - PyTorch on CPU with oneDNN, batch 3 and up: float32 kernels stored
      in (out, in) order, and the output head's table, packed by oneDNN
      for that many rows (its blocked layout). oneDNN reads a packed
      matrix faster for a few rows: 8 rows, per product, weights out of
      cache: gate/up 363 -> 269 us, down 326 -> 259, query 184 -> 142; the
      262k x 640 head 38-48 -> 27.5 ms; whole steps `PACKED_FROM_ROWS`.
      Identical values. The copies hold as much as the weights (1.07 GB
      for 270M).

    Copies are kept while the weights are the same (`GenerateFunctions.kernels`).
    """
    backend = keras.config.backend()
    embedding = lm.backbone.token_embedding
    table = embedding.embeddings
    if backend not in ("jax", "torch") or (backend == "jax" and not on_cpu()):
        return []
    if backend == "torch" and (table.value.device.type != "cpu" or not _packs()):
        return []
    pairs = []
    for layer in lm._flatten_layers():
        order = getattr(layer, "out_in_order", None)
        if order is None or layer.quantization_mode is not None or layer.lora_enabled:
            continue
        dtype = keras.backend.standardize_dtype(layer._kernel.dtype)
        transposed = backend == "jax" and dtype in OUT_IN_DTYPES and layer.dtype_policy.compute_dtype == dtype
        if transposed or (backend == "torch" and stored_in_order(layer, order)):
            inputs, _, output = layer.equation.partition("->")
            kernel_letters = inputs.split(",")[1]
            out = math.prod(size for letter, size in zip(kernel_letters, layer._kernel.shape) if letter in output)
            pairs.append((layer._kernel, order, out))
    if backend == "torch" and embedding.quantization_mode is None and keras.backend.standardize_dtype(table.dtype) == "float32":
        pairs.append((table, (0, 1), table.shape[0]))
    return pairs


def _packs():
    """Whether this PyTorch has oneDNN's weight packing (x86)."""
    import platform

    import torch

    return (
        platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


# PyTorch's decode steps read packed copies (`out_in_kernels`) from this many
# rows on. Gemma 3 270M, float32, steps alternated in one process, median
# ms, unpacked -> packed: batch 2 53-61 -> 65-68 (row blocks by MKL win
# there, `generation/compile.py`), batch 3 75 -> 64, batch 4 100 -> 72,
# batch 8 95 -> 69.
PACKED_FROM_ROWS = 3


def reads_copies(batch):
    """Whether a decode step of `batch` rows reads `out_in_kernels` copies."""
    return batch == 1 if keras.config.backend() == "jax" else batch >= PACKED_FROM_ROWS


def out_in_copies(pairs, batch):
    """The copies of `pairs` (`out_in_kernels`) for `batch` rows: (out, in)
    transposes on JAX, oneDNN's packed matrices on PyTorch."""
    if keras.config.backend() != "torch":
        return [ops.transpose(variable, order) for variable, order, _ in pairs]
    import torch

    with torch.inference_mode():
        return [
            torch.ops.mkldnn._reorder_linear_weight(variable.value.permute(*order).reshape(out, -1), batch)
            for variable, order, out in pairs
        ]


def copies_bytes(pairs):
    """The size of `out_in_copies` of `pairs`, in bytes."""
    return sum(math.prod(variable.shape) * np.dtype(variable.dtype).itemsize for variable, _, _ in pairs)


def fits_in_memory(size):
    """Whether `size` bytes are at most half of the memory the OS reports
    available (Linux' `MemAvailable`; True where it reports none)."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return True
    return size <= available // 2


def copies_stamp(variable):
    """What a copy made from `variable` (`out_in_copies`, the head's screen)
    stays valid for (`copied_from`): a weak reference to its JAX array
    (replaced on every assignment), or its PyTorch tensor's storage and
    version (changed in place)."""
    value = variable.value
    if keras.config.backend() == "torch":
        return (value.data_ptr(), value._version)
    return weakref.ref(value)


def copied_from(stamp, variable):
    """Whether `variable` is as it was when `stamp` (`copies_stamp`) was taken."""
    if isinstance(stamp, weakref.ref):
        return stamp() is variable.value
    return stamp == copies_stamp(variable)


@contextlib.contextmanager
def reading_out_in(pairs, copies):
    """Inside a traced decode function's `StatelessScope`: its products by
    the `pairs`' weights (`out_in_kernels`) read `copies` (`out_in_copies`,
    or `()`: the weights as they are) until exit.

    - JAX: each kernel's value becomes its copy transposed back, an
      assignment the scope keeps to itself; `times_out_in` undoes that
      transpose, so XLA reads the copy.
    - PyTorch: the products by a weight matrix that the traced functions
      send to oneDNN take its packed copy (`packed_copy`)."""
    if not copies:
        yield
        return
    if keras.config.backend() == "torch":
        packed = {}
        for (variable, order, out), copy in zip(pairs, copies):
            value = variable.value
            packed[value.data_ptr(), (out, math.prod(variable.shape) // out)] = copy
        token = _PACKED.set(packed)
        try:
            yield
        finally:
            _PACKED.reset(token)
        return
    for (variable, order, _), copy in zip(pairs, copies):
        variable.assign(ops.transpose(copy, sorted(range(len(order)), key=order.__getitem__)))
    token = _OUT_IN.set(frozenset(id(variable) for variable, _, _ in pairs))
    try:
        yield
    finally:
        _OUT_IN.reset(token)


def _pointer(tensor):
    # Sizes are tensors while tracing; `shape` compares as ints.
    return tensor.data_ptr(), tuple(int(size) for size in tensor.shape)


def packed_copy(matrix):
    """The packed copy of an (out, in) PyTorch matrix that the function being
    traced reads (`reading_out_in`), or None."""
    return _PACKED.get().get(_pointer(matrix))


def reads_out_in(dense):
    """Whether the function being traced reads `dense.kernel` from an (out,
    in) copy (`out_in_kernels`): one row then goes by `times_out_in`."""
    return id(getattr(dense, "_kernel", None)) in _OUT_IN.get()


def times_out_in(x, kernel, order):
    """x (1, i) by `kernel`, whose axes in `order` read as an (o, i) matrix
    (the order it is stored in when `reads_out_in`): (1, o) in x's dtype,
    products and sums in float32. The transposes cancel the copy's, so XLA
    reads the copy as is (see `out_in_kernels`)."""
    matrix = ops.reshape(ops.transpose(kernel, order), (-1, x.shape[-1]))
    out = ops.matmul(ops.cast(x, "float32"), ops.transpose(ops.cast(matrix, "float32")))
    return ops.cast(out, x.dtype)


def attends_one_query_by_matmul():
    """Whether attention for one query position (a decode step) runs as
    plain batched matmuls, each operand in its stored order, rather than
    einsums: on TensorFlow, whose XLA transposes the cached keys and values
    for the einsum form on every step (a decode step with a 512-slot ring:
    35.7 against 28.2 ms). JAX's runs the einsum form a little faster,
    PyTorch both alike."""
    return keras.config.backend() == "tensorflow"


def on_cpu():
    """Whether this backend computes on the CPU (PyTorch: where Keras puts
    new tensors; `keras.distribution` does not exist there)."""
    if keras.config.backend() == "torch":
        return ops.convert_to_tensor(0).device.type == "cpu"
    return keras.distribution.list_devices()[0].startswith("cpu")


def orders_cache_write(dtype):
    """Whether a decode step's functional cache write (`slice_update`) is
    made to wait for the step's attention (`layers._after`): TensorFlow,
    with a float32 cache.

    TensorFlow's XLA cannot tell that the write comes after every read of
    the old cache, so it copies each cache array three times per step to
    keep those reads safe (JAX turns on copy insertion's region analysis
    for this, a per-function option TensorFlow does not take). With the
    write depending on the attention output, the order is plain and the
    write happens in place. Gemma 3 270M, float32, batch 1, alternated in
    one process: 33.2 -> 30.7 ms per step at a 2048-token context (about
    84 MB less copied per step), same at 16. A 16-bit cache is written by
    rewriting the array through float32 either way, and waiting made it
    slower (28.2 -> 32.5 ms on TensorFlow, 27.7 -> 29.2 on JAX); JAX's
    float32 cache measured the same either way.
    """
    return keras.config.backend() == "tensorflow" and keras.backend.standardize_dtype(dtype) == "float32"


def writes_in_place():
    """Whether a decode step writes its cache slot in place: on PyTorch,
    without gradients (generation runs in `torch.inference_mode`).

    `ops.slice_update` on PyTorch clones the whole array and writes through
    an index grid: per step, 54 cache arrays and ~6 ops each for Gemma 3
    270M. `index_copy_` is one op. A step then attends to the updated
    cache, one product where the functional form takes two (cache, new
    key) and concatenates. Gemma 3 270M, float32, alternated in one
    process: 39.1 -> 36.6 ms per step at batch 1, 62.6 -> 57.9 at batch 8.
    """
    if keras.config.backend() != "torch":
        return False
    import torch

    return not torch.is_grad_enabled()


def write_in_place(array, axis, index, update):
    """`array`'s slice `index` (a scalar) along `axis` becomes `update`
    (size 1 on that axis), in `array` itself (PyTorch, `writes_in_place`)."""
    array.index_copy_(axis, ops.cast(ops.reshape(index, (1,)), "int64"), update)


# How many rows of the output head a screened decode step recomputes
# exactly (at least twice the sampler's k): `screened_logits`.
SCREEN_ROWS = 256


def screens_head(embedding, batch):
    """Whether a decode step of `batch` rows finds its sampler's top logits
    through an int8 copy of the output head (`screened_logits`): JAX on
    CPU, batch 1, a float32 or bfloat16 table in the compute dtype.

    A batch-1 step on CPU is memory-bound, and the head is most of what it
    reads (Gemma 3 270M: 671 of 1070 MB). The int8 copy is a quarter of
    that. Measured on the 2-core CPU, JAX, Gemma 3 270M shapes: the 262k x
    640 head alone 22 against 7-10 ms (screen, top rows, exact rows,
    cond); whole decode steps 37-38 against 23 ms; `benchmarks/generate.py`
    batch 1, 16-token prompt, 28-29 -> 45.6 tokens/s; bfloat16, in one
    script, 34.9 -> 40.8 (float32 27.6 -> 46.9 there). TensorFlow would
    have to rebuild the copy on every call (its variables change in place,
    with nothing to tell that they did): ~100 ms. PyTorch's traced step
    cannot branch on values.
    """
    return (
        keras.config.backend() == "jax" and batch == 1 and on_cpu() and embedding.quantization_mode is None
        and embedding.dtype_policy.compute_dtype in ("float32", "bfloat16")
        and keras.backend.standardize_dtype(embedding.embeddings.dtype) == embedding.dtype_policy.compute_dtype
        and embedding.embeddings.shape[0] > 2 * SCREEN_ROWS
    )


def screen_table(kernel):
    """The int8 screen of a (v, d) table (float32 or bfloat16): `(q, s)`, q
    (v, d) int8 and s (v,) float32 with each row `kernel[i] ~ q[i] * s[i]`,
    rounded to nearest (so within `s[i] / 2` of it, elementwise)."""
    kernel = ops.cast(kernel, "float32")
    largest = ops.max(ops.abs(kernel), axis=-1)
    scale = ops.where(largest > 0, largest, 1.0) / 127.0
    return ops.cast(ops.round(kernel * (1.0 / scale)[:, None]), "int8"), scale


def screened_logits(x, kernel, screen, k, finish, full):
    """Logits (1, v) computed as `full()` computes them (float32 products
    of x by table rows, then `finish`; the summation order may differ in
    the last bit) for a set of rows that surely holds the k largest, -inf
    elsewhere: the same tokens for a sampler that reads only those
    (greedy, top-k). `full()` itself where that set cannot be shown.

    x (1, d) float32; `kernel` the (v, d) table (float32 or bfloat16);
    `screen` its `screen_table`; `finish(raw)` the elementwise rest of the
    head (rounding to the compute dtype, a soft cap: monotone).

    With `e = q * s + r`, `|r| <= s / 2` elementwise, each raw logit is
    within `bound = |x|_1 * s * (1/2 + slack)` of `x . q * s` (the slack
    covers both products' float32 rounding, `d * 2**-24` relative each on
    `|x|_1 * max|e|`, `max|e| = 127 s`). The `rows` largest upper bounds
    are recomputed exactly from `kernel`. Every other row's logit is at
    most the smallest of those bounds; if that, finished, is below the
    k-th largest exact logit, no other row is in the top k (with a margin
    of 2**-20 for rounding in `finish`). Else (near-ties deep in the list,
    NaN) the step takes `full()`.
    """
    q, s = screen
    v, d = kernel.shape
    rows = min(max(SCREEN_ROWS, 2 * k), v)
    approx = ops.matmul(x, ops.transpose(ops.cast(q, "float32"))) * s  # (1, v)
    bound = ops.sum(ops.abs(x), axis=-1, keepdims=True) * s * (0.501 + 256 * d * 2.0**-24)
    upper, index = ops.top_k(approx + bound, rows)  # (1, rows)
    index = index[0]
    exact = finish(ops.matmul(x, ops.transpose(ops.cast(ops.take(kernel, index, axis=0), "float32"))))  # (1, rows)
    # The last of a top_k as a min: XLA:CPU runs top_k as a full sort
    # (~70 ms over 262k) when only its last value is sliced out.
    kth = ops.min(ops.top_k(exact, k)[0], axis=-1)
    outside = finish(ops.min(upper, axis=-1))
    shown = ops.all(outside + ops.abs(outside) * 2.0**-20 < kth)
    slots = ops.stack([ops.zeros_like(index), index], axis=1)
    screened = ops.scatter_update(ops.full((1, v), -np.inf, "float32"), slots, exact[0])
    return ops.cond(shown, lambda: screened, full)
