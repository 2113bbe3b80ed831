"""The Gemma math, built only from `keras.ops` and Keras layers.

Einsum axis legend, used in every equation below:
    b: batch            t: query positions       s: key positions
    d: hidden_dim       n: query heads           k: key/value heads
    g: query heads per key/value head (n = k * g)
    h: head_dim         f: feed-forward (per-gate) width   v: vocabulary
    p: per-layer input width (Gemma 4's per-layer embeddings)
    e: experts          k (in `MixtureOfExperts`): experts chosen per token
    c: an expert's (gate, up) pair

One forward path serves training, prefill and decode: the attention layer
takes an optional fixed-shape cache (see `Attention.call`).
"""

import numpy as np

import keras
from keras import ops

from keras_gemma.quantization import BankQuantizer, dequantized_embeddings

# Added to masked attention logits. A finite value, so that a query with no
# visible key (a left-padding position) gets a uniform softmax, never NaN.
MASK_VALUE = -1e9


# The largest float16 number: where float16 activations are clipped.
FLOAT16_MAX = 65504.0


def soft_cap(x, cap):
    """`cap * tanh(x / cap)`, the Gemma 2 logit soft-cap (None: off)."""
    if cap is None:
        return x
    return ops.tanh(x / cap) * cap


def rms_normalize(x, epsilon):
    """`x * rsqrt(mean(x ** 2) + epsilon)` over the last axis, in float32."""
    x32 = ops.cast(x, "float32")
    return x32 * ops.rsqrt(ops.mean(ops.square(x32), axis=-1, keepdims=True) + epsilon)


class RMSNorm(keras.layers.Layer):
    """RMS normalisation with a zero-centred scale: `x * rsqrt(ms + eps) * (1 + scale)`.

    Computed in float32 whatever the compute dtype, as in HF's Gemma
    (https://github.com/huggingface/transformers/pull/29402): casting only
    after the `(1 + scale)` product matters in bfloat16. `with_scale=False`:
    no scale at all (Gemma 4's value norm).
    """

    def __init__(self, epsilon=1e-6, with_scale=True, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon
        self.with_scale = with_scale

    def build(self, input_shape):
        if self.with_scale:
            self.scale = self.add_weight(name="scale", shape=(input_shape[-1],), initializer="zeros")
        self.built = True

    def call(self, x):
        normed = rms_normalize(x, self.epsilon)
        if self.with_scale:
            normed = normed * (1.0 + ops.cast(self.scale, "float32"))
        return ops.cast(normed, x.dtype)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon, "with_scale": self.with_scale}


def rotary_tables(positions, head_dim, base, scaling, fraction=1.0):
    """cos and sin tables for rotary embedding, each (b, t, 1, h/2), float32.

    `inv_freq_i = base^(-2i/h) / scaling` (linear position scaling), computed
    in float32 as HF does so that angles at long positions agree. With
    `fraction < 1` (Gemma 4's "proportional" rope) only the first
    `int(fraction * h // 2)` frequencies rotate; the rest are 0 (cos 1,
    sin 0: those pairs pass unrotated).
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / np.float32(base) ** exponent) / np.float32(scaling)
    inv_freq[int(fraction * head_dim // 2):] = 0.0
    angles = ops.cast(positions, "float32")[:, :, None] * ops.convert_to_tensor(inv_freq)  # (b, t, h/2)
    angles = angles[:, :, None, :]  # (b, t, 1, h/2)
    return ops.cos(angles), ops.sin(angles)


def apply_rotary(x, rotary):
    """Rotate-half (NeoX / HF) rotary embedding of x: (b, t, heads, h)."""
    cos, sin = (ops.cast(table, x.dtype) for table in rotary)
    x1, x2 = ops.split(x, 2, axis=-1)  # each (b, t, heads, h/2)
    return ops.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention_mask(query_positions, key_positions, window, query_segments=None, key_segments=None):
    """Which keys each query may see: (b, t, s) bool, from positions (b, t)
    and (b, s).

    A key is visible iff it is real (position >= 0; padding and empty cache
    slots carry -1), not in the future, for a sliding-window layer
    `query - key < window` (the window counts the query itself), and, in a
    packed row (segment ids (b, t) and (b, s)), of the query's own segment.
    """
    q = query_positions[:, :, None]  # (b, t, 1)
    k = key_positions[:, None, :]  # (b, 1, s)
    visible = ops.logical_and(k >= 0, k <= q)
    if window is not None:
        visible = ops.logical_and(visible, (q - k) < window)
    if query_segments is not None:
        visible = ops.logical_and(visible, query_segments[:, :, None] == key_segments[:, None, :])
    return visible


def ring_length(window, max_length):
    """Cache slots of a layer: `max_length`, or for a sliding-window layer a
    ring of the window rounded up to a power of two (at most `max_length`).

    A power of two, so that the generation engine's power-of-two prompt
    chunks, each starting at a multiple of its size, never wrap the ring
    (`write_cache`); slots past the window are masked out by position.
    """
    if window is None:
        return max_length
    return min(1 << (window - 1).bit_length(), max_length)


def write_cache(cache, keys, values, key_positions, index):
    """`(keys, values, positions)` of indices `index..index + t - 1` into the
    cache, index i at slot `i % c` of its c slots.

    Args:
        cache: `(keys (b, c, k, h), values (b, c, k, h), positions (b, c))`.
        keys, values: (b, t, k, h); key_positions: (b, t).
        index: scalar int, the index of the first of them.

    The t new entries must not wrap the ring: `index % c + t <= c`, or,
    where t > c (only the last c are kept, rolled into place), `index % c
    == 0`. A prompt's first chunk (index 0) always fits; the engine's later
    chunks and ring lengths (`ring_length`) guarantee it for the rest.
    """
    slots, t = cache[0].shape[1], keys.shape[1]
    if t > slots:
        keys, values, key_positions = (
            ops.roll(array[:, -slots:], t % slots, axis=1) for array in (keys, values, key_positions)
        )
    slot = ops.cast(index, "int32") % slots
    zero = ops.zeros((), "int32")

    def put(array, update):  # at `slot` along axis 1
        start = (zero, slot) + (zero,) * (array.ndim - 2)
        return ops.slice_update(array, start, ops.cast(update, array.dtype))

    return tuple(put(array, update) for array, update in zip(cache, (keys, values, key_positions)))


def _projection(equation, output_shape, name, dtype):
    """A bias-free `keras.layers.EinsumDense`: LoRA and quantization are Keras' own."""
    return keras.layers.EinsumDense(
        equation, output_shape, name=name, dtype=dtype, kernel_initializer="glorot_uniform"
    )


class Attention(keras.layers.Layer):
    """Multi-head attention with GQA/MQA, rotary, optional QK-norm, query
    scaling by `query_pre_attn_scalar ** -0.5`, an optional soft-cap and
    sliding window, and an optional fixed-shape KV cache.

    Gemma 4 adds, per layer: a head width and key/value head count of its
    own, values taken from the key projection (no value kernel), a
    scale-free norm on values, and (E2B/E4B's trailing layers) no keys or
    values at all: the layer attends to another layer's (`shared_kv`).

    Args:
        config: the `GemmaConfig`.
        layer_index: which block this is; picks the window and head shapes.
    """

    def __init__(self, config, layer_index, **kwargs):
        super().__init__(**kwargs)
        self.num_query_heads = n = config.num_query_heads
        self.num_key_value_heads = k = config.layer_key_value_heads(layer_index)
        self.head_dim = h = config.layer_head_dim(layer_index)
        self.hidden_dim = d = config.hidden_dim
        self.window = config.window(layer_index)
        self.query_scale = float(config.query_pre_attn_scalar) ** -0.5
        self.logit_softcap = config.attention_logit_softcap
        policy = self.dtype_policy
        self.shares_kv = config.layer_shares_kv(layer_index)
        self.query_dense = _projection("btd,ndh->btnh", (None, n, h), "query", policy)
        self.key_dense = self.value_dense = None  # None: another layer's keys and values
        if not self.shares_kv:
            self.key_dense = _projection("bsd,kdh->bskh", (None, k, h), "key", policy)
        if not self.shares_kv and not config.layer_keys_as_values(layer_index):  # else values are the keys
            self.value_dense = _projection("bsd,kdh->bskh", (None, k, h), "value", policy)
        # Query heads are spelled "N" here: jax.numpy.einsum orders contracted
        # axes alphabetically, and "N" < "h" keeps them in the kernel's
        # (n, h, d) memory order; with "n", XLA copies the kernel into
        # (h, n, d) order on every call (every layer, every decode step).
        self.output_dense = _projection("btNh,Nhd->btd", (None, d), "output", policy)
        self.query_norm = self.key_norm = None
        if config.use_qk_norm:
            eps = config.layer_norm_epsilon
            self.query_norm = RMSNorm(eps, name="query_norm", dtype=policy)
            if not self.shares_kv:
                self.key_norm = RMSNorm(eps, name="key_norm", dtype=policy)
        self.value_norm = None
        if config.use_value_norm:
            self.value_norm = RMSNorm(config.layer_norm_epsilon, with_scale=False, name="value_norm", dtype=policy)

    def build(self, input_shape=None):
        for dense in (self.query_dense, self.key_dense, self.value_dense):
            if dense is not None:
                dense.build((None, None, self.hidden_dim))
        self.output_dense.build((None, None, self.num_query_heads, self.head_dim))
        for norm in (self.query_norm, self.key_norm):
            if norm is not None:
                norm.build((self.head_dim,))
        self.built = True

    def cache_length(self, max_length):
        """Cache slots this layer needs (`ring_length`)."""
        return ring_length(self.window, max_length)

    def call(
        self, x, rotary, query_positions, key_positions, cache=None, cache_index=None, last_only=False, segment_ids=None,
        shared_kv=None,
    ):
        """Attends x (b, t, d) to itself, and to the cache if one is given.

        Args:
            x: (b, t, d) normalised hidden states.
            rotary: (cos, sin) tables for these positions.
            query_positions: (b, t) int rotary positions of x.
            key_positions: (b, t) the same, -1 where x is padding.
            cache: None, or `(keys, values, positions)` (see `write_cache`).
                Without `cache_index` it is empty (a prompt's first chunk).
                With it (a decode step, a later chunk of the prompt) x also
                attends to what it holds. Either way x's keys are written
                into it.
            cache_index: scalar int, the index of x's first position in the
                padded sequence; None for the first chunk (index 0).
            last_only: only x's last column queries (keys and values are
                still every column's, for the cache): output (b, 1, d).
            segment_ids: None, or (b, t) int: packed samples, each
                attending to its own segment only (no cache).
            shared_kv: for a layer that shares keys and values (no key
                kernel), the `kv` its source layer returned in this call;
                such a layer has no cache (None).

        Returns:
            `(output (b, t, d), updated cache or None, kv)`: `kv` is what
            the queries attended to, `(keys, values, positions)`: x's own
            where `cache_index` is None (no cache, or the first chunk),
            else the cache's.
        """
        q = self._query(x[:, -1:] if last_only else x)  # (b, t, n, h)
        if self.query_norm is not None:
            q = self.query_norm(q)
        query_rotary = rotary
        segments = None if segment_ids is None else (segment_ids, segment_ids)
        if last_only:
            query_positions = query_positions[:, -1:]
            segments = None if segments is None else (segment_ids[:, -1:], segment_ids)
            query_rotary = tuple(table[:, -1:] for table in rotary)
        q = apply_rotary(q, query_rotary)
        kv = shared_kv
        if not self.shares_kv:
            kv, cache = self._keys_and_values(x, rotary, key_positions, cache, cache_index)
        if cache_index is None:
            out = self.attend_itself(q, query_positions, *kv, segments)
        else:
            out = self.attend(q, query_positions, *kv)
        return self.output_dense(out), cache, kv

    def _keys_and_values(self, x, rotary, key_positions, cache, cache_index):
        """x's keys and values into the cache: `(kv, updated cache)` (see `call`)."""
        k = self.key_dense(x)  # (b, t, k, h)
        v = k if self.value_dense is None else self.value_dense(x)  # (b, t, k, h)
        if self.key_norm is not None:
            k = self.key_norm(k)
        if self.value_norm is not None:
            v = self.value_norm(v)
        k = apply_rotary(k, rotary)
        if cache is None:
            return (k, v, key_positions), None
        if cache_index is None:  # the first chunk: itself only
            return (k, v, key_positions), write_cache(cache, k, v, key_positions, 0)
        if x.shape[1] == 1:
            # A decode step: the slot it overwrites holds a key no query
            # sees any more (`window` or more back, or left padding).
            cache = write_cache(cache, k, v, key_positions, cache_index)
            return cache, cache
        # A later prompt chunk: its keys may overwrite ring slots its own
        # first queries still see, so it attends to the cache as it was and
        # to its own keys, then writes.
        kv = tuple(ops.concatenate(pair, axis=1) for pair in zip(cache, (k, v, key_positions)))
        return kv, write_cache(cache, k, v, key_positions, cache_index)

    def _query(self, x):
        """x (b, t, d) by the (n, d, h) query kernel: (b, t, n, h).

        A few rows (decode steps, short prompts) go one head at a time, a
        product batched over heads, each head's (d, h) slice a contiguous
        matrix. As one einsum, XLA copies the kernel into (d, n, h) order
        on every call (2.6 MB per layer of Gemma 3 270M, more than the
        product itself reads); for many rows that copy is small next to the
        product, and broadcasting x over the heads would not be.
        """
        dense = self.query_dense
        b, t = x.shape[0], x.shape[1]
        if dense.quantization_mode is not None or b is None or t is None or b * t > PER_HEAD_ROWS:
            return dense(x)
        kernel = ops.cast(dense.kernel, x.dtype)  # (n, d, h), LoRA included
        n = kernel.shape[0]
        x = ops.broadcast_to(ops.reshape(x, (1, b * t, self.hidden_dim)), (n, b * t, self.hidden_dim))
        out = ops.matmul(x, kernel)  # (n, b * t, h)
        return ops.reshape(ops.transpose(out, (1, 0, 2)), (b, t, n, self.head_dim))

    def attend_itself(self, q, query_positions, k, v, key_positions, segments=None):
        """`attend` of x's queries to x's own keys. A long x goes by blocks
        of queries, each attending only to the keys it can see: up to its
        own last and, in a sliding-window layer, from `window - 1` before
        its first (positions grow by one per column after left padding).
        The full form computes, then masks, the whole t x t square: more
        than half of it for a causal layer, most of it for a window much
        shorter than t. (Gemma 3 270M, float32, a 2048-token prompt on JAX,
        2-core CPU: the first token in 2.2 s by blocks against 3.8 s.)"""
        t = q.shape[1]
        if t is None or t != k.shape[1] or t < 2 * ATTENTION_BLOCK:
            return self.attend(q, query_positions, k, v, key_positions, segments)
        size = max(ATTENTION_BLOCK, -(-t // MAX_ATTENTION_BLOCKS))
        outs = []
        for start in range(0, t, size):
            end = min(start + size, t)
            first = 0 if self.window is None else max(0, start - self.window + 1)
            block = None if segments is None else (segments[0][:, start:end], segments[1][:, first:end])
            outs.append(self.attend(
                q[:, start:end], query_positions[:, start:end], k[:, first:end], v[:, first:end],
                key_positions[:, first:end], block,
            ))
        return ops.concatenate(outs, axis=1)

    def attend(self, q, query_positions, keys, values, key_positions, segments=None):
        """Softmax attention of q (b, t, n, h) over keys and values
        (b, s, k, h) at positions (b, s): (b, t, n, h). `segments`: None,
        or the queries' and keys' segment ids ((b, t), (b, s)).

        Each key/value head's g query heads are folded into the query axis,
        (b, t * g, k, h), so that grouped (GQA) and multi-query (MQA) heads
        need no copies of the keys. Without a soft-cap this is Keras'
        `dot_product_attention` (fused kernels where the device has them);
        Gemma 2's soft-capped logits go through einsums, and so does float16
        (JAX's fused attention asks for float16 products accumulated in
        float32, which XLA's CPU backend refuses).
        """
        b, t = ops.shape(q)[0], q.shape[1]
        k, h = self.num_key_value_heads, self.head_dim
        g = self.num_query_heads // k
        q = ops.reshape(ops.transpose(ops.reshape(q, (b, t, k, g, h)), (0, 1, 3, 2, 4)), (b, t * g, k, h))
        visible = attention_mask(query_positions, key_positions, self.window, *(segments or ()))  # (b, t, s)
        visible = ops.reshape(ops.repeat(visible, g, axis=1), (b, 1, t * g, -1))  # (b, 1, t * g, s)
        if self.logit_softcap is None and keras.backend.standardize_dtype(q.dtype) != "float16":
            out = ops.dot_product_attention(q, keys, values, mask=visible, scale=self.query_scale)
        else:
            logits = ops.einsum("btkh,bskh->bkts", q * ops.cast(self.query_scale, q.dtype), keys)
            logits = soft_cap(ops.cast(logits, "float32"), self.logit_softcap)
            logits = ops.where(visible, logits, MASK_VALUE)  # (b, k, t * g, s)
            probs = ops.cast(ops.softmax(logits, axis=-1), values.dtype)
            out = ops.einsum("bkts,bskh->btkh", probs, values)  # (b, t * g, k, h)
        out = ops.transpose(ops.reshape(out, (b, t, g, k, h)), (0, 1, 3, 2, 4))  # (b, t, k, g, h)
        return ops.reshape(out, (b, t, self.num_query_heads, h))  # (b, t, n, h)


# Inputs of at most this many rows (b * t) go through the query kernel one
# head at a time (`Attention._query`).
PER_HEAD_ROWS = 64

# Self-attention of 2 * ATTENTION_BLOCK queries or more goes by blocks of
# this many queries, or more where it would take more than
# MAX_ATTENTION_BLOCKS blocks (`Attention.attend_itself`).
ATTENTION_BLOCK = 128
MAX_ATTENTION_BLOCKS = 16


class FeedForward(keras.layers.Layer):
    """Gated feed-forward: `down(gelu_tanh(gate(x)) * up(x))`."""

    def __init__(self, hidden_dim, intermediate_dim, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        policy = self.dtype_policy
        self.gate = _projection("btd,df->btf", (None, intermediate_dim), "gate", policy)
        self.up = _projection("btd,df->btf", (None, intermediate_dim), "up", policy)
        self.down = _projection("btf,fd->btd", (None, hidden_dim), "down", policy)

    def build(self, input_shape=None):
        self.gate.build((None, None, self.hidden_dim))
        self.up.build((None, None, self.hidden_dim))
        self.down.build((None, None, self.intermediate_dim))
        self.built = True

    def call(self, x):
        if keras.backend.standardize_dtype(x.dtype) == "float16" and self.gate.quantization_mode is None:
            return self._float32_call(x)
        gate = keras.activations.gelu(self.gate(x), approximate=True)  # (b, t, f)
        return self.down(gate * self.up(x))  # (b, t, d)

    def _float32_call(self, x):
        """The products in float32 (the float16 weights cast as read), the
        output in float32 too: a float16 model overflows here first (the
        larger Gemmas' feed-forward activations pass float16's 65504;
        transformers returns NaN logits there). `DecoderBlock` brings the
        output back into float16's range."""
        x = ops.cast(x, "float32")
        gate = ops.einsum("btd,df->btf", x, ops.cast(self.gate.kernel, "float32"))
        up = ops.einsum("btd,df->btf", x, ops.cast(self.up.kernel, "float32"))
        hidden = keras.activations.gelu(gate, approximate=True) * up
        return ops.einsum("btf,fd->btd", hidden, ops.cast(self.down.kernel, "float32"))


class MixtureOfExperts(keras.layers.Layer):
    """Gemma 4's routed feed-forward (26B-A4B): each token goes through
    `top_k` of `num_experts` gated feed-forwards, weighted by a router.

    The router, as transformers' `Gemma4TextRouter`: the block's input,
    RMS-normalised without scale, times a stored per-channel scale and
    `hidden_dim ** -0.5`, gives expert logits; softmax over all experts (in
    float32); the top k probabilities, renormalised to sum to 1, each times
    its expert's stored scale, weight the chosen experts' outputs.

    Every shape is static on every backend (no boolean indexing). Two ways
    to dispatch, picked from the static token count t:
    - `t * k <= e` (decode steps, short prompts): the chosen experts'
      kernels are gathered per token: t * k expert products and at most
      the bank's size in weights read, where the dense way reads all of it.
    - more tokens: every expert runs on every token and a (t, e) gate
      matrix, zero outside each token's top k, weights their outputs: e / k
      times the routed products, but three einsums over whole kernels; its
      (t, e, 2, g) activations are e times one expert's (26B-A4B: 180k
      numbers a token), so long training rows want `remat`. An exact
      grouped product (tokens sorted by expert into ragged groups) has
      no static-shape `keras.ops` form.

    The expert banks and router are plain variables, not `EinsumDense`:
    LoRA leaves them frozen. `quantize` stores the banks as int8/int4
    values with scales (`quantization.BankQuantizer`), read through `bank`,
    which dequantizes only the experts it gathers; the router stays float.

    Args:
        config: the `GemmaConfig` (`num_experts`, `top_k_experts`,
            `moe_intermediate_dim`).
    """

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = config.hidden_dim
        self.num_experts = config.num_experts
        self.top_k = config.top_k_experts
        self.intermediate_dim = config.moe_intermediate_dim
        self.epsilon = config.layer_norm_epsilon
        d, e, f = self.hidden_dim, self.num_experts, self.intermediate_dim
        # Each bank is a stack of (in, out) kernels.
        self.bank_shapes = {"gate_up": (e, 2, d, f), "down": (e, f, d)}
        self.bank_quantizer = None  # a `BankQuantizer` where the banks are int8/int4

    def build(self, input_shape=None):
        d, e = self.hidden_dim, self.num_experts
        glorot = keras.initializers.GlorotUniform()
        self.router = self.add_weight(name="router", shape=(d, e), initializer=glorot)
        self.router_scale = self.add_weight(name="router_scale", shape=(d,), initializer="ones")
        self.expert_scale = self.add_weight(name="expert_scale", shape=(e,), initializer="ones")
        self._add_banks(glorot)
        self.built = True

    def _add_banks(self, initializer=None):
        """The banks' variables: float, or with `bank_quantizer` each bank's
        int8/int4 values, scales (and zero points), not trainable."""
        for name, shape in self.bank_shapes.items():
            if self.bank_quantizer is None:
                setattr(self, name, self.add_weight(name=name, shape=shape, initializer=initializer))
                continue
            for suffix, (part_shape, dtype) in self.bank_quantizer.variables(shape).items():
                part = self.add_weight(name=name + suffix, shape=part_shape, dtype=dtype, initializer="zeros", trainable=False)
                setattr(self, name + suffix, part)

    def quantize(self, mode=None, type_check=True, config=None):
        """Stores the banks as int8/int4 (`BankQuantizer.of(mode, config)`)."""
        quantizer = BankQuantizer.of(mode, config)
        stored = {name: quantizer.quantize(getattr(self, name)) for name in self.bank_shapes}
        for name in self.bank_shapes:
            delattr(self, name)  # Keras untracks the float bank
        self.bank_quantizer = quantizer
        self._add_banks()
        for name, parts in stored.items():
            for suffix, value in parts.items():
                getattr(self, name + suffix).assign(value)
        self._is_quantized = True

    def bank(self, name, dtype, experts=None):
        """Bank `name` in `dtype`, dequantized where quantized: of every
        expert, or of the chosen `experts` (b, t, k) only, (b, t, k, in, out)."""
        quantizer = self.bank_quantizer
        suffixes = ("",) if quantizer is None else tuple(quantizer.variables(self.bank_shapes[name]))
        parts = [getattr(self, name + suffix) for suffix in suffixes]
        if experts is not None:
            parts = [ops.take(part, experts, axis=0) for part in parts]
        if quantizer is None:
            return ops.cast(parts[0], dtype)
        return quantizer.dequantize(*parts, outputs=self.bank_shapes[name][-1], dtype=dtype)

    def route(self, x):
        """Each token's chosen experts (b, t, k) int and their weights (b, t, k), from x (b, t, d)."""
        scaled = ops.cast(rms_normalize(x, self.epsilon), x.dtype) * ops.cast(self.router_scale, x.dtype)
        logits = ops.einsum("btd,de->bte", scaled * self.hidden_dim ** -0.5, ops.cast(self.router, x.dtype))
        probs = ops.softmax(ops.cast(logits, "float32"), axis=-1)  # (b, t, e)
        weights, experts = ops.top_k(probs, self.top_k)  # each (b, t, k)
        weights = weights / ops.sum(weights, axis=-1, keepdims=True)
        return experts, weights * ops.take(ops.cast(self.expert_scale, "float32"), experts)

    def call(self, x, router_input):
        """The experts' output (b, t, d) for x (b, t, d) (normalised), routed by `router_input` (b, t, d)."""
        experts, weights = self.route(router_input)
        weights = ops.cast(weights, x.dtype)
        b, t = x.shape[0], x.shape[1]
        if b is not None and t is not None and b * t * self.top_k <= self.num_experts:
            return self.gathered(x, experts, weights)
        gates = ops.sum(ops.one_hot(experts, self.num_experts, dtype=x.dtype) * weights[..., None], axis=2)
        return self.dense(x, gates)  # gates (b, t, e)

    def gathered(self, x, experts, weights):
        """Only the chosen experts: kernels gathered per token."""
        gate_up = ops.einsum("btd,btkcdf->btkcf", x, self.bank("gate_up", x.dtype, experts))
        hidden = keras.activations.gelu(gate_up[..., 0, :], approximate=True) * gate_up[..., 1, :]  # (b, t, k, f)
        out = ops.einsum("btkf,btkfd->btkd", hidden, self.bank("down", x.dtype, experts))
        return ops.einsum("btkd,btk->btd", out, weights)

    def dense(self, x, gates):
        """Every expert on every token, weighted by gates (b, t, e)."""
        gate_up = ops.einsum("btd,ecdf->btecf", x, self.bank("gate_up", x.dtype))
        hidden = keras.activations.gelu(gate_up[..., 0, :], approximate=True) * gate_up[..., 1, :]  # (b, t, e, f)
        return ops.einsum("btef,efd->btd", hidden * gates[..., None], self.bank("down", x.dtype))


class DecoderBlock(keras.layers.Layer):
    """One Gemma block: pre-norms always, post-norms when the config has them.

    `x += post_attention_norm(attention(pre_attention_norm(x)))`, then the
    same with the feed-forward. With a mixture of experts (Gemma 4
    26B-A4B, as transformers' `Gemma4TextDecoderLayer`), the feed-forward
    branch is `post_dense_ffw_norm(feed_forward(pre_ffw_norm(x))) +
    post_moe_norm(moe(pre_moe_norm(x)))`, the router reading x itself. With
    per-layer embeddings (Gemma 4 E2B/E4B), then
    `x += post_per_layer_input_norm(per_layer_projection(gelu(per_layer_input_gate(x)) * per_layer_input))`;
    with a layer scalar (Gemma 4), `x *= layer_scalar`.
    """

    def __init__(self, config, layer_index, **kwargs):
        super().__init__(**kwargs)
        eps, policy = config.layer_norm_epsilon, self.dtype_policy
        self.hidden_dim = config.hidden_dim
        self.rope = config.rope(layer_index)
        self.pre_attention_norm = RMSNorm(eps, name="pre_attention_norm", dtype=policy)
        self.attention = Attention(config, layer_index, name="attention", dtype=policy)
        self.pre_ffw_norm = RMSNorm(eps, name="pre_ffw_norm", dtype=policy)
        self.feed_forward = FeedForward(
            config.hidden_dim, config.layer_intermediate_dim(layer_index), name="feed_forward", dtype=policy
        )
        self.post_attention_norm = self.post_ffw_norm = None
        if config.use_post_norms:
            self.post_attention_norm = RMSNorm(eps, name="post_attention_norm", dtype=policy)
            self.post_ffw_norm = RMSNorm(eps, name="post_ffw_norm", dtype=policy)
        self.moe = self.pre_moe_norm = self.post_moe_norm = self.post_dense_ffw_norm = None
        if config.num_experts is not None:
            self.moe = MixtureOfExperts(config, name="moe", dtype=policy)
            self.pre_moe_norm = RMSNorm(eps, name="pre_moe_norm", dtype=policy)
            self.post_moe_norm = RMSNorm(eps, name="post_moe_norm", dtype=policy)
            self.post_dense_ffw_norm = RMSNorm(eps, name="post_dense_ffw_norm", dtype=policy)
        self.dropout = keras.layers.Dropout(config.dropout, dtype=policy) if config.dropout else None
        self.use_layer_scalar = config.use_layer_scalar
        self.per_layer_input_dim = p = config.per_layer_input_dim
        self.per_layer_input_gate = self.per_layer_projection = self.post_per_layer_input_norm = None
        if p:
            self.per_layer_input_gate = _projection("btd,dp->btp", (None, p), "per_layer_input_gate", policy)
            self.per_layer_projection = _projection("btp,pd->btd", (None, config.hidden_dim), "per_layer_projection", policy)
            self.post_per_layer_input_norm = RMSNorm(eps, name="post_per_layer_input_norm", dtype=policy)

    def build(self, input_shape=None):
        if self.use_layer_scalar:  # Gemma 4: a stored constant per layer, not trained
            self.layer_scalar = self.add_weight(name="layer_scalar", shape=(1,), initializer="ones", trainable=False)
        shape = (None, None, self.hidden_dim)
        for layer in (
            self.pre_attention_norm, self.attention, self.pre_ffw_norm, self.feed_forward,
            self.post_attention_norm, self.post_ffw_norm, self.per_layer_input_gate, self.post_per_layer_input_norm,
            self.moe, self.pre_moe_norm, self.post_moe_norm, self.post_dense_ffw_norm,
        ):
            if layer is not None:
                layer.build(shape)
        if self.per_layer_projection is not None:
            self.per_layer_projection.build((None, None, self.per_layer_input_dim))
        self.built = True

    def _residual_branch(self, h, post_norm, training):
        if post_norm is not None:
            h = post_norm(h)
        if self.dropout is not None:
            h = self.dropout(h, training=training)
        return h

    def call(
        self, x, rotary, query_positions, key_positions, cache=None, cache_index=None, training=None, last_only=False,
        segment_ids=None, per_layer_input=None, shared_kv=None,
    ):
        """`(x (b, t, d) through the block, updated cache, kv)` (`kv`:
        see `Attention.call`); with `last_only` (a prompt chunk's last
        blocks: what follows needs only the last column's hidden state, and
        the cache every column's keys and values) x's last column alone
        after the attention: (b, 1, d). `per_layer_input`: (b, t, p), this
        layer's slice of the per-layer embeddings, or None."""
        h, cache, kv = self.attention(
            self.pre_attention_norm(x), rotary, query_positions, key_positions,
            cache=cache, cache_index=cache_index, last_only=last_only, segment_ids=segment_ids, shared_kv=shared_kv,
        )
        if last_only:
            x = x[:, -1:]
            per_layer_input = None if per_layer_input is None else per_layer_input[:, -1:]
        x = _finite(x + self._residual_branch(h, self.post_attention_norm, training))
        h = self.feed_forward(self.pre_ffw_norm(x))
        if self.moe is not None:
            h = self.post_dense_ffw_norm(h) + self.post_moe_norm(self.moe(self.pre_moe_norm(x), router_input=x))
        if h.dtype != x.dtype:  # float16: the feed-forward ran in float32
            h = _into_float16(h, scale_free=self.post_ffw_norm is not None)
        x = _finite(x + self._residual_branch(h, self.post_ffw_norm, training))
        if self.per_layer_input_dim:
            gate = keras.activations.gelu(self.per_layer_input_gate(x), approximate=True)  # (b, t, p)
            h = self.per_layer_projection(gate * ops.cast(per_layer_input, gate.dtype))  # (b, t, d)
            x = _finite(x + self.post_per_layer_input_norm(h))
        if self.use_layer_scalar:
            x = x * ops.cast(self.layer_scalar, x.dtype)
        return x, cache, kv


def _into_float16(h, scale_free):
    """float32 h (b, t, d) into float16's range: where a norm follows (which
    ignores scale) each position scaled down as a whole, keeping its
    direction; else clipped."""
    if scale_free:
        peak = ops.max(ops.abs(h), axis=-1, keepdims=True)
        h = h * ops.minimum(1.0, FLOAT16_MAX / 2 / ops.maximum(peak, 1.0))
    return ops.cast(ops.clip(h, -FLOAT16_MAX, FLOAT16_MAX), "float16")


def _finite(x):
    """The float16 residual stream clipped to float16's range (as keras-hub
    does for Gemma 3): an overflowing sum becomes +-65504, not inf, then
    NaN in the next norm. Other dtypes as they are."""
    if keras.backend.standardize_dtype(x.dtype) != "float16":
        return x
    return ops.clip(x, -FLOAT16_MAX, FLOAT16_MAX)


class TiedEmbedding(keras.layers.Embedding):
    """Token embedding whose transpose is also the output head.

    Quantizes with Keras' own `Embedding.quantize` (int8/int4 table plus
    scales); `reverse` then reads the dequantized table, so the head stays
    weight-only quantized (see `keras_gemma/quantization.py`).
    """

    def quantize(self, mode=None, type_check=True, config=None):
        # Keras refuses to quantize Embedding subclasses (their extra methods
        # might not know the quantized layout); `reverse` below does.
        super().quantize(mode, type_check=False, config=config)

    def table(self, dtype):
        """The (v, d) table in `dtype`, dequantized if quantized."""
        if self.quantization_mode is None:
            return ops.cast(self.embeddings, dtype)
        return dequantized_embeddings(self, dtype)

    def reverse(self, x):
        """Logits (b, t, v) from hidden states (b, t, d)."""
        return ops.einsum("btd,vd->btv", x, self.table(x.dtype))
