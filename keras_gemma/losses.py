"""Causal-LM losses that never hold the whole `(batch, seq, vocab)` logits.

Gemma's output head is the tied embedding table: `logits = soft_cap(hidden
@ table.T)`. With a 262,144-token vocabulary the float32 logits of 4 x 128
tokens take 537 MB, and their gradient as much again; at 8,192 tokens on
Gemma 2 9B, 8.4 GB per sequence. Here the logits exist `chunk_size` tokens
at a time (about `CHUNK_BYTES` of them), in one of two ways:

- `chunked_head_loss` (what `fit` uses): a chunk's gradient with respect to
  its logits has a closed form (`softmax - one_hot` for cross-entropy), so
  the forward pass takes it straight on to the gradients with respect to the
  hidden states and the table, as Liger-Kernel's fused linear cross-entropy
  does, and drops the chunk. That is the two products per chunk that
  autodiff of the full logits also takes (logits, then their gradient times
  the table), without keeping either. The per-token losses it returns carry
  those gradients (`attach_gradient`), so autodiff through the backbone does
  the rest on every backend. Apple's Cut Cross-Entropy goes further on GPUs
  (a fused kernel that never writes a chunk to memory); on these chunks a
  chunk's logits stay in memory for one step of a `fori_loop`.
- `token_cross_entropy` (what `score(scoring_mode="loss")` uses): each chunk
  under `keras.remat`, so differentiating it (through any use of the
  per-token losses, the table included) recomputes one chunk at a time, and
  evaluating it costs nothing extra.

The vocabulary is not chunked: one token's float32 logits take `4 * vocab`
bytes (1 MB at 262,144), so even a 1-token chunk of a 4M-token vocabulary
fits in `CHUNK_BYTES`; splitting the vocabulary would cost a third product
(an online logsumexp over vocabulary blocks, then the gradient) for no
memory a position chunk does not already save.

Distillation reuses `chunked_head_loss` with its own per-chunk loss (for
example a soft-target cross-entropy whose targets are a teacher's logits,
computed inside `chunk_loss` from the teacher's hidden states).
"""

import keras
from keras import ops

from keras_gemma.layers import soft_cap

# One chunk's float32 logits take about this many bytes (256 tokens of
# Gemma's 262,144-token vocabulary). Each chunk reads the whole table twice,
# so smaller chunks cost time: Gemma 3 270M shapes, JAX on 2 CPU cores, a
# LoRA step of 4 x 128 tokens takes 5.1 s at 64-token chunks, 3.5 s at 256
# and 3.3 s at 512 (one chunk).
CHUNK_BYTES = 256 * 2**20


def chunk_size_for(vocabulary_size, chunk_bytes=CHUNK_BYTES):
    """Tokens per chunk whose float32 logits take about `chunk_bytes`."""
    return max(1, chunk_bytes // (4 * vocabulary_size))


def head_logits(hidden, table, softcap=None):
    """Float32 logits `(..., v)` of hidden states `(..., d)` under the table `(v, d)`."""
    logits = ops.einsum("...d,vd->...v", hidden, ops.cast(table, hidden.dtype))
    return soft_cap(ops.cast(logits, "float32"), softcap)


def attach_gradient(x, gradient, axis=-1):
    """Zero, whose gradient with respect to `x` is `gradient`.

    `sum(x * stop_gradient(g)) - stop_gradient(sum(x * g))` over `axis`
    (None: all axes): adding it to a value leaves the value and gives `x`
    the gradient `g` per unit of upstream gradient.
    """
    dot = ops.sum(ops.cast(x, "float32") * ops.stop_gradient(gradient), axis=axis)
    return dot - ops.stop_gradient(dot)


def cross_entropy_chunk(logits, targets):
    """Softmax cross-entropy of one chunk: `(loss (c,), dloss/dlogits (c, v),
    hits (c,))` from float32 logits (c, v) and int targets (c,). A hit is a
    target logit that is the largest (the argmax, but for exact ties)."""
    top = ops.max(logits, axis=-1, keepdims=True)  # (c, 1)
    log_total = ops.log(ops.sum(ops.exp(logits - top), axis=-1, keepdims=True)) + top  # (c, 1) logsumexp
    target_logit = ops.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]  # (c,)
    loss = log_total[:, 0] - target_logit
    # From the logits alone (no kept exponentials): one (c, v) buffer besides them.
    gradient = ops.exp(logits - log_total) - ops.one_hot(targets, ops.shape(logits)[-1], dtype="float32")
    hits = ops.cast(target_logit >= top[:, 0], "float32")
    return loss, gradient, hits


def chunked_head_loss(
    hidden, table, chunk_loss, targets, *, softcap=None, weights=None, chunk_size=None, table_gradient=False
):
    """Per-token losses of the output head's logits, `chunk_size` tokens at a
    time, each chunk's gradients taken in the same pass (see the module
    docstring).

    Args:
        hidden: (b, t, d) final hidden states.
        table: (v, d) the tied embedding table.
        chunk_loss: `fn(logits, *targets) -> (loss, dloss_dlogits, stat)`:
            given one chunk's float32 (soft-capped) logits (c, v) and its
            rows of each of `targets`, the per-token loss (c,), its gradient
            with respect to the logits (c, v), and a per-token float32
            statistic (c,) to report (`cross_entropy_chunk`: hits).
        targets: a tensor or tuple of tensors (b, t, ...), chunked with the
            tokens.
        softcap: the final logit soft-cap, or None.
        weights: (b, t) what the per-token losses will be weighted by before
            a linear reduction (a Keras loss's sample weights); only read
            when `table_gradient` (default: ones).
        chunk_size: tokens per chunk (default: `chunk_size_for(v)`).
        table_gradient: also give `table` its gradient (a trainable
            embedding). The forward pass then adds the (v, d) gradient up.

    Returns:
        `(losses, stats)`, each (b, t). `losses` carries its gradient with
        respect to `hidden` for any upstream gradient, and with respect to
        `table` for an upstream gradient proportional to `weights` (a
        weighted sum or mean of the losses, as `fit` takes).
    """
    hidden, table = ops.convert_to_tensor(hidden), ops.convert_to_tensor(table)
    targets = tuple(targets) if isinstance(targets, (tuple, list)) else (targets,)
    width = ops.shape(hidden)[-1]
    tokens_shape = ops.shape(hidden)[:-1]  # (b, t)
    flat_hidden = ops.reshape(hidden, (-1, width))  # (n, d)
    flat_targets = [ops.reshape(x, (-1,) + tuple(ops.shape(x)[2:])) for x in targets]
    n = ops.shape(flat_hidden)[0]  # an int, or a tensor where TensorFlow traces an unknown batch
    size = chunk_size or chunk_size_for(table.shape[0])
    size = min(size, n) if isinstance(n, int) else ops.minimum(size, n)
    count = -(-n // size)
    if weights is None:
        weights = ops.ones(tokens_shape, "float32")
    flat_weights = ops.reshape(ops.cast(weights, "float32"), (-1,))

    # The loop sees constants: autodiff records none of it (PyTorch would
    # otherwise keep every chunk's logits for a backward pass).
    constant_hidden = ops.stop_gradient(flat_hidden)
    constant_table = ops.cast(ops.stop_gradient(table), hidden.dtype)

    def rows(x, start):
        return ops.slice(x, (start,) + (0,) * (len(x.shape) - 1), (size,) + tuple(x.shape[1:]))

    def step(i, carry):
        losses, stats, hidden_gradient, table_grad = carry
        # The last chunk ends at n: it may overlap the one before (same values).
        start = ops.minimum(i * size, n - size)
        h = rows(constant_hidden, start)  # (c, d)
        logits = soft_cap(ops.cast(ops.einsum("cd,vd->cv", h, constant_table), "float32"), softcap)  # (c, v)
        loss, logits_gradient, stat = chunk_loss(logits, *(rows(x, start) for x in flat_targets))
        if softcap is not None:
            logits_gradient = logits_gradient * (1.0 - ops.square(logits / softcap))  # through cap * tanh(x / cap)
        logits_gradient = ops.cast(logits_gradient, h.dtype)
        losses = ops.slice_update(losses, (start,), loss)
        stats = ops.slice_update(stats, (start,), ops.cast(stat, "float32"))
        gradient = ops.matmul(logits_gradient, constant_table)  # (c, d)
        hidden_gradient = ops.slice_update(hidden_gradient, (start, 0), ops.cast(gradient, "float32"))
        if table_gradient:
            # Tokens an earlier chunk already counted weigh nothing here.
            fresh = ops.cast(start + ops.arange(size) >= i * size, "float32")
            weighted = logits_gradient * ops.cast(rows(flat_weights, start) * fresh, h.dtype)[:, None]
            table_grad = table_grad + ops.cast(ops.einsum("cv,cd->vd", weighted, h), "float32")
        return losses, stats, hidden_gradient, table_grad

    init = (
        ops.zeros((n,), "float32"),
        ops.zeros((n,), "float32"),
        ops.zeros((n, width), "float32"),
        ops.zeros(table.shape, "float32") if table_gradient else ops.zeros((), "float32"),
    )
    # Constants out of it too: TensorFlow's tape would otherwise ask for the
    # loop's gradient (and find none for its slice updates).
    losses, stats, hidden_gradient, table_grad = (ops.stop_gradient(x) for x in ops.fori_loop(0, count, step, init))

    losses = losses + attach_gradient(flat_hidden, hidden_gradient)
    if table_gradient:
        # Spread over the tokens so that `sum(weights * losses)` carries it once.
        losses = losses + ops.divide_no_nan(attach_gradient(table, table_grad, axis=None), ops.sum(flat_weights))
    return ops.reshape(losses, tokens_shape), ops.reshape(stats, tokens_shape)


def head_cross_entropy(hidden, table, targets, *, softcap=None, weights=None, chunk_size=None, table_gradient=False):
    """Softmax cross-entropy of each token's logits against `targets`, the
    logits `chunk_size` tokens at a time: `(losses (b, t), hits (b, t))`.
    Gradients as `chunked_head_loss` gives them."""
    return chunked_head_loss(
        hidden, table, cross_entropy_chunk, ops.cast(targets, "int32"),
        softcap=softcap, weights=weights, chunk_size=chunk_size, table_gradient=table_gradient,
    )


def token_cross_entropy(hidden, table, targets, *, softcap=None, chunk_size=None):
    """(b, t) cross-entropy of each token's logits against `targets`, exactly
    differentiable through any use (the table included): chunks of
    positions under `keras.remat`, so a gradient recomputes one chunk's
    logits at a time."""

    def chunk(h, table, y):  # (b, c, d), (v, d), (b, c)
        return keras.losses.sparse_categorical_crossentropy(y, head_logits(h, table, softcap), from_logits=True)

    chunk = keras.remat(chunk)
    batch, length = hidden.shape[0] or 1, hidden.shape[1]
    positions = max(1, (chunk_size or chunk_size_for(table.shape[0])) // batch)
    targets = ops.cast(targets, "int32")
    pieces = [
        chunk(hidden[:, start : start + positions], table, targets[:, start : start + positions])
        for start in range(0, length, positions)
    ]
    return pieces[0] if len(pieces) == 1 else ops.concatenate(pieces, axis=1)


class _Reduction(keras.losses.Loss):
    """Keras' reduction of losses computed elsewhere (`call` is the identity)."""

    def call(self, y_true, y_pred):
        return y_pred


@keras.saving.register_keras_serializable(package="keras_gemma")
class CausalLMLoss(keras.losses.SparseCategoricalCrossentropy):
    """The cross-entropy `GemmaCausalLM.compile(loss="auto")` uses: on logits,
    Keras' `SparseCategoricalCrossentropy(from_logits=True)`; in `fit`, the
    same value from the final hidden states, `chunk_size` tokens' logits at a
    time (`chunked_head_loss`), so no step holds the `(batch, seq, vocab)`
    logits or their gradient.

    Args:
        chunk_size: tokens per chunk (default: about 256 MB of float32
            logits, `chunk_size_for`).
        reduction: as Keras' losses (`"sum_over_batch_size"`: the weighted
            sum over batch x sequence; `"mean_with_sample_weight"`: over the
            weights' sum, as transformers' mean over unmasked tokens).

    Example:
    ```python
    lm.compile(optimizer=keras.optimizers.Adam(1e-4), loss=keras_gemma.losses.CausalLMLoss(chunk_size=128))
    lm.fit(x, y, sample_weight=weights)
    ```
    """

    def __init__(self, chunk_size=None, reduction="sum_over_batch_size", name="sparse_categorical_crossentropy", dtype=None):
        super().__init__(from_logits=True, reduction=reduction, name=name, dtype=dtype)
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"`chunk_size` must be a positive number of tokens, got {chunk_size!r}.")
        self.chunk_size = chunk_size

    def reduce(self, token_losses, sample_weight=None):
        """This loss's reduction of per-token losses (b, t), as `__call__`
        reduces those of logits."""
        return _Reduction(reduction=self.reduction, name=self.name, dtype=self.dtype)(
            token_losses, token_losses, sample_weight
        )

    def get_config(self):
        return {"chunk_size": self.chunk_size, "reduction": self.reduction, "name": self.name, "dtype": self.dtype}


@keras.saving.register_keras_serializable(package="keras_gemma")
class CausalLMAccuracy(keras.metrics.SparseCategoricalAccuracy):
    """`SparseCategoricalAccuracy` that `GemmaCausalLM` can also update from
    the hits `chunked_head_loss` finds, in `fit`, without full logits."""

    def update_from_hits(self, hits, sample_weight=None):
        """Counts per-token hits (b, t) of 1.0 or 0.0 under `sample_weight`."""
        keras.metrics.Mean.update_state(self, hits, sample_weight=sample_weight)
