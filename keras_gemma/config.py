"""One frozen dataclass describes every Gemma model.

Variants are data about mechanisms (soft-caps, post-norms, QK-norm, a per-layer
tuple of attention types), never version checks. Everything a layer needs is
worked out here once, at construction.
"""

import dataclasses
import math
from typing import Optional, Tuple

GLOBAL = "global"
LOCAL = "local"
ATTENTION_TYPES = (GLOBAL, LOCAL)


def layer_pattern(num_layers, pattern):
    """Repeats `pattern` (a tuple of attention types) over `num_layers`.

    Gemma 2 is `(LOCAL, GLOBAL)` (layer 0 local); Gemma 3 is five `LOCAL`
    then one `GLOBAL` (layers 5, 11, 17, ... global).
    """
    return tuple(pattern[i % len(pattern)] for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """The architecture of one Gemma model.

    Args:
        vocabulary_size: number of token ids.
        num_layers: number of decoder blocks.
        hidden_dim: width of the residual stream.
        num_query_heads: attention query heads.
        num_key_value_heads: key/value heads (1 = MQA, < query heads = GQA).
        head_dim: width of one attention head.
        intermediate_dim: width of each feed-forward gate (HF
            `intermediate_size`; keras-hub's Gemma 1/2 number is twice this).
        layer_types: per-layer attention type, `"global"` or `"local"`
            (sliding window). Defaults to all global.
        sliding_window_size: keys seen by a local layer, the query included.
        query_pre_attn_scalar: queries are scaled by `scalar ** -0.5`.
            Defaults to `head_dim`.
        attention_logit_softcap: `cap * tanh(logits / cap)` on attention
            logits, or None for off.
        final_logit_softcap: the same on the output logits, or None.
        use_post_norms: RMSNorm after attention and feed-forward (Gemma 2/3).
        use_qk_norm: RMSNorm over head_dim on queries and keys (Gemma 3).
        global_rope_base, local_rope_base: rotary bases per attention type.
        global_rope_scaling, local_rope_scaling: linear position scaling.
        global_rope_fraction, local_rope_fraction: share of each head's
            frequency pairs that rotate (Gemma 4 "proportional" rope: the
            first `int(fraction * head_dim // 2)` frequencies of the full
            head_dim's spectrum, the rest zero, so those pairs pass through).
        global_head_dim: head width of global layers (Gemma 4: 512 against
            256 local). Defaults to `head_dim`.
        num_global_key_value_heads: key/value heads of global layers.
            Defaults to `num_key_value_heads`.
        global_keys_as_values: global layers have no value projection; their
            values are the key projection's output (before key norm and
            rope), as Gemma 4's `attention_k_eq_v`.
        use_value_norm: scale-free RMSNorm over head_dim on values (Gemma 4).
        use_layer_scalar: each block's output is multiplied by a stored
            per-layer scalar (Gemma 4's `layer_scalar`, not trained).
        per_layer_input_dim: width of each layer's per-layer embedding (PLE,
            Gemma 4 E2B/E4B; HF `hidden_size_per_layer_input`), 0 for off.
            A second token table holds `num_layers * per_layer_input_dim`
            values per token; combined with a projection of the main
            embedding, each block gets its slice through a gated residual.
        per_layer_vocabulary_size: token ids of that table (HF
            `vocab_size_per_layer_input`). Defaults to `vocabulary_size`.
        num_kv_shared_layers: the trailing layers that compute no keys or
            values: each attends to those of the last earlier layer of its
            attention type (`kv_source`), and needs no cache of its own.
        use_double_wide_mlp: those shared layers' feed-forward is twice
            `intermediate_dim` wide (Gemma 4 E2B).
        num_experts: experts of a mixture-of-experts feed-forward beside the
            dense one in every block (Gemma 4 26B-A4B's `enable_moe_block`
            with HF `num_experts`), or None for none.
        top_k_experts: experts each token is routed to (HF `top_k_experts`).
        moe_intermediate_dim: width of each expert's gate (HF
            `moe_intermediate_size`).
        layer_norm_epsilon: RMSNorm epsilon.
        max_sequence_length: context length the model was trained for.
        dropout: dropout on attention outputs and feed-forward during training.
    """

    vocabulary_size: int
    num_layers: int
    hidden_dim: int
    num_query_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_dim: int
    layer_types: Optional[Tuple[str, ...]] = None
    sliding_window_size: Optional[int] = None
    query_pre_attn_scalar: Optional[float] = None
    attention_logit_softcap: Optional[float] = None
    final_logit_softcap: Optional[float] = None
    use_post_norms: bool = False
    use_qk_norm: bool = False
    global_rope_base: float = 10_000.0
    local_rope_base: float = 10_000.0
    global_rope_scaling: float = 1.0
    local_rope_scaling: float = 1.0
    global_rope_fraction: float = 1.0
    local_rope_fraction: float = 1.0
    global_head_dim: Optional[int] = None
    num_global_key_value_heads: Optional[int] = None
    global_keys_as_values: bool = False
    use_value_norm: bool = False
    use_layer_scalar: bool = False
    per_layer_input_dim: int = 0
    per_layer_vocabulary_size: Optional[int] = None
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    num_experts: Optional[int] = None
    top_k_experts: Optional[int] = None
    moe_intermediate_dim: Optional[int] = None
    layer_norm_epsilon: float = 1e-6
    max_sequence_length: int = 8192
    dropout: float = 0.0

    def __post_init__(self):
        if self.layer_types is None:
            object.__setattr__(self, "layer_types", (GLOBAL,) * self.num_layers)
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.query_pre_attn_scalar is None:
            object.__setattr__(self, "query_pre_attn_scalar", self.head_dim)
        if self.global_head_dim is None:
            object.__setattr__(self, "global_head_dim", self.head_dim)
        if self.num_global_key_value_heads is None:
            object.__setattr__(self, "num_global_key_value_heads", self.num_key_value_heads)
        if self.per_layer_vocabulary_size is None:
            object.__setattr__(self, "per_layer_vocabulary_size", self.vocabulary_size)
        self.validate()

    def validate(self):
        for name in (
            "vocabulary_size",
            "num_layers",
            "hidden_dim",
            "num_query_heads",
            "num_key_value_heads",
            "head_dim",
            "intermediate_dim",
            "max_sequence_length",
            "global_head_dim",
            "num_global_key_value_heads",
            "per_layer_vocabulary_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(
                    f"`{name}` must be a positive integer, got {value!r}."
                )
        for name in ("per_layer_input_dim", "num_kv_shared_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")
        for name in ("num_key_value_heads", "num_global_key_value_heads"):
            if self.num_query_heads % getattr(self, name):
                raise ValueError(
                    f"`num_query_heads` ({self.num_query_heads}) must be divisible "
                    f"by `{name}` ({getattr(self, name)})."
                )
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"`layer_types` has {len(self.layer_types)} entries but "
                f"`num_layers` is {self.num_layers}."
            )
        for i, kind in enumerate(self.layer_types):
            if kind not in ATTENTION_TYPES:
                raise ValueError(
                    f"Unknown attention type {kind!r} for layer {i}; expected "
                    f"one of {ATTENTION_TYPES}."
                )
        if LOCAL in self.layer_types:
            window = self.sliding_window_size
            if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
                raise ValueError(
                    "`sliding_window_size` must be a positive integer when any "
                    f"layer is local, got {window!r}."
                )
        elif self.sliding_window_size is not None and self.sliding_window_size <= 0:
            raise ValueError(
                "`sliding_window_size` must be positive, got "
                f"{self.sliding_window_size!r}."
            )
        for name in ("attention_logit_softcap", "final_logit_softcap"):
            cap = getattr(self, name)
            if cap is not None and not cap > 0:
                raise ValueError(f"`{name}` must be positive or None, got {cap!r}.")
        for name in (
            "query_pre_attn_scalar",
            "global_rope_base",
            "local_rope_base",
            "global_rope_scaling",
            "local_rope_scaling",
            "layer_norm_epsilon",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"`{name}` must be positive, got {getattr(self, name)!r}."
                )
        for name in ("global_rope_fraction", "local_rope_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"`{name}` must be in [0, 1], got {getattr(self, name)!r}.")
        self._validate_experts()
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout!r}.")
        if self.num_kv_shared_layers >= self.num_layers:
            raise ValueError(
                f"`num_kv_shared_layers` ({self.num_kv_shared_layers}) must be less than "
                f"`num_layers` ({self.num_layers}): some layer must compute the keys and values."
            )
        first_shared = self.num_layers - self.num_kv_shared_layers
        missing = set(self.layer_types[first_shared:]) - set(self.layer_types[:first_shared])
        if missing:
            raise ValueError(
                f"Key/value-shared layers of type {sorted(missing)} have no earlier layer of that "
                f"type to read from (the first {first_shared} layers are {list(self.layer_types[:first_shared])})."
            )
        if self.use_double_wide_mlp and not self.num_kv_shared_layers:
            raise ValueError("`use_double_wide_mlp` widens the key/value-shared layers; `num_kv_shared_layers` is 0.")

    def _validate_experts(self):
        fields = ("num_experts", "top_k_experts", "moe_intermediate_dim")
        if self.num_experts is None:
            given = [name for name in fields[1:] if getattr(self, name) is not None]
            if given:
                raise ValueError(f"{given} set without `num_experts`: set `num_experts` for a mixture of experts.")
            return
        for name in fields:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer with `num_experts` set, got {value!r}.")
        if self.top_k_experts > self.num_experts:
            raise ValueError(
                f"`top_k_experts` ({self.top_k_experts}) must not exceed `num_experts` ({self.num_experts})."
            )

    # Per-layer values, worked out once.
    def window(self, layer_index):
        """Sliding window of a layer, or None for a global layer."""
        if self.layer_types[layer_index] == LOCAL:
            return self.sliding_window_size
        return None

    def rope(self, layer_index):
        """(head_dim, base, linear scaling factor, rotated fraction) of a layer."""
        if self.layer_types[layer_index] == LOCAL:
            return self.head_dim, self.local_rope_base, self.local_rope_scaling, self.local_rope_fraction
        return self.global_head_dim, self.global_rope_base, self.global_rope_scaling, self.global_rope_fraction

    def layer_head_dim(self, layer_index):
        """Head width of a layer."""
        return self.head_dim if self.layer_types[layer_index] == LOCAL else self.global_head_dim

    def layer_key_value_heads(self, layer_index):
        """Key/value heads of a layer."""
        if self.layer_types[layer_index] == LOCAL:
            return self.num_key_value_heads
        return self.num_global_key_value_heads

    def layer_keys_as_values(self, layer_index):
        """Whether a layer's values are its keys' projection (no value kernel)."""
        return self.global_keys_as_values and self.layer_types[layer_index] == GLOBAL

    def kv_source(self, layer_index):
        """The layer whose keys and values `layer_index` attends to: itself,
        or for one of the trailing `num_kv_shared_layers` the last earlier
        non-shared layer of its attention type (as transformers' Gemma 4)."""
        first_shared = self.num_layers - self.num_kv_shared_layers
        if layer_index < first_shared:
            return layer_index
        kind = self.layer_types[layer_index]
        return max(j for j in range(first_shared) if self.layer_types[j] == kind)

    def layer_shares_kv(self, layer_index):
        """Whether a layer reads another layer's keys and values (no key/value kernels, no cache)."""
        return self.kv_source(layer_index) != layer_index

    def layer_intermediate_dim(self, layer_index):
        """Feed-forward width of a layer (doubled on shared layers with `use_double_wide_mlp`)."""
        wide = self.use_double_wide_mlp and self.layer_shares_kv(layer_index)
        return self.intermediate_dim * (2 if wide else 1)

    def gemma4_mechanisms(self):
        """Names of the Gemma 4 mechanisms this config turns on (empty for Gemma 1-3)."""
        on = {
            "global_head_dim": self.global_head_dim != self.head_dim,
            "num_global_key_value_heads": self.num_global_key_value_heads != self.num_key_value_heads,
            "global_keys_as_values": self.global_keys_as_values,
            "use_value_norm": self.use_value_norm,
            "use_layer_scalar": self.use_layer_scalar,
            "global_rope_fraction": self.global_rope_fraction != 1.0,
            "local_rope_fraction": self.local_rope_fraction != 1.0,
            "per_layer_input_dim": self.per_layer_input_dim > 0,
            "num_kv_shared_layers": self.num_kv_shared_layers > 0,
            "use_double_wide_mlp": self.use_double_wide_mlp,
            "num_experts": self.num_experts is not None,
        }
        return [name for name, value in on.items() if value]

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["layer_types"] = list(d["layer_types"])
        return d

    @classmethod
    def from_dict(cls, d):
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"Unknown GemmaConfig fields: {sorted(unknown)}.")
        return cls(**d)

    def num_parameters(self):
        """Parameter count computed from the config (tied embeddings)."""
        d, p, layers = self.hidden_dim, self.per_layer_input_dim, self.num_layers
        total = self.vocabulary_size * d + d
        if p:  # the per-layer table, the projection of the embedding, its norm
            total += self.per_layer_vocabulary_size * layers * p + d * layers * p + p
        for i in range(layers):
            h, k = self.layer_head_dim(i), self.layer_key_value_heads(i)
            shared = self.layer_shares_kv(i)
            key_values = 0 if shared else (1 if self.layer_keys_as_values(i) else 2)
            total += d * h * (2 * self.num_query_heads + key_values * k)
            total += 3 * d * self.layer_intermediate_dim(i)
            total += d * (4 if self.use_post_norms else 2)
            total += (h if shared else 2 * h) if self.use_qk_norm else 0
            total += 1 if self.use_layer_scalar else 0
            total += 2 * d * p + d if p else 0  # gate, projection, norm
            if self.num_experts is not None:  # router (kernel, scale, expert scales), experts, 3 norms
                e, f = self.num_experts, self.moe_intermediate_dim
                total += d * e + d + e + 3 * e * d * f + 3 * d
        return total

    @property
    def embedding_scale(self):
        return math.sqrt(self.hidden_dim)
