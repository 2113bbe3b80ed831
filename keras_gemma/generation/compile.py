"""Backend-specific compilation of the generation functions.

The one place where generation knows its backend. The math (`engine.prefill`,
`engine.decode_step`, `engine.decode_loop`) is `keras.ops`; here it becomes:

- JAX: `jax.jit` over the model's variable values (a `StatelessScope`, so
  weights are arguments, not baked-in constants), the whole decode loop one
  `lax.while_loop`, cache and output buffers donated so updates happen in
  place.
- TensorFlow: `tf.function(jit_compile=True)` (XLA), the loop a
  `tf.while_loop` inside it.
- PyTorch: eager under `torch.inference_mode()`, a Python loop over steps.
  On CPU this measured faster than `torch.compile` (see
  `benchmarks/generate.py`), whose graph breaks in Keras' layer machinery
  and guard checks cost more per token than they save.

Each compiled function keeps its own cache keyed on input shapes (jit and
tf.function do this), and `engine` buckets shapes, so calls of similar sizes
never recompile.
"""

import functools
import warnings

import keras

from keras_gemma.generation import engine


class GenerateFunctions:
    """`prefill`, `step` and `loop` for one model and sampler, compiled.

    - `prefill(token_ids, padding_mask, cache, out, constants) -> state`
    - `step(state, constants) -> state`: one token per row (streaming).
    - `loop(state, constants) -> state`: steps until every row is done.

    `state` is `(cache, token, step, done, out)`; see `engine.decode_step`.
    """

    def __init__(self, lm, sampler):
        self.sampler = sampler
        self.variables = list(lm.variables)
        prefill = functools.partial(engine.prefill, lm, sampler)

        def step(state, constants):
            return engine.decode_step(lm, sampler, *state, constants)

        def loop(state, constants):
            return engine.decode_loop(lm, sampler, *state, constants)

        compiler = COMPILERS.get(keras.config.backend(), _eager)
        self.prefill, self.step, self.loop = compiler(self.variables, prefill, step, loop)

    def matches(self, lm, sampler):
        """Still valid: same sampler, same variables (no LoRA/quantize since)."""
        variables = lm.variables
        return sampler is self.sampler and len(variables) == len(self.variables) and all(
            a is b for a, b in zip(variables, self.variables)
        )


def _jax(variables, prefill, step, loop):
    import jax

    def stateless(fn):
        def run(values, *args):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return fn(*args)

        return run

    # Arguments after `values`: prefill(token_ids, mask, cache, out, constants).
    jit_prefill = jax.jit(stateless(prefill), donate_argnums=(3, 4))
    jit_step = jax.jit(stateless(step), donate_argnums=(1,))
    jit_loop = jax.jit(stateless(loop), donate_argnums=(1,))

    def bind(jitted):
        def call(*args):
            values = [v.value for v in variables]
            with warnings.catch_warnings():
                # CPU may decline a donation; that costs a copy, not a result.
                warnings.filterwarnings("ignore", message="Some donated buffers")
                return jitted(values, *args)

        return call

    return bind(jit_prefill), bind(jit_step), bind(jit_loop)


def _tensorflow(variables, prefill, step, loop):
    import tensorflow as tf

    def xla(fn):
        return tf.function(fn, jit_compile=True, reduce_retracing=False)

    return xla(prefill), xla(step), xla(loop)


def _torch(variables, prefill, step, loop):
    import torch

    def inference(fn):
        def call(*args):
            with torch.inference_mode():
                return fn(*args)

        return call

    return inference(prefill), inference(step), inference(loop)


def _eager(variables, prefill, step, loop):
    return prefill, step, loop


COMPILERS = {"jax": _jax, "tensorflow": _tensorflow, "torch": _torch}
