"""The Gemma math, built only from `keras.ops` and Keras layers.

Einsum axis legend, used in every equation below:
    b: batch            t: query positions       s: key positions
    d: hidden_dim       n: query heads           k: key/value heads
    g: query heads per key/value head (n = k * g)
    h: head_dim         f: feed-forward (per-gate) width

One forward path serves training, prefill and decode: the attention layer
takes an optional fixed-shape cache (see `Attention.call`).
"""

import numpy as np

import keras
from keras import ops

from keras_gemma import products
from keras_gemma.quantization import dequantized_embeddings

# Added to masked attention logits. A finite value, so that a query with no
# visible key (a left-padding position) gets a uniform softmax, never NaN.
MASK_VALUE = -1e9


def soft_cap(x, cap):
    """`cap * tanh(x / cap)`, the Gemma 2 logit soft-cap (None: off)."""
    if cap is None:
        return x
    return ops.tanh(x / cap) * cap


class RMSNorm(keras.layers.Layer):
    """RMS normalisation with a zero-centred scale: `x * rsqrt(ms + eps) * (1 + scale)`.

    Computed in float32 whatever the compute dtype, as in HF's Gemma
    (https://github.com/huggingface/transformers/pull/29402): casting only
    after the `(1 + scale)` product matters in bfloat16.
    """

    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        self.scale = self.add_weight(
            name="scale", shape=(input_shape[-1],), initializer="zeros"
        )
        self.built = True

    def call(self, x):
        x32 = ops.cast(x, "float32")
        mean_square = ops.mean(ops.square(x32), axis=-1, keepdims=True)
        normed = x32 * ops.rsqrt(mean_square + self.epsilon)
        return ops.cast(normed * (1.0 + ops.cast(self.scale, "float32")), x.dtype)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


def rotary_tables(positions, head_dim, base, scaling):
    """cos and sin tables for rotary embedding, each (b, t, 1, h/2), float32.

    `inv_freq_i = base^(-2i/h) / scaling` (linear position scaling), computed
    in float32 as HF does so that angles at long positions agree.
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / np.float32(base) ** exponent) / np.float32(scaling)
    angles = ops.cast(positions, "float32")[:, :, None] * ops.convert_to_tensor(
        inv_freq.astype(np.float32)
    )  # (b, t, h/2)
    angles = angles[:, :, None, :]  # (b, t, 1, h/2)
    return ops.cos(angles), ops.sin(angles)


def apply_rotary(x, rotary):
    """Rotate-half (NeoX / HF) rotary embedding of x: (b, t, heads, h)."""
    cos, sin = rotary
    cos, sin = ops.cast(cos, x.dtype), ops.cast(sin, x.dtype)
    x1, x2 = ops.split(x, 2, axis=-1)  # each (b, t, heads, h/2)
    return ops.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention_mask(query_positions, key_positions, window):
    """Which keys each query may see: (b, ..., t, s) bool, from positions
    (b, ..., t) and (b, ..., s).

    A key is visible iff it is real (position >= 0; padding and empty cache
    slots carry -1), not in the future, and, for a sliding-window layer,
    `query - key < window` (the window counts the query itself).
    """
    q = query_positions[..., :, None]  # (b, ..., t, 1)
    k = key_positions[..., None, :]  # (b, ..., 1, s)
    visible = ops.logical_and(k >= 0, k <= q)
    if window is not None:
        visible = ops.logical_and(visible, (q - k) < window)
    return visible


class Projection(keras.layers.EinsumDense):
    """Keras' `EinsumDense` (no bias, no activation), its float product
    through `products.einsum`: on JAX on CPU a bfloat16 product runs XLA's
    bfloat16 kernel (see `keras_gemma/products.py`). Quantized layers keep
    Keras' own calls."""

    def call(self, inputs, training=None):
        if self.quantization_mode is not None:
            return super().call(inputs, training=training)
        return products.einsum(self.equation, inputs, self.kernel)

    def quantize(self, mode=None, type_check=True, config=None):
        # Keras refuses to quantize subclasses unless told otherwise; the
        # quantized calls are its own.
        super().quantize(mode, type_check=False, config=config)


class Attention(keras.layers.Layer):
    """Multi-head attention with GQA/MQA, rotary, optional QK-norm,
    query scaling by `query_pre_attn_scalar ** -0.5`, soft-cap and a sliding
    window, and an optional fixed-shape KV cache.

    Args:
        config: the `GemmaConfig`.
        layer_index: which block this is; picks the window.
    """

    def __init__(self, config, layer_index, **kwargs):
        super().__init__(**kwargs)
        self.num_query_heads = config.num_query_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.hidden_dim = config.hidden_dim
        self.window = config.window(layer_index)
        self.query_scale = float(config.query_pre_attn_scalar) ** -0.5
        self.logit_softcap = config.attention_logit_softcap
        n, k, h, d = self.num_query_heads, self.num_key_value_heads, self.head_dim, self.hidden_dim
        dense = dict(dtype=self.dtype_policy, kernel_initializer="glorot_uniform")
        self.query_dense = Projection("btd,ndh->btnh", (None, n, h), name="query", **dense)
        self.key_dense = Projection("bsd,kdh->bskh", (None, k, h), name="key", **dense)
        self.value_dense = Projection("bsd,kdh->bskh", (None, k, h), name="value", **dense)
        # Query heads are spelled "N" here: jax.numpy.einsum lists contracted
        # axes alphabetically, and "N" < "h" keeps them in the kernel's
        # (n, h, d) memory order; with "n" XLA transposes the kernel on every
        # call (every layer, every decode step).
        self.output_dense = Projection("btNh,Nhd->btd", (None, d), name="output", **dense)
        self.query_norm = self.key_norm = None
        if config.use_qk_norm:
            eps = config.layer_norm_epsilon
            self.query_norm = RMSNorm(eps, name="query_norm", dtype=self.dtype_policy)
            self.key_norm = RMSNorm(eps, name="key_norm", dtype=self.dtype_policy)

    def build(self, input_shape=None):
        x_shape = (None, None, self.hidden_dim)
        for dense in (self.query_dense, self.key_dense, self.value_dense):
            dense.build(x_shape)
        self.output_dense.build((None, None, self.num_query_heads, self.head_dim))
        if self.query_norm is not None:
            self.query_norm.build((self.head_dim,))
            self.key_norm.build((self.head_dim,))
        for dense in (self.query_dense, self.key_dense, self.value_dense):
            products.store_in_order(dense, HEADS_IN_ORDER)
        products.store_in_order(self.output_dense, HEADS_OUT_ORDER)
        self.built = True

    def cache_length(self, max_length):
        """Cache slots this layer needs: a window-sized ring for local layers."""
        return max_length if self.window is None else min(self.window, max_length)

    def call(
        self, x, rotary, query_positions, key_positions, cache=None, cache_index=None, training=None, last_only=False
    ):
        """Attends x (b, t, d) to itself, or to the cache.

        Args:
            x: (b, t, d) normalised hidden states.
            rotary: (cos, sin) tables for these positions.
            query_positions: (b, t) int rotary positions of x.
            key_positions: (b, t) the same, -1 where x is padding.
            cache: None, or `(keys, values, positions)` of shapes
                (b, k, h, c), (b, k, h, c), (b, c) for c cache slots. Without
                `cache_index` the cache must be empty (the prompt's first
                chunk): x attends to itself. With it (a decode step, or a
                later chunk of the prompt) x attends to the cache as it was
                and to its own keys. Either way x's keys are then written,
                index i at slot `i % c` (a window-sized ring keeps the last
                c); a decode step's in the given tensors on PyTorch without
                gradients (`products.writes_in_place`).
            cache_index: scalar int, the index of x's first position in the
                padded sequence; None for the first chunk (index 0).
            last_only: only x's last column queries (keys and values are
                still every column's, for the cache): output (b, 1, d).

        Returns:
            `(output (b, t, d), updated cache or None)`.
        """
        q = self._project_in(self.query_dense, x[:, -1:] if last_only else x)  # (b, t, n, h)
        k = self._project_in(self.key_dense, x)  # (b, t, k, h)
        v = self._project_in(self.value_dense, x)  # (b, t, k, h)
        if self.query_norm is not None:
            q = self.query_norm(q)
            k = self.key_norm(k)
        if last_only:
            query_positions = query_positions[:, -1:]
            q = apply_rotary(q, tuple(table[:, -1:] for table in rotary))
        else:
            q = apply_rotary(q, rotary)
        k = apply_rotary(k, rotary)
        q = q * ops.cast(self.query_scale, q.dtype)
        k = ops.transpose(k, (0, 2, 3, 1))  # (b, k, h, t), the cache's order
        v = ops.transpose(v, (0, 2, 3, 1))  # (b, k, h, t)

        segments = [(k, v, key_positions)]
        step = x.shape[1] == 1 and cache_index is not None
        in_place = step and products.writes_in_place()
        if cache is not None and in_place:
            # Write the key into the cache, then attend to the cache alone.
            cache = self._write_step(cache, k, v, key_positions, cache_index, in_place=True)
            segments = [cache]
        elif cache is not None and cache_index is not None:
            # Attend to the cache as it was plus the new keys, and write the
            # keys for later (below). Reading the updated cache instead
            # makes XLA copy every layer's cache on every step, and a
            # prompt chunk's keys could overwrite ring slots its own first
            # queries still see. The slots being overwritten are invisible
            # to later queries: empty or left padding (a global layer, see
            # `engine.Batch.cache_length`) or `window` or more positions
            # back (a ring).
            segments = [cache] + segments
        if len(segments) == 1 and self._by_blocks(q.shape[1]):
            out = self._attend_blocks(q, query_positions, *segments[0])
        else:
            out = self._attend(q, query_positions, segments)  # (b, t, n, h)
        if cache is not None and step and not in_place:
            if products.orders_cache_write(cache[0].dtype):
                cache_index = _after(cache_index, out)
            cache = self._write_step(cache, k, v, key_positions, cache_index)
        elif cache is not None and cache_index is None:
            cache = self._write_first(cache, k, v, key_positions)
        elif cache is not None and not step:
            cache = self._write_chunk(cache, k, v, key_positions, cache_index)
        return self._project_out(out), cache

    # A decode step (t == 1) multiplies by each head's kernel slice on its
    # own: a matmul batched over heads, `(heads, b, d) x (heads, d, h)`. The
    # einsum form makes XLA (TensorFlow's most) transpose the kernel or run
    # a slow matrix-vector product on every step; per head, each slice is
    # already a contiguous matrix. The query, key and value kernels take
    # short prefills the same way (`PER_HEAD_ROWS`). Longer inputs keep the
    # einsum: broadcasting x over heads would cost memory there. Quantized
    # layers use their own call. A kernel read from an (out, in) copy
    # (`products.reads_out_in`: JAX, bfloat16, batch 1) is one product by
    # that matrix instead.

    @staticmethod
    def _per_head(dense, x):
        return x.shape[1] == 1 and dense.quantization_mode is None

    def _project_in(self, dense, x):
        """x (b, t, d) through an (heads, d, h) kernel: (b, t, heads, h)."""
        b, t = x.shape[0], x.shape[1]  # static; None where not known
        rows = None if b is None or t is None else b * t
        if dense.quantization_mode is not None or rows is None or rows > PER_HEAD_ROWS:
            return dense(x)
        if products.stored_in_order(dense, HEADS_IN_ORDER):
            return dense(x)  # one product over all heads (PyTorch)
        if rows == 1 and products.reads_out_in(dense):
            out = products.times_out_in(ops.reshape(x, (1, self.hidden_dim)), dense.kernel, HEADS_IN_ORDER)
            return ops.reshape(out, (b, t, -1, self.head_dim))
        kernel = ops.cast(dense.kernel, x.dtype)  # (heads, d, h), LoRA included
        heads = kernel.shape[0]
        x = ops.broadcast_to(ops.reshape(x, (1, rows, self.hidden_dim)), (heads, rows, self.hidden_dim))
        out = products.matmul(x, kernel)  # (heads, rows, h)
        return ops.reshape(ops.transpose(out, (1, 0, 2)), (b, t, heads, self.head_dim))

    def _project_out(self, x):
        """x (b, t, n, h) through the (n, h, d) output kernel: (b, t, d)."""
        dense = self.output_dense
        if not self._per_head(dense, x) or products.stored_in_order(dense, HEADS_OUT_ORDER):
            return dense(x)
        if x.shape[0] == 1 and products.reads_out_in(dense):
            return products.times_out_in(ops.reshape(x, (1, -1)), dense.kernel, HEADS_OUT_ORDER)[:, None]
        kernel = ops.cast(dense.kernel, x.dtype)  # (n, h, d)
        out = products.matmul(ops.transpose(x[:, 0], (1, 0, 2)), kernel)  # (n, b, d)
        return ops.sum(out, axis=0)[:, None]  # (b, 1, d)

    def _attend(self, q, query_positions, segments):
        """Softmax attention of q (b, t, n, h) over the keys of all segments,
        each `(keys (b, k, h, s_i), values (b, k, h, s_i), positions (b, s_i))`."""
        b, t = ops.shape(q)[0], ops.shape(q)[1]
        k, g, h = self.num_key_value_heads, self.num_query_heads // self.num_key_value_heads, self.head_dim
        if t == 1 and products.attends_one_query_by_matmul():
            # One query position as plain batched matmuls, each operand in
            # its stored order.
            q = ops.reshape(q, (b, k, g, h))

            def scores(keys):  # (b, k, g, 1, s)
                return ops.matmul(q, keys)[:, :, :, None, :]

            def mix(probs, values):  # (b, 1, k, g, h)
                out = ops.matmul(values, ops.transpose(probs[:, :, :, 0, :], (0, 1, 3, 2)))  # (b, k, h, g)
                return ops.transpose(out, (0, 1, 3, 2))[:, None]
        else:
            q = ops.reshape(q, (b, t, k, g, h))

            def scores(keys):
                return products.einsum("bkhs,btkgh->bkgts", keys, q)

            def mix(probs, values):
                return products.einsum("bkgts,bkhs->btkgh", probs, values)

        logits = ops.concatenate([scores(keys) for keys, _, _ in segments], axis=-1)  # (b, k, g, t, s)
        key_positions = ops.concatenate([positions for _, _, positions in segments], axis=-1)  # (b, s)
        visible = attention_mask(query_positions, key_positions, self.window)  # (b, t, s)
        logits = self._masked(logits, visible[:, None, None, :, :])
        probs = ops.cast(ops.softmax(logits, axis=-1), q.dtype)  # (b, k, g, t, s)
        out, start = 0, 0
        for _, values, _ in segments:
            size = values.shape[3]
            out = out + mix(probs[..., start:start + size], values)  # (b, t, k, g, h)
            start += size
        return ops.reshape(out, (b, t, self.num_query_heads, self.head_dim))  # (b, t, n, h)

    def _masked(self, logits, visible):
        """Soft-capped float32 logits, `MASK_VALUE` where a key is not visible."""
        logits = soft_cap(ops.cast(logits, "float32"), self.logit_softcap)
        return ops.where(visible, logits, MASK_VALUE)

    # A long input attending to itself (training, a prompt's first chunk)
    # goes by blocks of queries (`attention_block`), each against the keys
    # it can see by column: up to its own last and, in a sliding-window
    # layer, from `window - 1` before its first (positions never decrease
    # along a row, see `GemmaBackbone.hidden_states`). The full form
    # computes and masks t x t scores, more than half of them for keys
    # later than the query. Each block's products are plain matmuls, the
    # queries of a key head's group as rows: for one 512-token layer of
    # Gemma 3 270M on JAX, 2-core CPU, 9.1 ms as full einsums, 5.8 as full
    # matmuls, 4.1 by blocks of 128; a global layer at 2048 tokens 151 ->
    # 76 ms, a local one 71 -> 43 (by the query-block windows this
    # replaced).

    def _by_blocks(self, t):
        return t is not None and t >= 2 * attention_block(t)

    def _attend_blocks(self, q, query_positions, keys, values, key_positions):
        """`_attend` of q (b, t, n, h) over its own keys and values
        (b, k, h, t), by blocks of queries."""
        b, t = ops.shape(q)[0], q.shape[1]
        k, g, h = self.num_key_value_heads, self.num_query_heads // self.num_key_value_heads, self.head_dim
        size = attention_block(t)
        q = ops.transpose(ops.reshape(q, (b, t, k, g, h)), (0, 2, 3, 1, 4))  # (b, k, g, t, h)
        outs = []
        for start in range(0, t, size):
            end = min(start + size, t)
            first = 0 if self.window is None else max(0, start - self.window + 1)
            rows, span = end - start, end - first
            logits = products.matmul(ops.reshape(q[:, :, :, start:end], (b, k, g * rows, h)), keys[..., first:end])
            visible = attention_mask(query_positions[:, start:end], key_positions[:, first:end], self.window)
            logits = self._masked(ops.reshape(logits, (b, k, g, rows, span)), visible[:, None, None])
            probs = ops.cast(ops.softmax(logits, axis=-1), q.dtype)  # (b, k, g, rows, span)
            out = products.matmul(
                ops.reshape(probs, (b, k, g * rows, span)), ops.transpose(values[..., first:end], (0, 1, 3, 2))
            )  # (b, k, g * rows, h)
            outs.append(ops.reshape(out, (b, k, g, rows, h)))
        out = ops.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]  # (b, k, g, t, h)
        return ops.reshape(ops.transpose(out, (0, 3, 1, 2, 4)), (b, t, self.num_query_heads, h))

    def _write_first(self, cache, k, v, key_positions):
        """The first chunk's keys into slots 0.. (a shorter ring keeps the
        last c, rolled so index i sits at slot `i % c`). Static positions:
        on JAX a 512-token prompt's first token came ~10 ms sooner than by
        `_write_chunk`'s gather."""
        slots, t = cache[0].shape[3], k.shape[3]
        if t > slots:
            shift = t % slots
            k, v = (ops.roll(a[..., t - slots:], shift, axis=3) for a in (k, v))
            key_positions = ops.roll(key_positions[:, t - slots:], shift, axis=1)
        return self._write(cache, k, v, key_positions, ops.zeros((), "int32"))

    @staticmethod
    def _write_chunk(cache, k, v, key_positions, cache_index):
        """k, v (b, k, h, t) and positions (b, t) of indices `cache_index`..
        into the cache, index i at slot `i % c`: each slot takes the last new
        index that maps to it (a ring shorter than t keeps the last c), else
        keeps what it held. One gather, so a chunk may wrap the ring."""
        slots, t = cache[0].shape[3], k.shape[3]
        last = ops.cast(cache_index, "int32") + t - 1
        source = last - (last - ops.arange(slots, dtype="int32")) % slots  # (c,) newest index at each slot
        offset = source - ops.cast(cache_index, "int32")  # (c,) its column in x, < 0: none
        new = offset >= 0
        offset = ops.maximum(offset, 0)

        def put(array, update):
            return ops.where(new, ops.take(ops.cast(update, array.dtype), offset, axis=-1), array)

        cache_keys, cache_values, cache_positions = cache
        return put(cache_keys, k), put(cache_values, v), put(cache_positions, key_positions)

    def _write_step(self, cache, k, v, key_positions, cache_index, in_place=False):
        slot = ops.cast(cache_index, "int32") % cache[0].shape[3]
        return self._write(cache, k, v, key_positions, slot, in_place)

    @staticmethod
    def _write(cache, k, v, key_positions, slot, in_place=False):
        """k, v (b, k, h, t) and positions (b, t) into the cache from `slot` on;
        `in_place` (one slot, PyTorch: `products.writes_in_place`) writes into
        the cache's own tensors and returns them."""
        zero = ops.zeros((), "int32")

        def put(array, update):  # along the slot (last) axis
            update = ops.cast(update, array.dtype)
            if in_place:
                products.write_in_place(array, array.ndim - 1, slot, update)
                return array
            return ops.slice_update(array, (zero,) * (array.ndim - 1) + (slot,), update)

        cache_keys, cache_values, cache_positions = cache
        return put(cache_keys, k), put(cache_values, v), put(cache_positions, key_positions)


# Self-attention of a long input goes by blocks of this many queries
# (`Attention._attend_blocks`), or of more where that would make more than
# `MAX_ATTENTION_BLOCKS`; an input shorter than two blocks, all at once. On
# JAX, 2-core CPU, one 2048-token global layer of Gemma 3 270M took 76, 77
# and 88 ms by blocks of 256, 128 and 64; at 512 tokens 4.1 ms by 128 or 64.
ATTENTION_BLOCK = 128
MAX_ATTENTION_BLOCKS = 16


def attention_block(t):
    """How many queries of a t-long self-attention go in each block."""
    return max(ATTENTION_BLOCK, -(-t // MAX_ATTENTION_BLOCKS))


# Inputs of at most this many rows (b * t) go through the query, key and
# value kernels one head at a time (`Attention._project_in`). For more, the
# einsum's one product is worth XLA's copy of the transposed query kernel
# (2.6 MB per layer for Gemma 3 270M): a 16-token prefill spent 17 of its
# 103 ms making those copies on JAX, and one head at a time its first
# token came 12-15 ms sooner (2-core CPU, alternated runs); 8 x 16 rows
# measured the same either way.
PER_HEAD_ROWS = 64

# Memory orders of the attention kernels on PyTorch (`products.store_in_order`):
# query, key and value (heads, d, h) kernels as (heads, h, d), the output
# (n, h, d) kernel as (d, n, h); each then reads as one (out, in) matrix.
HEADS_IN_ORDER = (0, 2, 1)
HEADS_OUT_ORDER = (2, 0, 1)


def _after(index, x):
    """`index` unchanged, but computed from `x`: whatever uses it (a cache
    write) is ordered after x and so after everything x read.

    `min(isnan(..), 0)` is 0 for every value, NaN included, and no
    compiler folds it away."""
    return index + ops.minimum(ops.cast(ops.isnan(ops.ravel(x)[0]), "int32"), 0)


def _project(dense, x):
    """x (b, t, d) through a (d, f) `Projection`; a single token (b = t = 1)
    by `products.times_out_in` from an (f, d) copy, or by `products.matmul`
    where that splits the product into row blocks."""
    if x.shape[0] == x.shape[1] == 1 and products.reads_out_in(dense):
        return products.times_out_in(x[0], dense.kernel, (1, 0))[None]
    if x.shape[0] == x.shape[1] == 1 and dense.quantization_mode is None and products.splits_one_row(x.dtype):
        return products.matmul(x, ops.cast(dense.kernel, x.dtype)[None])
    return dense(x)


class FeedForward(keras.layers.Layer):
    """Gated feed-forward: `down(gelu_tanh(gate(x)) * up(x))`."""

    def __init__(self, hidden_dim, intermediate_dim, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim
        dense = dict(dtype=self.dtype_policy, kernel_initializer="glorot_uniform")
        self.gate = Projection("btd,df->btf", (None, intermediate_dim), name="gate", **dense)
        self.up = Projection("btd,df->btf", (None, intermediate_dim), name="up", **dense)
        self.down = Projection("btf,fd->btd", (None, hidden_dim), name="down", **dense)
        self.intermediate_dim = intermediate_dim

    def build(self, input_shape=None):
        self.gate.build((None, None, self.hidden_dim))
        self.up.build((None, None, self.hidden_dim))
        self.down.build((None, None, self.intermediate_dim))
        for dense in (self.gate, self.up, self.down):
            products.store_in_order(dense, (1, 0))  # (f, d), (f, d), (d, f)
        self.built = True

    def call(self, x):
        gate = keras.activations.gelu(_project(self.gate, x), approximate=True)  # (b, t, f)
        return _project(self.down, gate * _project(self.up, x))  # (b, t, d)


class DecoderBlock(keras.layers.Layer):
    """One Gemma block: pre-norms always, post-norms when the config has them.

    `x += post_attention_norm(attention(pre_attention_norm(x)))`, then the
    same with the feed-forward.
    """

    def __init__(self, config, layer_index, **kwargs):
        super().__init__(**kwargs)
        eps, policy = config.layer_norm_epsilon, self.dtype_policy
        self.hidden_dim = config.hidden_dim
        self.rope = config.rope(layer_index)
        self.pre_attention_norm = RMSNorm(eps, name="pre_attention_norm", dtype=policy)
        self.attention = Attention(config, layer_index, name="attention", dtype=policy)
        self.pre_ffw_norm = RMSNorm(eps, name="pre_ffw_norm", dtype=policy)
        self.feed_forward = FeedForward(config.hidden_dim, config.intermediate_dim, name="feed_forward", dtype=policy)
        self.post_attention_norm = self.post_ffw_norm = None
        if config.use_post_norms:
            self.post_attention_norm = RMSNorm(eps, name="post_attention_norm", dtype=policy)
            self.post_ffw_norm = RMSNorm(eps, name="post_ffw_norm", dtype=policy)
        self.dropout = keras.layers.Dropout(config.dropout, dtype=policy) if config.dropout else None

    def build(self, input_shape=None):
        shape = (None, None, self.hidden_dim)
        for layer in (self.pre_attention_norm, self.attention, self.pre_ffw_norm, self.feed_forward, self.post_attention_norm, self.post_ffw_norm):
            if layer is not None:
                layer.build(shape)
        self.built = True

    def _residual_branch(self, h, post_norm, training):
        if post_norm is not None:
            h = post_norm(h)
        if self.dropout is not None:
            h = self.dropout(h, training=training)
        return h

    def call(
        self, x, rotary, query_positions, key_positions, cache=None, cache_index=None, training=None, last_only=False
    ):
        """`(x (b, t, d) through the block, updated cache)`; with `last_only`
        (a prompt chunk's last block: what follows needs only the last
        column's hidden state, and the cache every column's keys and
        values) x's last column alone after the attention: (b, 1, d)."""
        h, cache = self.attention(
            self.pre_attention_norm(x), rotary, query_positions, key_positions,
            cache=cache, cache_index=cache_index, training=training, last_only=last_only,
        )
        if last_only:
            x = x[:, -1:]
        x = x + self._residual_branch(h, self.post_attention_norm, training)
        h = self.feed_forward(self.pre_ffw_norm(x))
        x = x + self._residual_branch(h, self.post_ffw_norm, training)
        return x, cache


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

    def reverse(self, x):
        """Logits (b, t, vocab) from hidden states (b, t, d)."""
        if self.quantization_mode is None:
            kernel = ops.cast(self.embeddings, x.dtype)
        else:
            kernel = dequantized_embeddings(self, x.dtype)
        if x.shape[1] == 1:
            return products.decode_logits(kernel, x[:, 0], self.quantization_mode is not None)[:, None, :]
        return products.einsum("btd,vd->btv", x, kernel)
