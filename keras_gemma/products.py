"""Matrix products of the model: `keras.ops`, except bfloat16 under JAX on CPU.
`matmul` splits a batch-1 decode step's products into row blocks on
XLA:CPU. Also how a decode step writes its cache slot: in place on PyTorch
(`writes_in_place`), after the step's attention on TensorFlow
(`orders_cache_write`).

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
row goes in as two (12 ms). Results come back in the input dtype, so every
layer sees what it would on another backend; float32 accumulation is what
JAX does on accelerators anyway. float16 has no such kernel there (a
float32 result measured about the same), so it stays with `keras.ops`, as
do other backends and dtypes.
"""

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
    `layers.decode_logits`). Measured on Gemma 3
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


def on_cpu():
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
