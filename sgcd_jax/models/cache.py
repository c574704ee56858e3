"""KVCache: per-row slot cache for prefill, decode and multi-turn continuation.

Row b holds its tokens in slots [0, end[b]); a call writes its chunk at slots end[b] + t and marks
valid[b, slot] from the chunk's token_mask, then end[b] += number of real tokens. Padding written past
end is overwritten by the next chunk. `extra` holds per-layer states of non-attention blocks (e.g. the
recurrent state of a Gated DeltaNet layer) keyed by name; every array in it has batch on axis 0.

Prefix store (sibling rollouts): G siblings of a task share their ~4k-token prompt. The prompt's k/v is kept
once, as store entry p ([L, P, S_p, Hkv, Dh], its own slot axis), and a sibling row with prefix_id p reads the
entry's valid slots as the keys before its own slot 0: its own slots hold only what follows the prompt, and
its tokens sit at positions prefix_len[b] + slot (`seq_end`). A row's own slot count is thus what it
generates and appends, not the whole conversation (τ³: ~2.3k instead of ~6.7k slots per row).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from sgcd_jax.models.config import ModelConfig


# layer_type → fn(cfg, layer_index, batch_size) → {name: zeros [B, ...]}: the initial per-row states of a block kind
# that keeps a recurrent state instead of k/v (e.g. Gated DeltaNet conv + recurrent state). KVCache.init fills them
# in and gives such layers no k/v slice: k/v hold the other layers only, in order (see kv_layer_index).
BLOCK_STATE_FACTORIES: dict[str, Callable[[ModelConfig, int, int], dict[str, jax.Array]]] = {}


def scatter_set(buffer: jax.Array, index: Any, values: jax.Array, mode: str | None = None) -> jax.Array:
    """``buffer.at[index].set(values, mode=mode)`` in the buffer's dtype. A 2-byte float buffer (a bf16 KV cache) is
    written through its uint16 bits, same values: XLA's CPU scatter upcasts bf16 to f32 around the whole buffer
    (writing one token into each layer of a [30, 32, 1024, 3, 64] cache: 3.8 s and +1.1 GB max RSS as bf16, 0.23 s
    through the bits, 0.008 s for the f32 cache; jax 0.10, AMD EPYC). Same values, update in place (donated buffers)."""
    values = values.astype(buffer.dtype)
    if jnp.issubdtype(buffer.dtype, jnp.floating) and buffer.dtype.itemsize == 2:
        bits = jax.lax.bitcast_convert_type(buffer, jnp.uint16).at[index].set(
            jax.lax.bitcast_convert_type(values, jnp.uint16), mode=mode)
        return jax.lax.bitcast_convert_type(bits, buffer.dtype)
    return buffer.at[index].set(values, mode=mode)


def kv_layer_index(cfg: ModelConfig, layer_index: int) -> int:
    """Index into KVCache.k/v of layer `layer_index` (== layer_index unless stateful layer types precede it)."""
    return sum(kind not in BLOCK_STATE_FACTORIES for kind in cfg.layer_types[:layer_index])


@struct.dataclass
class KVCache:
    k: jax.Array  # [L_kv, B, S, Hkv, Dh] compute dtype; L_kv = layers without a registered block state
    v: jax.Array  # [L, B, S, Hkv, Dh]
    valid: jax.Array  # [B, S] bool: slot holds a real token
    end: jax.Array  # [B] int32: first free slot of each row
    extra: dict[str, jax.Array] = struct.field(default_factory=dict)  # [B, ...] per entry
    prefix_k: jax.Array | None = None  # [L_kv, P, S_p, Hkv, Dh]: the shared-prefix store (see module doc)
    prefix_v: jax.Array | None = None  # [L_kv, P, S_p, Hkv, Dh]
    prefix_valid: jax.Array | None = None  # [P, S_p] bool
    prefix_id: jax.Array | None = None  # [B] int32: row's store entry, -1 none (set with or without a store)
    prefix_len: jax.Array | None = None  # [B] int32: tokens the row reads from its entry (0 with none)

    @classmethod
    def init(cls, cfg: ModelConfig, batch_size: int, max_len: int, dtype: Any = None,
             extra: dict[str, jax.Array] | None = None) -> "KVCache":
        """An empty cache with `max_len` slots per row (prompt + all generated and appended tokens)."""
        dtype = cfg.dtype if dtype is None else dtype
        num_kv_layers = sum(kind not in BLOCK_STATE_FACTORIES for kind in cfg.layer_types)
        shape = (num_kv_layers, batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
        if extra is None:
            extra = {}
            for layer_index, kind in enumerate(cfg.layer_types):
                if kind in BLOCK_STATE_FACTORIES:
                    extra.update(BLOCK_STATE_FACTORIES[kind](cfg, layer_index, batch_size))
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch_size, max_len), jnp.bool_),
            end=jnp.zeros((batch_size,), jnp.int32),
            extra=dict(extra or {}),
        )

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    @property
    def seq_end(self) -> jax.Array:
        """[B] int32: each row's sequence length, prefix included: the position of its next token."""
        return self.end if self.prefix_len is None else self.end + self.prefix_len

    @property
    def has_prefix_store(self) -> bool:
        return self.prefix_valid is not None

    @property
    def num_prefixes(self) -> int:
        return 0 if self.prefix_valid is None else self.prefix_valid.shape[0]

    def take_rows(self, row_indices: jax.Array) -> "KVCache":
        """Gather rows, e.g. copy one shared-prefix prefill to the G siblings: take_rows(jnp.repeat(idx, G)).
        A prefix store is kept as it is (rows keep their prefix_id)."""
        row_indices = jnp.asarray(row_indices, jnp.int32)
        return self.replace(
            k=jnp.take(self.k, row_indices, axis=1),
            v=jnp.take(self.v, row_indices, axis=1),
            valid=jnp.take(self.valid, row_indices, axis=0),
            end=jnp.take(self.end, row_indices, axis=0),
            extra={name: jnp.take(state, row_indices, axis=0) for name, state in self.extra.items()},
            prefix_id=None if self.prefix_id is None else jnp.take(self.prefix_id, row_indices, axis=0),
            prefix_len=None if self.prefix_len is None else jnp.take(self.prefix_len, row_indices, axis=0),
        )

    def prefix_store(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None:
        """(prefix_k, prefix_v, prefix_id, prefix_valid) for models/attention.attention, or None."""
        return None if self.prefix_valid is None else (self.prefix_k, self.prefix_v, self.prefix_id,
                                                       self.prefix_valid)

    def row_prefix_valid(self) -> jax.Array:
        """[B, S_p] bool: the store slots each row reads as keys before its own (needs a store)."""
        ids = self.prefix_id
        return jnp.take(self.prefix_valid, jnp.maximum(ids, 0), axis=0) & (ids >= 0)[:, None]

    def as_prefix_store(self, lengths: jax.Array, row_slots: int) -> "KVCache":
        """This cache's rows (each holding one prompt prefix in slots [0, lengths[p])) moved into a prefix
        store, with one sibling-template row per prefix: `row_slots` empty own slots, end 0, prefix_id p,
        prefix_len lengths[p], the row's `extra` states kept (a recurrent layer's state after the prefix).
        take_rows(repeat(p, G)) then makes the G sibling rows."""
        num_layers, rows, _, num_kv, head_dim = self.k.shape
        shape = (num_layers, rows, row_slots, num_kv, head_dim)
        return KVCache(k=jnp.zeros(shape, self.k.dtype), v=jnp.zeros(shape, self.v.dtype),
                       valid=jnp.zeros((rows, row_slots), jnp.bool_), end=jnp.zeros((rows,), jnp.int32),
                       extra=dict(self.extra), prefix_k=self.k, prefix_v=self.v, prefix_valid=self.valid,
                       prefix_id=jnp.arange(rows, dtype=jnp.int32), prefix_len=jnp.asarray(lengths, jnp.int32))

    def without_prefix_store(self) -> "KVCache":
        """The rows alone (prefix_id, prefix_len kept): a parked row does not hold the session's store alive."""
        return self.replace(prefix_k=None, prefix_v=None, prefix_valid=None)

    def positions_for(self, token_mask: jax.Array) -> jax.Array:
        """Positions of a right-padded chunk appended to this cache: seq_end[b] + t.

        Assumes the row has no holes (valid slots == [0, end)); the usual case for prefill/decode/append.
        """
        steps = jnp.arange(token_mask.shape[1], dtype=jnp.int32)[None, :]
        return self.seq_end[:, None] + steps  # [B, T]
