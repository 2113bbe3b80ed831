"""Backend-specific compilation of the generation functions.

The one place where generation knows its backend. The math (`engine.prefill_start`,
`prefill_chunk`, `first_token`, `decode_step`, `decode_loop`) is `keras.ops`;
here it becomes:

- JAX: `jax.jit` over the model's variable values (a `StatelessScope`, so
  weights are arguments, not baked-in constants), the whole decode loop one
  `lax.while_loop`, cache and output buffers donated so updates happen in
  place; on CPU the loop gets its own XLA options (`_jax_loop_options`).
- TensorFlow: the decode step and loop `tf.function(jit_compile=True)` (XLA),
  the loop a `tf.while_loop` inside it; a prompt's first chunk where wider
  than `LONG_PREFILL`, and later chunks, a `tf.function` graph without XLA
  (see `_TensorFlow`).
- PyTorch: `torch.jit.trace` of prompt chunks and of one decode step, per
  input shapes, weights passed as inputs (so training or LoRA updates are
  seen); a Python loop calls the traced step; chunks wider than
  `LONG_PREFILL_TORCH`, and a later chunk's first calls of a shape
  (`TRACE_CHUNK_AFTER`), run eagerly. Tracing records only the
  torch ops, so Keras' per-layer and per-op Python overhead (most of an
  eager decode step on CPU) is gone; on the 2-core CPU it measured ~2x
  faster than eager `inference_mode`, while `torch.compile` (inductor) took
  minutes to compile and was slower than eager per token. While tracing
  (and in the eager long prefill), float32 products by a weight matrix are
  recorded as oneDNN's inner product, or at batch 1 as MKL's
  matrix-vector product in row blocks (`_onednn_products`): another
  2x per decode step on an AMD CPU, then another 1.7x. Decode steps of 3
  rows or more read oneDNN-packed copies of the weights (`kernels`). The graphs run
  without TorchScript's optimizing executor
  (`torch.jit.optimized_execution(False)`), which profiled each graph's
  first call and optimized it during the second, for no gain after: Gemma 3
  270M, float32, the second call of a shape took 0.94 against 0.07 s for
  one new token after a 16-token prompt (2.0 against 0.8 s after 512
  tokens, 1.7 against 0.22 s at batch 8); first calls 0.3-4.7 s sooner,
  later calls the same.

Each compiled function keeps its own cache keyed on input shapes (jit and
tf.function do this), and `engine` buckets shapes, so calls of similar sizes
never recompile.
"""

import contextlib
import functools
import math
import warnings

import keras

from keras_gemma import products
from keras_gemma.generation import engine
from keras_gemma.products import on_cpu


class GenerateFunctions:
    """The generation functions for one model and sampler, compiled.

    - `start(cache_length)(token_ids, padding_mask) -> (cache, hidden)`: the
      prompt's first chunk (`engine.prefill_start`), one function per cache
      length.
    - `chunk(token_ids, padding_mask, positions, cache_index, cache) ->
      (cache, hidden)`: a later chunk (`engine.prefill_chunk`).
    - `first_token(hidden, out, constants, screen) -> state` without its
      cache (`engine.first_token`); for a `BeamSampler`,
      `first_token(hidden, cache, out, constants) -> state` after
      `repeat_beams(cache, hidden)` (`engine.beam_first`).
    - `step(state, constants, screen, kernels) -> state`: one token per row
      (streaming).
    - `loop(state, constants, screen, kernels) -> state`: steps until every
      row is done.
    - `screen(batch)`, `kernels(batch)`: those arguments for a batch of that
      many rows.

    `state` is an `engine.DecodeState`, or for a `BeamSampler` an
    `engine.BeamState`; `constants` an `engine.Constants`.
    """

    def __init__(self, lm, sampler):
        self.lm = lm
        self.sampler = sampler
        self.variables = list(lm.variables)
        compiler = COMPILERS.get(keras.config.backend(), _Eager)
        self.compiler = compiler(self.variables, lm.backbone.compute_dtype)

        out_in = products.out_in_kernels(lm)
        self.beams = getattr(sampler, "num_beams", None)

        def step(state, constants, screen=(), kernels=()):
            with products.reading_out_in(out_in, kernels):
                if self.beams:
                    return engine.beam_step(lm, sampler, state, constants)
                return engine.decode_step(lm, sampler, state, constants, screen)

        def loop(state, constants, screen=(), kernels=()):
            with products.reading_out_in(out_in, kernels):
                if self.beams:
                    return engine.beam_loop(lm, sampler, state, constants)
                return engine.decode_loop(lm, sampler, state, constants, screen)

        self.chunk = self.compiler.chunk(functools.partial(engine.prefill_chunk, lm), donate=(4,))
        if self.beams:
            self.repeat_beams = self.compiler.step(functools.partial(engine.repeat_beams, self.beams), donate=(0,))
            self.first_token = self.compiler.step(functools.partial(engine.beam_first, lm, sampler), donate=(1, 2))
        else:
            self.first_token = self.compiler.step(functools.partial(engine.first_token, lm, sampler), donate=(1,))
        self.step = self.compiler.step(step, donate=(0,))
        self.loop = self.compiler.loop(loop, self.step)
        self.starts = {}
        self._screen = None  # (stamp of the table it was made from, screen)
        embedding = lm.backbone.token_embedding
        self._make_screen = self.compiler.prefill(lambda: products.screen_table(embedding.embeddings))
        self.out_in = out_in
        self._kernels = None  # (batch, stamps of the weights they were made from, copies)
        if keras.config.backend() == "jax":
            transposes = self.compiler.prefill(lambda: products.out_in_copies(out_in, 1))
            self._make_kernels = lambda batch: transposes()
        else:
            self._make_kernels = functools.partial(products.out_in_copies, out_in)

    def screen(self, batch):
        """The output head's int8 screen (`products.screen_table`) where a
        decode step of `batch` rows uses one (`products.screens_head`) and
        the sampler reads only its top logits, else `()`.

        Made on first use and kept while the table's value is the same
        array (JAX replaces a variable's array on every assignment, so
        training or loading weights makes a new screen): 100-130 ms for
        Gemma 3 270M, 168 MB held.
        """
        embedding = self.lm.backbone.token_embedding
        if self.sampler.top_logits is None or not products.screens_head(embedding, batch):
            return ()
        table = embedding.embeddings
        if self._screen is None or not products.copied_from(self._screen[0], table):
            self._screen = None  # the old screen goes before the new one is made
            self._screen = (products.copies_stamp(table), self._make_screen())
        return self._screen[1]

    def kernels(self, batch):
        """The `kernels` argument of `step` and `loop` for a batch of that
        many rows: copies of the weights that such a decode step reads
        (`products.out_in_kernels`, `reads_copies`), else `()`.

        Made on first use and kept while the weights are the same, as
        `screen` is: JAX, bfloat16, batch 1: ~0.1 s and 200 MB for Gemma 3
        270M; PyTorch, float32, batch 3 and up: ~0.3 s and 1.07 GB. Not made
        (steps read the weights as they are) where they would take more than
        half of the memory available (`products.fits_in_memory`), and let
        go when a batch that reads none comes.
        """
        if not self.out_in or not products.reads_copies(batch):
            self._kernels = None  # not held for a batch size that does not read them
            return ()
        if self._kernels is None or self._kernels[0] != batch or not all(
            products.copied_from(stamp, variable) for stamp, (variable, _, _) in zip(self._kernels[1], self.out_in)
        ):
            self._kernels = None  # the old copies go before new ones are made
            if not products.fits_in_memory(products.copies_bytes(self.out_in)):
                return ()
            stamps = [products.copies_stamp(variable) for variable, _, _ in self.out_in]
            self._kernels = (batch, stamps, tuple(self._make_kernels(batch)))
        return self._kernels[2]

    def start(self, cache_length):
        if cache_length not in self.starts:
            fn = functools.partial(engine.prefill_start, self.lm, cache_length)
            self.starts[cache_length] = self.compiler.prefill(fn)
        return self.starts[cache_length]

    def matches(self, lm, sampler):
        """Still valid: same sampler, same variables (no LoRA/quantize since)."""
        variables = lm.variables
        return sampler is self.sampler and len(variables) == len(self.variables) and all(
            a is b for a, b in zip(variables, self.variables)
        )


class _Jax:
    """`jax.jit` over the variables' values, `donate` (argument positions)
    donated; the decode loop with `_jax_loop_options`."""

    def __init__(self, variables, cache_dtype):
        self.variables = variables
        self.loop_options = _jax_loop_options(cache_dtype)

    def _jit(self, fn, donate=(), compiler_options=None):
        import jax

        variables = self.variables

        def stateless(values, *args):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return fn(*args)

        jitted = jax.jit(stateless, donate_argnums=tuple(i + 1 for i in donate), compiler_options=compiler_options)

        def call(*args):
            values = [v.value for v in variables]
            with warnings.catch_warnings():
                # CPU may decline a donation; that costs a copy, not a result.
                warnings.filterwarnings("ignore", message="Some donated buffers")
                return jitted(values, *args)

        call.jitted = jitted  # for inspection: `call.jitted.lower(values, *args)`
        return call

    def prefill(self, fn, donate=()):
        return self._jit(fn, donate)

    step = chunk = prefill

    def loop(self, fn, step):
        return self._jit(fn, (0,), self.loop_options)


def _jax_loop_options(cache_dtype):
    """XLA options for the decode loop on CPU (none elsewhere).

    - No loop-invariant code motion. XLA:CPU looks a row up in a 16-bit
      table by converting the table to float32 inside the gather's fusion,
      which reads only the rows it needs. In a `while_loop` the pass hoists
      that conversion out of the loop, so every call converted Gemma 3's
      whole 262k x 640 table first: 0.13 s and 670 MB for each `generate` in
      bfloat16 (decode ~31 -> ~27 ms per token, batch 1, with it off).
      Float32 decoding measured the same either way.
    - Copy insertion with region analysis, for a float32 cache. A step reads
      each layer's cache and writes one slot of it in place; without the
      analysis XLA copies every layer's keys, values and positions twice per
      step to keep the read safe (Gemma 3 270M, float32, alternated in one
      process: 31.9 -> 29.5 ms per step at a 2048-token context, 41.9 ->
      40.8 at batch 8). A 16-bit cache is left out: XLA:CPU rewrites the
      whole array to write one slot (through float32), and ordered after
      the reads that rewrite made bfloat16 steps 1-3.5 ms slower.
    """
    if not on_cpu():
        return None
    options = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
    if keras.backend.standardize_dtype(cache_dtype) == "float32":
        options["xla_cpu_copy_insertion_use_region_analysis"] = True
    return options


# TensorFlow runs prompt chunks wider than this without XLA.
LONG_PREFILL = 256


class _TensorFlow:
    """`tf.function` graphs, with XLA or without (see each method)."""

    def __init__(self, variables, cache_dtype):
        pass

    @staticmethod
    def _graph(fn, jit_compile):
        import tensorflow as tf

        return tf.function(fn, jit_compile=jit_compile, reduce_retracing=False)

    def prefill(self, fn, donate=()):
        # A long prefill is a few large matmuls, where TensorFlow's own
        # (oneDNN) kernels beat XLA:CPU's: on Gemma 3 270M shapes, 0.51
        # against 0.74 s for a 512-token prompt, 2.9 against 5.2 s for 2048
        # (equal at 128 and 256). Short prompts and decode steps are many
        # small ops, where XLA's fusion wins.
        xla, graph = self._graph(fn, True), self._graph(fn, False)

        def long_or_short(token_ids, *args):
            return (graph if token_ids.shape[1] > LONG_PREFILL else xla)(token_ids, *args)

        return long_or_short

    def chunk(self, fn, donate=()):
        # Later chunks (64 columns or more) without XLA too: Gemma 3 270M,
        # float32, each new chunk shape compiled in 2.5-2.8 s against ~5
        # with XLA, and ran as fast (192 columns, 128 + 64: 0.35-0.38
        # against 0.37-0.38 s; 448 columns 0.77 against 0.81-0.84).
        return self._graph(fn, False)

    def step(self, fn, donate=()):
        return self._graph(fn, True)

    def loop(self, fn, step):
        return self._graph(fn, True)


# PyTorch runs prompt chunks wider than this eagerly, not traced: a few
# large products, where Keras' per-op overhead is small. Tracing holds
# every intermediate tensor until the trace ends, and each new chunk width
# and cache length is a new trace. Gemma 3 270M shapes, batch 1, 4 new
# tokens, traced -> eager, the first call of a width then later calls:
# - float32, 1024 tokens: 8.1 -> 4.1 s, peak +766 -> +215 MB; later
#   1.9-2.1 -> 2.0-2.1 s.
# - float32, 2048 tokens: 12.5 -> 5.8 s, +1324 -> +498 MB; later
#   3.9-4.3 -> 3.9-4.0 s.
# - bfloat16, 2048 tokens: 8.9 -> 4.2 s, +1360 -> +341 MB; later
#   2.2-2.4 -> 2.5-2.8 s.
# Shorter prompts stay traced, where eager calls cost more: float32, 512
# tokens 0.94-0.99 -> 1.07-1.15 s, 320 tokens 0.64-0.67 -> 0.88-1.2 s.
LONG_PREFILL_TORCH = 512

# PyTorch runs a later prompt chunk of given shapes eagerly this many times,
# then traces it: a chunk's trace took 2.3-4 s (Gemma 3 270M, float32,
# 64-256 columns) and saves 0.1-0.2 s per later call (a 192-column prompt,
# 128 + 64: 0.46-0.53 s eager against 0.37-0.39 traced; 448 columns, 256 +
# 128 + 64: 0.94-1.04 against 0.77-0.86). Tracing once the eager calls have
# cost about what a trace does never pays more than twice the better
# choice in hindsight. A chat meets each chunk shape about once per turn:
# turns of 40 to 420 tokens, 48 new, compiled for 14.4 s in all with
# chunks eager, 23.5 s traced at once, 26 s traced from the third call.
TRACE_CHUNK_AFTER = 16


class _Torch:
    """`torch.jit.trace` once per input shapes, weights as inputs; the loop
    in Python."""

    def __init__(self, variables, cache_dtype):
        self.variables = variables

    def step(self, fn, donate=()):
        return self._traced(fn)

    def _traced(self, fn):
        """`torch.jit.trace` takes and gives only tensors in plain tuples (a
        NamedTuple would come back as a tuple, a None not at all), so each
        graph runs over the flattened arguments, and its outputs go back
        into the structure `fn` returned while tracing."""
        import torch
        from torch.utils import _pytree as pytree

        variables, graphs = self.variables, {}

        def trace(values, args, leaves):
            structure = []

            def stateless(values, *leaves):
                with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                    out, spec = pytree.tree_flatten(fn(*pytree.tree_unflatten(leaves, args)))
                structure.append((spec, [x is None for x in out]))
                return tuple(x for x in out if x is not None)

            with warnings.catch_warnings(), _onednn_products():
                # Shape checks (`x.shape[1] == 1`) become constants:
                # right, as each trace serves one set of shapes.
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
                # torch 2.9+ marks jit.trace deprecated; it still is
                # the fastest correct option here (see above).
                warnings.filterwarnings("ignore", message=".*torch.jit.trace. is deprecated")
                graph = torch.jit.trace(stateless, (values, *leaves), check_trace=False)
            return graph, structure[0]

        def call(*args):
            leaves, args = pytree.tree_flatten(args)
            values = tuple(v.value for v in variables)
            key = _shapes(leaves)
            with torch.inference_mode(), torch.jit.optimized_execution(False):
                if key not in graphs:
                    graphs[key] = trace(values, args, leaves)
                graph, (structure, nones) = graphs[key]
                out = iter(graph(values, *leaves))
                return pytree.tree_unflatten([None if none else next(out) for none in nones], structure)

        return call

    def prefill(self, fn, donate=(), later_chunk=False):
        """Traced, but eagerly where wider than `LONG_PREFILL_TORCH`, and a
        `later_chunk`'s first `TRACE_CHUNK_AFTER` calls of each shape."""
        traced, eager, calls = self._traced(fn), self._eager(fn), {}

        def call(token_ids, *args):
            key = _shapes((token_ids, *args))
            calls[key] = calls.get(key, 0) + 1
            eager_calls = TRACE_CHUNK_AFTER if later_chunk else 0
            trace = token_ids.shape[1] <= LONG_PREFILL_TORCH and calls[key] > eager_calls
            return (traced if trace else eager)(token_ids, *args)

        return call

    def chunk(self, fn, donate=()):
        return self.prefill(fn, later_chunk=True)

    @staticmethod
    def _eager(fn):
        import torch

        def eager(*args):
            with torch.inference_mode(), _onednn_products():
                return fn(*args)

        return eager

    def loop(self, fn, step):
        def python_loop(state, constants, screen=(), kernels=()):
            # The loop itself stays in Python: a host check per token is
            # cheap next to a forward pass on CPU.
            max_steps = min(int(constants.limits.max()), state.out.shape[1])
            while int(state.step) < max_steps and not bool(state.done.all()):
                state = step(state, constants, screen, kernels)
            return state

        return python_loop


def _onednn_products():
    """While tracing (or prefilling eagerly): float32 CPU products by a
    matrix, `x @ w` (`matmul`, or an `einsum` like "btd,df->btf",
    "btd,ndh->btnh" or "btNh,Nhd->btd"), recorded as oneDNN's inner product.

    PyTorch's float32 matmul on CPU is MKL, which on the 2-core AMD EPYC
    (Zen 5) this was measured on runs its AVX2 code: 205 against 470 GFLOP/s
    for a (512, 640) x (640, 2048) product, and 43 against 16 ms for Gemma
    3's 262k x 640 output head at batch 1 (67 against 27 ms at batch 8).
    oneDNN's op has no backward; the traced functions run without gradients.
    A no-op context where oneDNN is missing (or on ARM).

    One row (a batch-1 decode step) by a matrix stored in (out, in) order
    (the layers store their float32 kernels so on PyTorch, and the output
    head's table is one) goes instead to MKL's matrix-vector product, the
    matrix split into `ROW_BLOCKS` blocks of rows, one `bmm` that PyTorch
    spreads over its threads: oneDNN's inner product reads a single row's
    weights at 12-24 GB/s on that CPU, this form at 25-46 (two threads
    reach ~53). The 262k x 640 head: 27-38 -> 15-27 ms; gate/up/down,
    54 products cold: 15-17 -> 9-12 ms. Whole batch-1 decode steps of Gemma
    3 270M, alternated processes: 72-84 -> 39-47 ms; batch 8 unchanged.
    Two to four rows (a small batch) by such a matrix take the same blocks
    where its input is at most 1024 wide (`FEW_ROWS`): batch-2 steps
    77-90 -> 52-69 ms, batch 4 77-87 -> 74-82.
    A per-head ("...i,nio->...no") einsum by a kernel stored (n, o, i) is
    one product by its (n * o, i) matrix, at every row count.
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
        packed = products.packed_copy(w.T)
        if packed is not None:  # a decode step of a few rows (`products.out_in_kernels`)
            return linear(x.reshape(-1, x.shape[-1]), packed).reshape(*x.shape[:-1], w.shape[1])
        (i, o), blocks, rows = w.shape, math.gcd(w.shape[1], ROW_BLOCKS), x.shape[:-1].numel()
        few = rows == 1 or (rows <= FEW_ROWS and i <= FEW_ROWS_MAX_IN)
        if few and w.T.is_contiguous() and blocks > 1:
            # One row (or a few, `FEW_ROWS`) by an (o, i)-ordered matrix:
            # MKL's matrix-vector product by x.T, one block of rows per
            # thread (see `ROW_BLOCKS`), then back to (rows, o).
            xt = x.reshape(rows, i).T.expand(blocks, i, rows)
            out = torch.bmm(w.T.reshape(blocks, o // blocks, i), xt)  # (blocks, o / blocks, rows)
            return out.reshape(o, rows).T.reshape(*x.shape[:-1], o)
        out = linear(x.reshape(-1, x.shape[-1]), w.T)
        return out.reshape(*x.shape[:-1], w.shape[1])

    def einsum(equation, x, w):
        form = _einsum_form(equation)
        if form == "matrix":
            return product(x, w)
        if form == "flat":  # "...ni,nio->...o": one (n * i, o) matrix
            return product(x.reshape(*x.shape[:-2], -1), w.reshape(-1, w.shape[-1]))
        if form == "heads" and isinstance(w, torch.Tensor) and w.transpose(1, 2).is_contiguous():
            # (n, i, o) stored as (n, o, i): one (n * o, i) matrix
            out = product(x, w.transpose(1, 2).reshape(-1, w.shape[1]).T)
            return None if out is None else out.reshape(*x.shape[:-1], w.shape[0], w.shape[2])
        if form == "heads" and x.shape[:-1].numel() >= HEAD_PRODUCT_ROWS:  # "...i,nio->...no"
            heads = [product(x, w[j]) for j in range(w.shape[0])]
            return None if heads[0] is None else torch.stack(heads, dim=-2)
        return None

    class Products(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = None
            if not kwargs and func is torch.matmul and len(args) == 2:
                out = product(*args)
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


# A single row times an (o, i)-ordered float32 matrix goes to MKL as this
# many blocks of rows (fewer where o has no such factor), a batched
# matrix-vector product that PyTorch spreads over its threads.
ROW_BLOCKS = 16


# 2 to FEW_ROWS rows (a decode step of a small batch) by an (o, i)-ordered
# matrix with i <= FEW_ROWS_MAX_IN also go to MKL in row blocks. Measured on
# the 2-core CPU, weights out of cache, median ms, oneDNN -> blocks:
# - 2 rows: 54 gate/up-shaped (640 -> 2048) 19.8 -> 14.6; 72 key-shaped
#   (640 -> 256) 6.0 -> 2.7; 18 query-shaped (640 -> 1024) 4.0 -> 2.7;
#   18 output-shaped (1024 -> 640) 3.4 -> 3.3; the 262k x 640 head 40 -> 23.5.
# - 4 rows: 20.6 -> 13.7, 5.1 -> 3.5, 3.8 -> 3.1, 3.4 -> 3.4; head 47 -> 34.
# - Down-shaped (2048 -> 640): 17.2 -> 18.9 at 2 rows, 18.8 -> 27.7 at 4,
#   hence the bound on i. At 8 rows oneDNN was as fast or faster throughout.
FEW_ROWS = 4
FEW_ROWS_MAX_IN = 1024


# Per-head products ("btd,ndh->btnh") go to oneDNN one head at a time from
# this many rows on; below it MKL's batched matmul was faster (a decode
# step's q: 134 against 173 us per layer at batch 8; 960 against 539 at 128).
HEAD_PRODUCT_ROWS = 128


def _einsum_form(equation):
    """How an einsum of x by a weight w reads as matrix products (letters only):
    "matrix" "...i,io->...o"; "heads" "...i,nio->...no" (a matrix per head);
    "flat" "...ni,nio->...o" (heads and i contracted together); else None."""
    inputs, _, output = equation.replace(" ", "").partition("->")
    x, _, w = inputs.partition(",")
    letters = x + "".join(c for c in w if c not in x)
    if not (letters.isalpha() and len(set(letters)) == len(letters) and len(set(w)) == len(w)):
        return None
    if len(w) == 2 and x[-1:] == w[0] and output == x[:-1] + w[1]:
        return "matrix"
    if len(w) == 3 and x[-1:] == w[1] and w[0] not in x and output == x[:-1] + w[0] + w[2]:
        return "heads"
    if len(w) == 3 and x[-2:] == w[:2] and output == x[:-2] + w[2]:
        return "flat"
    return None


def _shapes(args):
    """Shapes and dtypes of the tensors in `args`: one trace's key."""
    import torch

    return tuple((tuple(x.shape), x.dtype) for x in torch.utils._pytree.tree_leaves(args))


class _Eager:
    """No compiling (another backend), and the interface every compiler has:
    `prefill` (a prompt's first chunk), `chunk` (a later one) and `step`
    each compile a function, `donate` naming the positions of arguments
    whose buffers it may reuse; `loop(fn, step)` the decode loop, given the
    compiled step."""

    def __init__(self, variables, cache_dtype):
        pass

    def prefill(self, fn, donate=()):
        return fn

    step = chunk = prefill

    def loop(self, fn, step):
        return fn


COMPILERS = {"jax": _Jax, "tensorflow": _TensorFlow, "torch": _Torch}
