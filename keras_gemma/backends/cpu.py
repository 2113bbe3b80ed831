"""Generation speed on CPUs, kept out of the model math.

The generation compiler (`generation/compile.py`) asks `tuning(lm)` once
per model for a `Tuning` and applies it to the functions it compiles; the
layers and the engine never see it. Off the CPU, and on TensorFlow, the
tuning is `Tuning()`: nothing changes.

- JAX on CPU (`JaxCpu`): a batch-1 decode step finds the sampler's top
  logits through an int8 copy of the output head (`screened_logits`), and
  the decode loop gets two XLA options (`loop_options`).
- PyTorch on CPU (`TorchCpu`): float32 kernels are stored in (out, in)
  memory order, and the traced generation functions send products by a
  weight matrix to oneDNN, or at a few rows to MKL's matrix-vector product
  (`onednn_products`).

And one for training: JAX on CPU keeps `keras.remat`'s recomputation
(`remat_train_step`).

Measured on a 2-core AMD EPYC (Zen 5); the numbers are in each docstring.
"""

import contextlib
import functools
import math
import weakref

import keras
import numpy as np
from keras import ops


def on_cpu():
    """Whether this backend computes on the CPU (PyTorch: where Keras puts
    new tensors; `keras.distribution` does not exist there)."""
    if keras.config.backend() == "torch":
        return ops.convert_to_tensor(0).device.type == "cpu"
    return keras.distribution.list_devices()[0].startswith("cpu")


def tuning(lm):
    """The `Tuning` for generating with `lm` on this backend and device."""
    tunings = {"jax": JaxCpu, "torch": TorchCpu}
    if not on_cpu() or keras.config.backend() not in tunings:
        return Tuning()
    return tunings[keras.config.backend()](lm)


@contextlib.contextmanager
def remat_train_step(lm):
    """Around Keras' `make_train_function`: JAX on CPU jits the train step of
    a model with `remat` with XLA's `cse_barrier_expander` pass off.

    XLA:CPU drops the optimisation barriers `keras.remat` (`jax.checkpoint`)
    places and then merges each recomputed block with its forward pass
    (common-subexpression elimination), so remat saves nothing there
    (Gemma 3 270M shapes, 4 x 128 tokens: the step's temporary memory was
    the same with and without it). Keeping the barriers, the backward pass
    recomputes the block as on GPUs and TPUs. Keras' JAX trainer jits the
    step with its module's `jit`, which is replaced for the duration.
    """
    from keras_gemma.backbone import GemmaBackbone

    backbone = getattr(lm, "backbone", None)
    if keras.config.backend() != "jax" or not on_cpu() or not isinstance(backbone, GemmaBackbone) or not backbone.remat:
        yield
        return
    from keras.src.backend.jax import trainer

    jit = trainer.jit
    trainer.jit = functools.partial(jit, compiler_options={"xla_disable_hlo_passes": "cse_barrier_expander"})
    try:
        yield
    finally:
        trainer.jit = jit


class Tuning:
    """No tuning: what the compiler does on GPUs, TPUs and TensorFlow.

    - `extras(sampler, batch)`: arrays the compiled decode functions take
      as one more argument (a pytree, `()` for none).
    - `model(lm, sampler, extras)`: what those functions call as the model
      (`lm`, or a view of it with another `decode_logits`).
    - `loop_options(cache_dtype)`: XLA compiler options of JAX's decode loop.
    - `tracing()`: a context for PyTorch's traced (and long eager) functions.
    - `decode(fn)`: JAX's decode step and loop function as it is compiled.
    """

    def extras(self, sampler, batch):
        return ()

    def model(self, lm, sampler, extras):
        return lm

    def loop_options(self, cache_dtype):
        return None

    def tracing(self):
        return contextlib.nullcontext()

    def decode(self, fn):
        return fn


# -- JAX on CPU ----------------------------------------------------------------


class JaxCpu(Tuning):
    """The int8 screen of the output head at batch 1, one-row products in
    row blocks (`row_blocks`), and XLA loop options.

    A batch-1 step on CPU is memory-bound, and the head is most of what it
    reads (Gemma 3 270M: 671 of 1070 MB in float32). Its int8 copy is a
    quarter of that: the 262k x 640 head alone 22 against 7-10 ms, whole
    decode steps 37-38 against 23 ms; `benchmarks/generate.py` batch 1,
    16-token prompt, 28-29 -> 45.6 tokens/s. Greedy, top-k and top-p with
    `k` read only their top logits and use it; the copy is made on the
    first `generate` after the weights change (100-130 ms for 270M, 168 MB
    held) and kept while the table's array is the same (JAX replaces a
    variable's array on every assignment).
    """

    def __init__(self, lm):
        self.embedding = lm.backbone.token_embedding
        self._screen = None  # (weak reference to the table's array, screen)

    def extras(self, sampler, batch):
        k = top_logits(sampler)
        embedding = self.embedding
        table = embedding.embeddings
        dtype = embedding.dtype_policy.compute_dtype
        if (
            k is None or batch != 1 or embedding.quantization_mode is not None or dtype not in ("float32", "bfloat16")
            or keras.backend.standardize_dtype(table.dtype) != dtype or table.shape[0] <= 2 * max(SCREEN_ROWS, k)
        ):
            return ()
        if self._screen is None or self._screen[0]() is not table.value:
            import jax

            self._screen = None  # the old screen goes before the new one is made
            self._screen = (weakref.ref(table.value), jax.jit(screen_table)(table.value))
        return self._screen[1]

    def model(self, lm, sampler, extras):
        return ScreenedHead(lm, extras, top_logits(sampler)) if extras else lm

    def decode(self, fn):
        return row_blocks(fn)

    def loop_options(self, cache_dtype):
        """- No loop-invariant code motion. XLA:CPU looks a row up in a 16-bit
          table by converting the table to float32 inside the gather's
          fusion, which reads only the rows it needs. In a `while_loop` the
          pass hoists that conversion out of the loop, so every call
          converted Gemma 3's whole 262k x 640 table first: 0.13 s and 670
          MB for each `generate` in bfloat16.
        - Copy insertion with region analysis, for a float32 cache: without
          it XLA may copy each layer's cache per step to keep a read safe
          (Gemma 3 270M at a 2048-token context: 31.9 -> 29.5 ms per step).
        """
        options = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
        if keras.backend.standardize_dtype(cache_dtype) == "float32":
            options["xla_cpu_copy_insertion_use_region_analysis"] = True
        return options


# Blocks of the contracted axis a one-row float32 product is split into.
XLA_ROW_BLOCKS = 4
# The smallest weight matrix (elements) split into row blocks.
ROW_BLOCKS_MIN_SIZE = 2**16


def row_blocks(fn):
    """`fn` with its one-row float32 products by a matrix (or by per-head
    matrices) split along the contracted axis into `XLA_ROW_BLOCKS` partial
    products, run as one batched product, then summed.

    XLA:CPU runs a lone one-row product (a matrix-vector product) on one
    thread, well below the machine's memory bandwidth; the same bytes as a
    batch of 4 go near it. A batch-1 decode step is such products: Gemma 3
    270M, 2-core CPU, per step (`jax.profiler`): the 36 feed-forward
    products 20.6 -> 15.0 ms, the query, key and value products 5.0 -> 4.0
    ms; whole steps 45-47 -> 38-40 ms (16-token prompt). The split only
    reorders each sum. (4, 8 and 16 blocks measured alike.)

    `fn` is traced to a jaxpr and evaluated with those products replaced,
    inside loops, conditionals and nested calls too. Calls with a custom
    gradient (Keras' quantized products) are inlined: a decode step is
    never differentiated, and such a call's primitive cannot be bound again
    from its jaxpr's parameters.
    """
    import jax

    def split(*args):
        closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
        out = _eval_row_blocks(closed.jaxpr, closed.consts, jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(shapes), out)

    return split


# The primitives of calls with a custom gradient (`jax.custom_jvp`,
# `jax.custom_vjp`), which `row_blocks` inlines.
CUSTOM_GRADIENT_CALLS = ("custom_jvp_call", "custom_vjp_call")


def _eval_row_blocks(jaxpr, consts, args, args_given=None):
    """Evaluates `jaxpr` with its split products; `args_given[i]`: whether
    `args[i]` is a weight as stored (default: every argument)."""
    import jax
    from jax.extend import core

    env = {}

    def read(v):
        return v.val if isinstance(v, core.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    # Weights as stored; not, say, a transposed table.
    given = set(jaxpr.constvars) | {v for v, g in zip(jaxpr.invars, args_given or [True] * len(args)) if g}
    for eqn in jaxpr.eqns:
        inputs = [read(v) for v in eqn.invars]
        if eqn.primitive is jax.lax.dot_general_p and eqn.invars[1] in given and _splits(eqn):
            outputs = [_blocked_product(*inputs, **eqn.params)]
        elif eqn.primitive.name in CUSTOM_GRADIENT_CALLS:
            # Binding it again needs the functions it was traced from, which
            # its parameters no longer hold (JAX 0.10: KeyError 'subfuns');
            # its primal computation, inlined, is what it computes.
            call = eqn.params["call_jaxpr"]
            is_given = [not isinstance(v, core.Literal) and v in given for v in eqn.invars]
            outputs = _eval_row_blocks(call.jaxpr, call.consts, inputs, is_given)
        else:
            params = {name: _rewritten(value) for name, value in eqn.params.items()}
            outputs = eqn.primitive.bind(*inputs, **params)
            if not eqn.primitive.multiple_results:
                outputs = [outputs]
        env.update(zip(eqn.outvars, outputs))
    return [read(v) for v in jaxpr.outvars]


def _rewritten(param):
    """A primitive's parameter with its jaxprs (a loop's body, the branches
    of a conditional, a nested call) evaluated through `row_blocks`."""
    import jax
    from jax.extend import core

    if type(param) is tuple and any(isinstance(p, core.ClosedJaxpr) for p in param):
        return tuple(_rewritten(p) for p in param)
    if not isinstance(param, core.ClosedJaxpr):
        return param
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in param.in_avals]
    return jax.make_jaxpr(lambda *a: _eval_row_blocks(param.jaxpr, param.consts, a))(*shapes)


def _splits(eqn):
    """A float32 product of one row by a matrix (its contracted axis the
    leading free one, so blocks of it are contiguous in a stored weight),
    large enough."""
    (x_contract, w_contract), (x_batch, w_batch) = eqn.params["dimension_numbers"]
    x, w = (v.aval for v in eqn.invars)
    if len(x_contract) != 1 or x.dtype != np.float32 or w.dtype != np.float32:
        return False
    rows = math.prod(n for i, n in enumerate(x.shape) if i not in x_contract and i not in x_batch)
    w_free = [i for i in range(w.ndim) if i not in w_batch]
    return (
        rows == 1 and w_free[0] == w_contract[0] and w.shape[w_contract[0]] % XLA_ROW_BLOCKS == 0
        and math.prod(w.shape[i] for i in w_free) >= ROW_BLOCKS_MIN_SIZE
    )


def _blocked_product(x, w, dimension_numbers, **params):
    """`dot_general(x, w)` with the contracted axis split into a new batch
    axis of `XLA_ROW_BLOCKS`, summed out."""
    import jax

    ((xc,), (wc,)), (xb, wb) = dimension_numbers

    def split(a, axis):
        return a.reshape(a.shape[:axis] + (XLA_ROW_BLOCKS, a.shape[axis] // XLA_ROW_BLOCKS) + a.shape[axis + 1:])

    def moved(axes, axis):
        return tuple(i + (i > axis) for i in axes)

    numbers = (((xc + 1,), (wc + 1,)), (moved(xb, xc) + (xc,), moved(wb, wc) + (wc,)))
    out = jax.lax.dot_general(split(x, xc), split(w, wc), numbers, **params)
    return out.sum(axis=len(xb))


def top_logits(sampler):
    """How many of the largest logits `sampler` reads (greedy 1, top-k k,
    top-p with a k), or None: all of them."""
    from keras_gemma.generation import samplers

    if isinstance(sampler, samplers.GreedySampler):
        return 1
    if isinstance(sampler, (samplers.TopKSampler, samplers.TopPSampler)):
        return sampler.k
    return None


class ScreenedHead:
    """`lm` as a decode step sees it, its `decode_logits` exact only where
    the sampler's top k logits can be (`screened_logits`)."""

    def __init__(self, lm, screen, k):
        self._lm, self._screen, self._k = lm, screen, k

    def __getattr__(self, name):
        return getattr(self._lm, name)

    def decode_logits(self, hidden):
        lm = self._lm
        kernel = lm.backbone.token_embedding.embeddings
        cap, dtype = lm.config.final_logit_softcap, hidden.dtype

        def finish(raw):  # as `GemmaCausalLM.logits` does after the head's float32 product
            logits = ops.cast(ops.cast(raw, dtype), "float32")
            return logits if cap is None else ops.tanh(logits / cap) * cap

        x = ops.cast(hidden[:, 0, :], "float32")
        return screened_logits(x, kernel, self._screen, self._k, finish, lambda: lm.decode_logits(hidden))


# How many rows of the output head a screened decode step recomputes
# exactly (at least twice the sampler's k).
SCREEN_ROWS = 256


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


# -- PyTorch on CPU --------------------------------------------------------------


class TorchCpu(Tuning):
    """float32 kernels in (out, in) memory order, and products by them sent
    to oneDNN or MKL while tracing (`onednn_products`).

    Measured on the 2-core CPU, Gemma 3 270M shapes: oneDNN reads an (f, d)
    gate or up kernel 2.4x faster per decode step than a (d, f) one (~110
    against ~270 us, weights out of cache), and one row by an (out, in)
    matrix goes to MKL's matrix-vector kernel, 1.4-2x faster again.
    Assignments (`copy_`) keep the order; values are unchanged.
    """

    def __init__(self, lm):
        for layer in lm._flatten_layers():
            if isinstance(layer, keras.layers.EinsumDense):
                _store_out_in(layer)

    def tracing(self):
        return onednn_products()


def _store_out_in(dense):
    """`dense.kernel` keeps its shape and values, its memory in (out, in)
    order: the output axes of its equation first. Float32, not quantized."""
    if dense.quantization_mode is not None or dense._kernel.dtype != "float32":
        return
    inputs, _, output = dense.equation.partition("->")
    letters = inputs.split(",")[1]
    order = sorted(range(len(letters)), key=lambda i: letters[i] not in output)  # out axes, then in axes
    kernel = dense._kernel.value
    inverse = sorted(range(len(order)), key=order.__getitem__)
    if not kernel.permute(*order).is_contiguous():
        kernel.data = kernel.data.permute(*order).contiguous().permute(*inverse)


def onednn_products():
    """While tracing (or prefilling eagerly): float32 CPU products by a
    matrix, `x @ w` (`matmul`, or an `einsum` like "btd,df->btf",
    "btd,ndh->btnh" or "btNh,Nhd->btd", or a per-head `matmul` of x
    broadcast over heads), recorded as oneDNN's inner product.

    PyTorch's float32 matmul on CPU is MKL, which on the 2-core AMD EPYC
    runs its AVX2 code: 205 against 470 GFLOP/s for a (512, 640) x (640,
    2048) product, and 43 against 16 ms for Gemma 3's 262k x 640 output
    head at batch 1 (67 against 27 ms at batch 8). oneDNN's op has no
    backward; the traced functions run without gradients. A no-op context
    where oneDNN is missing (or on ARM).

    One row (a batch-1 decode step) by a matrix stored in (out, in) order
    goes instead to MKL's matrix-vector product, the matrix split into
    `ROW_BLOCKS` blocks of rows, one `bmm` that PyTorch spreads over its
    threads: oneDNN's inner product reads a single row's weights at 12-24
    GB/s on that CPU, this form at 25-46. Whole batch-1 decode steps of
    Gemma 3 270M: 72-84 -> 39-47 ms. Two to four rows by such a matrix
    take the same blocks where its input is at most `FEW_ROWS_MAX_IN`
    wide: batch-2 steps 77-90 -> 52-69 ms. A per-head ("...i,nio->...no")
    einsum by a kernel stored (n, o, i) is one product by its (n * o, i)
    matrix.
    """
    import torch

    linear = _onednn_linear()
    if linear is None:
        return contextlib.nullcontext()

    def product(x, w):
        """x (..., i) @ w (i, o), or None where oneDNN does not apply."""
        tensors = isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor)
        if not tensors or w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[0] or 0 in (*x.shape, *w.shape):
            return None
        if x.dtype != torch.float32 or w.dtype != torch.float32 or x.device.type != "cpu":
            return None
        (i, o), blocks, rows = w.shape, math.gcd(w.shape[1], ROW_BLOCKS), x.shape[:-1].numel()
        few = rows == 1 or (rows <= FEW_ROWS and i <= FEW_ROWS_MAX_IN)
        if few and w.T.is_contiguous() and blocks > 1:
            xt = x.reshape(rows, i).T.expand(blocks, i, rows)
            out = torch.bmm(w.T.reshape(blocks, o // blocks, i), xt)  # (blocks, o / blocks, rows)
            return out.reshape(o, rows).T.reshape(*x.shape[:-1], o)
        out = linear(x.reshape(-1, x.shape[-1]), w.T)
        return out.reshape(*x.shape[:-1], w.shape[1])

    def einsum(equation, x, w):
        form = einsum_form(equation)
        if form == "matrix":
            return product(x, w)
        if form == "transposed":
            return product(x, w.T)
        if form == "flat":  # "...ni,nio->...o": one (n * i, o) matrix
            return product(x.reshape(*x.shape[:-2], -1), w.reshape(-1, w.shape[-1]))
        if form == "heads" and isinstance(w, torch.Tensor) and w.transpose(1, 2).is_contiguous():
            # (n, i, o) stored as (n, o, i): one (n * o, i) matrix
            out = product(x, w.transpose(1, 2).reshape(-1, w.shape[1]).T)
            return None if out is None else out.reshape(*x.shape[:-1], w.shape[0], w.shape[2])
        return None

    def matmul(x, w):
        heads = isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and x.ndim == w.ndim == 3
        if heads and x.shape[0] == w.shape[0] and x.stride(0) == 0 and w.transpose(1, 2).is_contiguous():
            # x broadcast over heads by (n, i, o) stored as (n, o, i)
            # (`Attention._query`): one (n * o, i) matrix
            out = product(x[0], w.transpose(1, 2).reshape(-1, w.shape[1]).T)  # (rows, n * o)
            return None if out is None else out.reshape(x.shape[1], w.shape[0], w.shape[2]).transpose(0, 1)
        return product(x, w)

    class Products(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = None
            if not kwargs and func is torch.matmul and len(args) == 2:
                out = matmul(*args)
            elif not kwargs and func is torch.einsum and len(args) == 3:
                out = einsum(*args)
            return func(*args, **(kwargs or {})) if out is None else out

    return Products()


@functools.cache
def _onednn_linear():
    """The custom op `keras_gemma::onednn_linear(x, w)`, `x @ w.T` by oneDNN's
    inner product (registered once), or None without oneDNN or off x86."""
    import platform

    import torch

    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return None
    pointwise = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if pointwise is None:
        return None

    # A custom op, as `torch.jit.trace` cannot record the Scalar?[] argument
    # of oneDNN's own.
    @torch.library.custom_op("keras_gemma::onednn_linear", mutates_args=())
    def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return pointwise(x, w, None, "none", [], "")

    @linear.register_fake
    def _(x, w):
        return x.new_empty((x.shape[0], w.shape[0]))

    return linear


# One row by an (out, in)-ordered float32 matrix goes to MKL as this many
# blocks of rows (fewer where out has no such factor).
ROW_BLOCKS = 16

# 2 to FEW_ROWS rows by an (out, in)-ordered matrix with in <= FEW_ROWS_MAX_IN
# also go to MKL in row blocks (2 rows, 54 gate/up-shaped products: 19.8 ->
# 14.6 ms; down-shaped, 2048 wide, was slower that way). At 8 rows oneDNN
# was as fast or faster throughout.
FEW_ROWS = 4
FEW_ROWS_MAX_IN = 1024


def einsum_form(equation):
    """How an einsum of x by a weight w reads as matrix products (letters only):
    "matrix" "...i,io->...o"; "transposed" "...i,oi->...o" (the output
    head); "heads" "...i,nio->...no" (a matrix per head); "flat"
    "...ni,nio->...o" (heads and i contracted together); else None."""
    inputs, _, output = equation.replace(" ", "").partition("->")
    x, _, w = inputs.partition(",")
    letters = x + "".join(c for c in w if c not in x)
    if not (letters.isalpha() and len(set(letters)) == len(letters) and len(set(w)) == len(w)):
        return None
    if len(w) == 2 and x[-1:] == w[0] and output == x[:-1] + w[1]:
        return "matrix"
    if len(w) == 2 and x[-1:] == w[1] and output == x[:-1] + w[0]:
        return "transposed"
    if len(w) == 3 and x[-1:] == w[1] and w[0] not in x and output == x[:-1] + w[0] + w[2]:
        return "heads"
    if len(w) == 3 and x[-2:] == w[:2] and output == x[:-2] + w[2]:
        return "flat"
    return None
