"""Backend-specific compilation of the generation functions.

The one place where generation knows its backend. The math (`engine.prefill_start`,
`prefill_chunk`, `first_token`, `decode_step`, `decode_loop`) is `keras.ops`;
here it becomes:

- JAX: `jax.jit` over the model's variable values (a `StatelessScope`, so
  weights are arguments, not baked-in constants), the whole decode loop one
  `lax.while_loop`, cache and output buffers donated so updates happen in
  place.
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
  minutes to compile and was slower than eager per token. The graphs run
  without TorchScript's optimizing executor
  (`torch.jit.optimized_execution(False)`), which profiled each graph's
  first call and optimized it during the second, for no gain after: Gemma 3
  270M, float32, the second call of a shape took 0.94 against 0.07 s for
  one new token after a 16-token prompt (2.0 against 0.8 s after 512
  tokens, 1.7 against 0.22 s at batch 8); first calls 0.3-4.7 s sooner,
  later calls the same. On a GPU (`compiler_class`) the decode step is
  instead compiled for the device (`_TorchCompiled`: `torch.compile`, CUDA
  graphs, the cache updated in place).

The device's tuning (`backends/cpu.py`, chosen once per model by
`GenerateFunctions`) adds what it needs: XLA options for JAX's decode loop
and the head's int8 screen on CPU, oneDNN products in PyTorch's CPU traces.

Each compiled function keeps its own cache keyed on input shapes (jit and
tf.function do this), and `prompts` buckets shapes, so calls of similar
sizes never recompile.
"""

import functools
import os
import warnings

import keras

from keras_gemma.backends import cpu
from keras_gemma.generation import engine


class GenerateFunctions:
    """The generation functions for one model and sampler, compiled.

    - `start(cache_length)(token_ids, padding_mask) -> (cache, hidden)`: the
      prompt's first chunk (`engine.prefill_start`), one function per cache
      length.
    - `chunk(token_ids, padding_mask, positions, cache_index, cache) ->
      (cache, hidden)`: a later chunk (`engine.prefill_chunk`).
    - `first_token(hidden, out, constants) -> state` without its cache
      (`engine.first_token`); for a `BeamSampler`, `first_token(hidden,
      cache, out, constants) -> state` after `repeat_beams(cache, hidden)`
      (`engine.beam_first`).
    - `step(state, constants) -> state`: one token per row (streaming).
    - `loop(state, constants) -> state`: steps until every row is done.

    `state` is an `engine.DecodeState`, or for a `BeamSampler` an
    `engine.BeamState`; `constants` an `engine.Constants`.
    """

    def __init__(self, lm, sampler):
        self.lm = lm
        self.sampler = sampler
        self.variables = list(lm.variables)
        self.config = lm.backbone.config  # replaced by `set_sliding_window`
        # Chosen once: the device's tuning (`backends/cpu.py`; none off the CPU).
        self.tuning = cpu.tuning(lm)
        self.compiler = compiler_class()(self.variables, lm.backbone.compute_dtype, self.tuning)
        self.beams = getattr(sampler, "num_beams", None)

        def model(extras):
            return self.tuning.model(lm, sampler, extras)

        def first_token(hidden, out, constants, extras):
            return engine.first_token(model(extras), sampler, hidden, out, constants)

        def step(state, constants, extras):
            if self.beams:
                return engine.beam_step(lm, sampler, state, constants)
            return engine.decode_step(model(extras), sampler, state, constants)

        def loop(state, constants, extras):
            if self.beams:
                return engine.beam_loop(lm, sampler, state, constants)
            return engine.decode_loop(model(extras), sampler, state, constants)

        self.chunk = self.compiler.chunk(functools.partial(engine.prefill_chunk, lm), donate=(4,))
        if self.beams:
            self.repeat_beams = self.compiler.step(functools.partial(engine.repeat_beams, self.beams), donate=(0,))
            self.first_token = self.compiler.step(functools.partial(engine.beam_first, lm, sampler), donate=(1, 2))
        else:
            self._first_token = self.compiler.step(first_token, donate=(1,))
        self._step = self.compiler.step(step, donate=(0,))
        self._loop = self.compiler.loop(loop, self._step)
        self.starts = {}

    def _extras(self, batch):
        return () if self.beams else self.tuning.extras(self.sampler, batch)

    def first_token(self, hidden, out, constants):
        return self._first_token(hidden, out, constants, self._extras(hidden.shape[0]))

    def step(self, state, constants):
        return self._step(state, constants, self._extras(state.token.shape[0]))

    def loop(self, state, constants):
        return self._loop(state, constants, self._extras(state.token.shape[0]))

    def start(self, cache_length):
        if cache_length not in self.starts:
            fn = functools.partial(engine.prefill_start, self.lm, cache_length)
            self.starts[cache_length] = self.compiler.prefill(fn)
        return self.starts[cache_length]

    def matches(self, lm, sampler):
        """Still valid: same sampler, same variables (no LoRA/quantize since),
        same config (no new sliding window)."""
        variables = lm.variables
        same = sampler is self.sampler and lm.backbone.config is self.config
        return same and len(variables) == len(self.variables) and all(
            a is b for a, b in zip(variables, self.variables)
        )


class _Jax:
    """`jax.jit` over the variables' values, `donate` (argument positions)
    donated; the decode loop with `_jax_loop_options`."""

    def __init__(self, variables, cache_dtype, tuning):
        self.variables = variables
        self.tuning = tuning
        self.loop_options = tuning.loop_options(cache_dtype)

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

    chunk = prefill

    def step(self, fn, donate=()):
        return self._jit(self.tuning.decode(fn), donate)

    def loop(self, fn, step):
        return self._jit(self.tuning.decode(fn), (0,), self.loop_options)


# TensorFlow runs prompt chunks wider than this without XLA.
LONG_PREFILL = 256


class _TensorFlow:
    """`tf.function` graphs, with XLA or without (see each method)."""

    def __init__(self, variables, cache_dtype, tuning):
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


def _over_flat_tensors(fn, variables, spec, structure):
    """`fn` as PyTorch's tracers take it: `(values, leaves) -> tensors`, the
    variables' values and the arguments' leaves (`spec`: their structure)
    in, the output's non-None leaves out; the output's structure and where
    its Nones were are appended to `structure`."""
    from torch.utils import _pytree as pytree

    def stateless(values, leaves):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            out, out_spec = pytree.tree_flatten(fn(*pytree.tree_unflatten(list(leaves), spec)))
        structure.append((out_spec, [x is None for x in out]))
        return tuple(x for x in out if x is not None)

    return stateless


class _Torch:
    """`torch.jit.trace` once per input shapes, weights as inputs; the loop
    in Python."""

    def __init__(self, variables, cache_dtype, tuning):
        self.variables = variables
        self.tuning = tuning

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
            flat = _over_flat_tensors(fn, variables, args, structure)

            def stateless(values, *leaves):
                return flat(values, leaves)

            with warnings.catch_warnings(), self.tuning.tracing():
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

    def _eager(self, fn):
        import torch

        def eager(*args):
            with torch.inference_mode(), self.tuning.tracing():
                return fn(*args)

        return eager

    def loop(self, fn, step):
        def python_loop(state, constants, extras):
            # The loop itself stays in Python: a host check per token is
            # cheap next to a forward pass on CPU.
            max_steps = min(int(constants.limits.max()), state.out.shape[1])
            while int(state.step) < max_steps and not bool(state.done.all()):
                state = step(state, constants, extras)
            return state

        return python_loop


# The compiled PyTorch decode loop looks at its rows on the host (a device
# synchronisation) once every this many steps, not after every token.
HOST_CHECK_EVERY = 8


class _TorchCompiled(_Torch):
    """PyTorch on a GPU (or wherever `KERAS_GEMMA_TORCH_COMPILE=1`): the
    decode step compiled for the device, as gpt-fast does.

    Per input shapes, the step is recorded as an FX graph of ATen ops
    (`make_fx`: Keras' Python runs once, while recording), its donated
    buffers (the cache, the output tokens) written in place
    (`_write_in_place`), then compiled by `torch.compile`; on CUDA in mode
    "reduce-overhead", whose CUDA graphs launch a whole step at once. The
    donated buffers a call receives are copied, once per `generate` call,
    into buffers kept per shape (CUDA graphs need fixed addresses), and the
    weights are marked static. The loop checks its rows on the host every
    `HOST_CHECK_EVERY` steps. Prompt chunks are traced as in `_Torch`
    (attention there is PyTorch's fused `scaled_dot_product_attention`)."""

    def __init__(self, variables, cache_dtype, tuning):
        super().__init__(variables, cache_dtype, tuning)
        self.cuda = variables[0].value.is_cuda
        self.mode = "reduce-overhead" if self.cuda else "default"

    def step(self, fn, donate=()):
        import torch
        from torch.fx.experimental.proxy_tensor import make_fx
        from torch.utils import _pytree as pytree

        variables, compiled = self.variables, {}

        def build(values, spec, leaves, donated):
            structure = []
            flat = _over_flat_tensors(fn, variables, spec, structure)

            def stateless(*tensors):
                return flat(tensors[: len(variables)], tensors[len(variables):])

            graph = make_fx(stateless)(*values, *leaves)
            _write_in_place(graph, [len(values) + i for i in donated])
            for value in values:
                torch._dynamo.mark_static_address(value)
            buffers = [torch.empty_like(leaves[i]) for i in donated]
            for buffer in buffers:
                torch._dynamo.mark_static_address(buffer)
            run = torch.compile(graph, mode=self.mode, fullgraph=True, dynamic=False)
            return run, buffers, structure[0]

        def call(*args):
            leaves, spec = pytree.tree_flatten(args)
            donated, start = [], 0  # the leaves of the donated arguments
            for position, arg in enumerate(args):
                count = len(pytree.tree_leaves(arg))
                donated += range(start, start + count) if position in donate else []
                start += count
            values = tuple(v.value for v in variables)
            key = _shapes(leaves)
            with torch.inference_mode():
                if key not in compiled:
                    compiled[key] = build(values, spec, leaves, donated)
                run, buffers, (structure, nones) = compiled[key]
                for i, buffer in zip(donated, buffers):
                    if leaves[i] is not buffer:  # a new call's state: into the fixed buffers
                        buffer.copy_(leaves[i])
                        leaves[i] = buffer
                if self.cuda:
                    torch.compiler.cudagraph_mark_step_begin()
                out = iter(run(*values, *leaves))
                return pytree.tree_unflatten([None if none else next(out) for none in nones], structure)

        return call

    def loop(self, fn, step):
        def python_loop(state, constants, extras):
            max_steps = min(int(constants.limits.max()), state.out.shape[1])
            steps = int(state.step)
            while steps < max_steps and not bool(state.done.all()):
                # Steps after every row is done write only padding.
                for _ in range(min(HOST_CHECK_EVERY, max_steps - steps)):
                    state = step(state, constants, extras)
                    steps += 1
            return state

        return python_loop


def _write_in_place(graph, donated):
    """Updates of donated inputs made in place: Keras' `slice_update` (the
    cache and output writes) copies its input (`clone`) and updates the
    copy; where that copy is all an input is used for, the update goes to
    the input itself, not to a fresh copy of the whole cache each step."""
    import torch

    inputs = [node for node in graph.graph.nodes if node.op == "placeholder"]
    for node in (inputs[i] for i in donated):
        users = list(node.users)
        if len(users) == 1 and users[0].target is torch.ops.aten.clone.default:
            users[0].replace_all_uses_with(node)
            graph.graph.erase_node(users[0])
    graph.recompile()


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

    def __init__(self, variables, cache_dtype, tuning):
        pass

    def prefill(self, fn, donate=()):
        return fn

    step = chunk = prefill

    def loop(self, fn, step):
        return fn


COMPILERS = {"jax": _Jax, "tensorflow": _TensorFlow, "torch": _Torch}


def compiler_class():
    """The compiler for this backend and device: on PyTorch, `_TorchCompiled`
    on a GPU (`KERAS_GEMMA_TORCH_COMPILE`: "auto", the default, "1" to use it
    on the CPU too, "0" never), else `_Torch`."""
    backend = keras.config.backend()
    if backend == "torch":
        choice = os.environ.get("KERAS_GEMMA_TORCH_COMPILE", "auto")
        if choice not in ("auto", "0", "1"):
            raise ValueError(f"KERAS_GEMMA_TORCH_COMPILE must be auto, 0 or 1, not {choice!r}.")
        if choice == "1" or (choice == "auto" and not cpu.on_cpu()):
            return _TorchCompiled
    return COMPILERS.get(backend, _Eager)
