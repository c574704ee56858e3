"""The two jitted boundaries of generation: `append_chunk` (prefill / multi-turn continuation) and
`decode_chunk` (a `lax.while_loop` of up to `num_steps` sampled tokens).

Both take the model as (graphdef, state) from `nnx.split` and donate the cache so XLA updates it in
place. A cache's shared-prefix store (models/cache.py) is read-only here and outlives the call (parked rows
and shrunk batches refer to it): pass it apart, undonated, as `store` (`split_store` / `attach_store`). Shapes are static per (batch bucket, cache length bucket, chunk length bucket); callers bucket.
A row whose `active` flag is False in `decode_chunk` still rides along in the batch but feeds a masked
token: its cache end does not move and nothing it "generates" is kept.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from sgcd_jax.models.cache import KVCache
from sgcd_jax.sampling.rules import SamplingParams, sample_tokens


Store = tuple[jax.Array, jax.Array, jax.Array]  # (prefix_k, prefix_v, prefix_valid) of a KVCache


def split_store(cache: KVCache) -> tuple[KVCache, Store | None]:
    """(the rows with their prefix ids, the prefix store or None): the kernels donate the first only."""
    if not cache.has_prefix_store:
        return cache, None
    return cache.without_prefix_store(), (cache.prefix_k, cache.prefix_v, cache.prefix_valid)


def attach_store(cache: KVCache, store: Store | None) -> KVCache:
    if store is None:
        return cache
    return cache.replace(prefix_k=store[0], prefix_v=store[1], prefix_valid=store[2])


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def append_chunk(graphdef: nnx.GraphDef, state: nnx.State, cache: KVCache, tokens: jax.Array,
                 token_mask: jax.Array, store: Store | None = None) -> tuple[KVCache, jax.Array]:
    """Write a right-padded chunk tokens [B,T] at each row's cache end and return the logits [B,V] float32
    that follow each row's last real token (garbage for rows with an empty chunk). With `store`, the cache
    comes and goes without it (split_store)."""
    model = nnx.merge(graphdef, state)
    positions = cache.positions_for(token_mask)  # [B, T]: after the row's store prefix, if any
    hidden, cache = model(tokens, positions, token_mask, attach_store(cache, store))
    last = jnp.maximum(token_mask.sum(axis=1) - 1, 0)  # [B]
    last_hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)  # [B, 1, D]
    return split_store(cache)[0], model.logits(last_hidden)[:, 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "params", "num_steps", "stop_ids"),
                   donate_argnames=("cache",))
def decode_chunk(graphdef: nnx.GraphDef, state: nnx.State, cache: KVCache, next_logits: jax.Array,
                 active: jax.Array, remaining: jax.Array, key: jax.Array, *, params: SamplingParams,
                 num_steps: int, stop_ids: tuple[int, ...], store: Store | None = None):
    """Sample up to `num_steps` tokens per active row, feeding each into the cache.

    next_logits [B,V] float32: logits for each row's next token. active [B] bool. remaining [B] int32:
    tokens a row may still generate. A row stops after emitting a token in `stop_ids` (the token is kept
    and cached: it ends the assistant turn) or when `remaining` hits 0. The loop exits early once no
    row is active. Returns (cache, next_logits, active, remaining, key, tokens [B,num_steps] int32,
    logprobs [B,num_steps] float32, num_generated [B] int32).

    key: one key (split into per-row keys here) or per-row keys [B]. Row b's token at position s
    (cache.seq_end) is sampled with fold_in(key[b], s): a row's random stream depends only on its own key and position,
    never on the batch it shares, the chunking of the decode loop or the row's place in the batch.
    With `store`, the cache comes and goes without it (split_store).
    """
    batch = active.shape[0]
    row_keys = jax.random.split(key, batch) if key.ndim == 0 else key  # [B]
    stop_ids_arr = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)

    def cond(carry):
        step, active = carry[0], carry[3]
        return (step < num_steps) & jnp.any(active)

    def body(carry):
        step, cache, logits, active, remaining, key, out_tokens, out_logprobs, num_generated = carry
        sample_keys = jax.vmap(jax.random.fold_in)(row_keys, cache.seq_end)  # [B]: (row, position)
        tokens, logprobs = sample_tokens(logits, sample_keys, params)  # [B], [B]
        out_tokens = out_tokens.at[:, step].set(jnp.where(active, tokens, 0))
        out_logprobs = out_logprobs.at[:, step].set(jnp.where(active, logprobs, 0.0))
        model = nnx.merge(graphdef, state)
        hidden, cache = model(tokens[:, None], cache.seq_end[:, None], active[:, None], attach_store(cache, store))
        cache = split_store(cache)[0]
        logits = model.logits(hidden)[:, 0]
        num_generated = num_generated + active
        remaining = remaining - active
        finished = jnp.isin(tokens, stop_ids_arr) | (remaining <= 0)
        return (step + 1, cache, logits, active & ~finished, remaining, key, out_tokens, out_logprobs,
                num_generated)

    carry = (jnp.int32(0), cache, next_logits, active & (remaining > 0), remaining, key,
             jnp.zeros((batch, num_steps), jnp.int32), jnp.zeros((batch, num_steps), jnp.float32),
             jnp.zeros((batch,), jnp.int32))
    _, cache, next_logits, active, remaining, key, tokens, logprobs, num_generated = jax.lax.while_loop(
        cond, body, carry)
    return cache, next_logits, active, remaining, key, tokens, logprobs, num_generated


def grow_cache(cache: KVCache, max_len: int) -> KVCache:
    """Pad the rows' slot axis to `max_len` (free slots are invalid; a prefix store has its own slot axis and
    is kept). No-op when already that long."""
    extra_slots = max_len - cache.max_len
    if extra_slots <= 0:
        return cache
    pad_kv = [(0, 0), (0, 0), (0, extra_slots), (0, 0), (0, 0)]
    pad_valid = [(0, 0), (0, extra_slots)]
    return cache.replace(k=jnp.pad(cache.k, pad_kv), v=jnp.pad(cache.v, pad_kv),
                         valid=jnp.pad(cache.valid, pad_valid))


@jax.jit
def truncate_rows(cache: KVCache, new_end: jax.Array) -> KVCache:
    """Forget slots at or past new_end [B] (roll back tokens generated after a stop string).

    Only exact for attention caches: a recurrent state in `cache.extra` cannot be rolled back."""
    slots = jnp.arange(cache.max_len, dtype=jnp.int32)[None, :]
    return cache.replace(valid=cache.valid & (slots < new_end[:, None]), end=jnp.minimum(cache.end, new_end))


def next_bucket(n: int, minimum: int) -> int:
    """Smallest power of two >= max(n, minimum): keeps the number of compiled shapes logarithmic."""
    size = max(int(minimum), 1)
    while size < n:
        size *= 2
    return size
