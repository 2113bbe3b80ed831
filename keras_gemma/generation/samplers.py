"""Samplers: tiny objects with one method, `sampler(logits, key) -> token ids`.

Random samplers draw with the Gumbel-max trick (`argmax(logits / T + g)` with
`g = -log(-log(u))` is a draw from `softmax(logits / T)`). The uniform noise
`u` is a counter-based integer hash of (seed, step, row, column) written in
`keras.ops`, so sampling is stateless: it compiles inside every backend's
decode loop (no seed-generator state to thread through `jax.jit`), and a
given seed gives the same tokens on JAX, TensorFlow and PyTorch.

Names and defaults mirror keras-hub's (`"greedy"`, `"random"`, `"top_k"`
with k=5, `"top_p"` with p=0.1), so `lm.compile(sampler="top_k")` reads the
same.
"""

import numpy as np

import keras
from keras import ops


def _logical_shift(x, bits):
    """`x >> bits` on int32 as if unsigned (keras.ops shifts arithmetically)."""
    return ops.bitwise_and(ops.right_shift(x, bits), (1 << (32 - bits)) - 1)


def _int32(value):
    """A uint32 constant written as the int32 with the same bits."""
    return np.int32(value - (1 << 32) if value >= 1 << 31 else value)


def _hash(x):
    """lowbias32 (https://nullprogram.com/blog/2018/07/31/) on int32 bits.

    int32 products wrap around on every backend, which is the uint32
    arithmetic the hash wants.
    """
    x = ops.bitwise_xor(x, _logical_shift(x, 16))
    x = x * _int32(0x7FEB352D)
    x = ops.bitwise_xor(x, _logical_shift(x, 15))
    x = x * _int32(0x846CA68B)
    return ops.bitwise_xor(x, _logical_shift(x, 16))


def gumbel_noise(key, shape):
    """Gumbel(0, 1) noise of `shape` (batch, n), float32, from `key`.

    Args:
        key: int32 tensor (2,): (seed, step). Each (seed, step, row, column)
            gets its own draw.
        shape: static (batch, n).
    """
    batch, n = shape
    key = ops.cast(key, "int32")
    rows = ops.arange(batch, dtype="int32")[:, None]  # (b, 1)
    columns = ops.arange(n, dtype="int32")[None, :]  # (1, n)
    x = _hash(ops.bitwise_xor(_hash(key[0] + _hash(key[1])), rows * np.int32(n)) + columns)
    x = _hash(x + key[1])
    # 24 random bits -> u in (0, 1), both ends excluded.
    u = (ops.cast(_logical_shift(x, 8), "float32") + 0.5) / float(1 << 24)
    return -ops.log(-ops.log(u))


def first_argmax(logits):
    """`argmax` over the last axis (the first index on ties), as int32.

    Written as a max and a min over a 256k vocabulary: two plain reductions,
    where XLA:CPU runs `argmax`'s paired (value, index) reduction ~3x slower
    (1.5 vs 0.4 ms per row). PyTorch's `argmax` is one pass and documented
    to return the first index on ties: 0.2 against 3 ms per step at batch 8.
    """
    if keras.config.backend() == "torch":
        return ops.cast(ops.argmax(logits, axis=-1), "int32")
    vocabulary = logits.shape[-1]
    best = ops.max(logits, axis=-1, keepdims=True)
    index = ops.where(logits == best, ops.arange(vocabulary, dtype="int32"), vocabulary)
    return ops.minimum(ops.min(index, axis=-1), vocabulary - 1)  # (b,) NaN rows: the last id


class Sampler:
    """Base class: picks the next token from float32 logits (b, vocab).

    Subclasses implement `__call__(logits, key)`; `key` is an int32 (2,)
    tensor (seed, step) that random samplers turn into noise with
    `gumbel_noise`. The engine derives a fresh seed per `generate` call from
    `seed` (see `next_seed`), so a model compiled with the same seeded sampler
    repeats the same outputs call for call.

    Args:
        temperature: logits are divided by it before sampling.
        seed: int, or None for a seed drawn from NumPy's global generator
            (so `keras.utils.set_random_seed` makes it reproducible).

    Example:
    ```python
    class NoRepeatOfThree(keras_gemma.samplers.Sampler):
        def __call__(self, logits, key):
            logits = keras.ops.where(keras.ops.arange(logits.shape[-1]) == 3, -1e9, logits)
            return keras.ops.argmax(logits, axis=-1)

    lm.compile(sampler=NoRepeatOfThree())
    ```
    """

    def __init__(self, temperature=1.0, seed=None):
        if not temperature > 0:
            raise ValueError(f"`temperature` must be positive, got {temperature!r}.")
        self.temperature = float(temperature)
        self.seed = seed
        self._calls = 0

    def next_seed(self):
        """The seed for one `generate` call: fixed by `seed` and the call count."""
        if self.seed is None:
            self.seed = int(np.random.randint(0, 2**31 - 1))
        seed = np.random.SeedSequence([int(self.seed) & 0xFFFFFFFF, self._calls])
        self._calls += 1
        return int(seed.generate_state(1)[0] & 0x7FFFFFFF)

    def scaled(self, logits):
        return ops.cast(logits, "float32") / self.temperature

    def __call__(self, logits, key):
        raise NotImplementedError

    def get_config(self):
        return {"temperature": self.temperature, "seed": self.seed}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class GreedySampler(Sampler):
    """The most likely token (temperature and seed play no part).

    Example:
    ```python
    lm.compile(sampler=keras_gemma.samplers.GreedySampler())
    ```
    """

    def __call__(self, logits, key):
        return first_argmax(logits)


class RandomSampler(Sampler):
    """A draw from the whole distribution `softmax(logits / temperature)`.

    Example:
    ```python
    lm.compile(sampler=keras_gemma.samplers.RandomSampler(temperature=0.7, seed=1))
    ```
    """

    def __call__(self, logits, key):
        logits = self.scaled(logits)
        return first_argmax(logits + gumbel_noise(key, logits.shape))


class TopKSampler(Sampler):
    """A draw from the `k` most likely tokens, renormalised.

    Args:
        k: how many tokens to keep.

    Example:
    ```python
    lm.compile(sampler=keras_gemma.samplers.TopKSampler(k=40, seed=0))
    ```
    """

    def __init__(self, k=5, temperature=1.0, seed=None):
        super().__init__(temperature, seed)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"`k` must be a positive integer, got {k!r}.")
        self.k = k

    def __call__(self, logits, key):
        k = min(self.k, logits.shape[-1])
        values, indices = ops.top_k(self.scaled(logits), k=k, sorted=True)  # (b, k)
        choice = ops.argmax(values + gumbel_noise(key, values.shape), axis=-1)
        return ops.cast(ops.take_along_axis(indices, choice[:, None], axis=-1)[:, 0], "int32")

    def get_config(self):
        return {**super().get_config(), "k": self.k}


class TopPSampler(Sampler):
    """Nucleus sampling: a draw from the smallest set of most likely tokens
    whose probability adds up to at least `p`.

    A token is kept iff the probability of the tokens ranked above it is
    below `p` (so the most likely token is always kept).

    Args:
        p: the probability mass to keep, in (0, 1].
        k: optionally look only at the `k` most likely tokens first (sorting
            a 256k vocabulary every step is not free).

    Example:
    ```python
    lm.compile(sampler=keras_gemma.samplers.TopPSampler(p=0.9, seed=0))
    ```
    """

    def __init__(self, p=0.1, k=None, temperature=1.0, seed=None):
        super().__init__(temperature, seed)
        if not 0 < p <= 1:
            raise ValueError(f"`p` must be in (0, 1], got {p!r}.")
        if k is not None and (not isinstance(k, int) or k < 1):
            raise ValueError(f"`k` must be a positive integer or None, got {k!r}.")
        self.p = float(p)
        self.k = k

    def __call__(self, logits, key):
        vocab = logits.shape[-1]
        k = vocab if self.k is None else min(self.k, vocab)
        values, indices = ops.top_k(self.scaled(logits), k=k, sorted=True)  # (b, k)
        probs = ops.softmax(values, axis=-1)
        mass_above = ops.cumsum(probs, axis=-1) - probs
        values = ops.where(mass_above < self.p, values, -np.inf)
        choice = ops.argmax(values + gumbel_noise(key, values.shape), axis=-1)
        return ops.cast(ops.take_along_axis(indices, choice[:, None], axis=-1)[:, 0], "int32")

    def get_config(self):
        return {**super().get_config(), "p": self.p, "k": self.k}


class BeamSampler(Sampler):
    """Beam search, as transformers' `generate(num_beams=...)` runs it
    (with its default `early_stopping=False`): the `num_beams` likeliest
    unfinished continuations of each prompt run on, by the sum of their
    tokens' log-probabilities under `softmax(logits / temperature)`; a
    continuation that emits a stop token, or fills its budget, is finished
    and scored by that sum over `new_tokens ** length_penalty`; the best
    finished one is returned.

    keras-hub's `BeamSampler` instead keeps adding log-probabilities after a
    beam stops. Not for streaming: a later step can replace any earlier
    token.

    Args:
        num_beams: how many continuations each prompt keeps.
        length_penalty: the exponent of the length a finished continuation's
            score is divided by (above 0 favours longer ones, 0 none).

    Example:
    ```python
    lm.compile(sampler=keras_gemma.samplers.BeamSampler(num_beams=4))
    lm.generate("The capital of France is", max_new_tokens=8)
    ```
    """

    def __init__(self, num_beams=5, length_penalty=1.0, temperature=1.0, seed=None):
        super().__init__(temperature, seed)
        if not isinstance(num_beams, int) or isinstance(num_beams, bool) or num_beams < 1:
            raise ValueError(f"`num_beams` must be a positive integer, got {num_beams!r}.")
        self.num_beams = num_beams
        self.length_penalty = float(length_penalty)

    def __call__(self, logits, key):
        raise TypeError("BeamSampler picks tokens for whole beams inside `generate`, not per row.")

    def get_config(self):
        return {**super().get_config(), "num_beams": self.num_beams, "length_penalty": self.length_penalty}


SAMPLERS = {
    "greedy": GreedySampler,
    "random": RandomSampler,
    "top_k": TopKSampler,
    "top_p": TopPSampler,
    "beam": BeamSampler,
}

# keras-hub sampler classes we can stand in for, read through their configs.
_KERAS_HUB_NAMES = {
    "GreedySampler": "greedy",
    "RandomSampler": "random",
    "TopKSampler": "top_k",
    "TopPSampler": "top_p",
    "BeamSampler": "beam",
}


def get(identifier):
    """A `Sampler` from a name, a `Sampler`, a keras-hub sampler or a config dict.

    Example:
    ```python
    keras_gemma.samplers.get("top_k")  # TopKSampler(k=5)
    keras_gemma.samplers.get({"class_name": "top_p", "config": {"p": 0.9}})
    ```
    """
    if identifier is None:
        return GreedySampler()
    if isinstance(identifier, Sampler):
        return identifier
    if isinstance(identifier, str):
        if identifier not in SAMPLERS:
            raise ValueError(
                f"Unknown sampler {identifier!r}. Valid names are: "
                + ", ".join(sorted(SAMPLERS))
            )
        return SAMPLERS[identifier]()
    if isinstance(identifier, dict):
        name = identifier.get("class_name")
        config = identifier.get("config", {})
        classes = {**SAMPLERS, **{cls.__name__: cls for cls in SAMPLERS.values()}}
        if name not in classes:
            raise ValueError(f"Unknown sampler class {name!r} in {identifier!r}.")
        return classes[name].from_config(config)
    if isinstance(identifier, type) and issubclass(identifier, Sampler):
        return identifier()
    hub_name = _KERAS_HUB_NAMES.get(type(identifier).__name__)
    if hub_name is not None and hasattr(identifier, "get_config"):
        config = dict(identifier.get_config())
        if config.get("return_all_beams"):
            raise ValueError("keras-hub's `BeamSampler(return_all_beams=True)` has no keras_gemma equivalent.")
        config = {key: value for key, value in config.items() if key in ("temperature", "seed", "k", "p", "num_beams")}
        if hub_name in ("greedy",):
            config = {}
        elif hub_name == "random":
            config.pop("k", None), config.pop("p", None)
        return SAMPLERS[hub_name](**config)
    raise ValueError(
        "`sampler` must be one of "
        + ", ".join(repr(name) for name in sorted(SAMPLERS))
        + f", a keras_gemma Sampler, or a config dict; got {identifier!r}."
    )
