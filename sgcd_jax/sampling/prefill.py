"""Writing prompts and observations into a KV cache, shared by GenerationSession and ContinuousSession.

    cache, next_logits = append_rows(sampler, cache, [[ids of row 0], [], [ids of row 2]], stats)
    prefix_cache = prefill_prefixes(sampler, [prompt[:-1] for a sibling group], stats)

`append_rows` writes each row's ids in chunks of at most `sampler.prefill_chunk` tokens (chunk widths
bucketed to powers of two), so prefill memory is bounded by the chunk, not the prompt. `sampler` is a
sampling.session.Sampler (not imported here: the sessions import this module).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sgcd_jax.models.cache import KVCache
from sgcd_jax.sampling.kernels import append_chunk, attach_store, grow_cache, next_bucket, split_store


@dataclasses.dataclass
class TurnOutput:
    token_ids: np.ndarray  # [n] int32, exactly the sampled ids (ends with the stop token if one was hit)
    logprobs: np.ndarray  # [n] float32, see sampling.rules for which distribution
    finish_reason: str  # "stop_token" | "stop_string" | "length"


@dataclasses.dataclass
class SessionStats:
    prefill_tokens: int = 0  # real tokens written by append calls (prompts, observations)
    shared_prefix_tokens_saved: int = 0  # prompt tokens not recomputed thanks to sibling sharing
    generated_tokens: int = 0
    decode_row_steps: int = 0  # batch rows × decode steps actually run (incl. idle rows)
    prefill_calls: int = 0  # append_chunk calls (a long append is several chunks)


def concat_caches(caches: list[KVCache | None]) -> KVCache:
    """Rows of all caches (None skipped) in order, grown to the longest max_len. Prefix stores are
    concatenated too (padded to the widest store, each cache's prefix ids offset by the entries before it;
    caches that all hold the same store keep it and their ids); rows of a cache without a store get
    prefix_id -1."""
    caches = [c for c in caches if c is not None]
    if len(caches) == 1:
        return caches[0]
    max_len = max(c.max_len for c in caches)
    caches = [grow_cache(c, max_len) for c in caches]
    rows = KVCache(k=jnp.concatenate([c.k for c in caches], 1), v=jnp.concatenate([c.v for c in caches], 1),
                   valid=jnp.concatenate([c.valid for c in caches], 0), end=jnp.concatenate([c.end for c in caches], 0),
                   extra={n: jnp.concatenate([c.extra[n] for c in caches], 0) for n in caches[0].extra})
    if all(c.prefix_id is None for c in caches):
        return rows
    rows = rows.replace(prefix_len=jnp.concatenate([jnp.zeros((c.batch_size,), jnp.int32) if c.prefix_len is None
                                                    else c.prefix_len for c in caches]))
    stores = [c for c in caches if c.has_prefix_store]
    if len(stores) == len(caches) and all(c.prefix_k is stores[0].prefix_k for c in stores):  # one store
        return rows.replace(prefix_k=stores[0].prefix_k, prefix_v=stores[0].prefix_v,
                            prefix_valid=stores[0].prefix_valid, prefix_id=jnp.concatenate([c.prefix_id for c in caches]))
    ids, offset = [], 0
    for c in caches:
        if c.has_prefix_store:
            ids.append(jnp.where(c.prefix_id >= 0, c.prefix_id + offset, -1))
            offset += c.num_prefixes
        elif c.prefix_id is not None:
            raise ValueError("concat_caches: rows with prefix ids but no prefix store (a parked row) cannot join")
        else:
            ids.append(jnp.full((c.batch_size,), -1, jnp.int32))
    return rows.replace(**concat_stores(stores), prefix_id=jnp.concatenate(ids, 0))


def concat_stores(caches: list[KVCache]) -> dict[str, jax.Array]:
    """The caches' prefix stores as one (entries in order, slot axes padded to the widest):
    {prefix_k, prefix_v, prefix_valid} for KVCache.replace."""
    width = max(c.prefix_valid.shape[1] for c in caches)

    def pad(x, axis):
        return jnp.pad(x, [(0, width - x.shape[axis]) if a == axis else (0, 0) for a in range(x.ndim)])

    return dict(prefix_k=jnp.concatenate([pad(c.prefix_k, 2) for c in caches], 1),
                prefix_v=jnp.concatenate([pad(c.prefix_v, 2) for c in caches], 1),
                prefix_valid=jnp.concatenate([pad(c.prefix_valid, 1) for c in caches], 0))


def compact_prefix_store(cache: KVCache, keep: list[int] | None = None,
                         min_entries: int = 1) -> tuple[KVCache, np.ndarray | None]:
    """Drop store entries no row refers to; → (cache, table) with table[old id] = new id or -1.

    `keep`: the entries to keep, in order (default: those the cache's rows refer to); rows referring to any
    other entry get -1. The store is padded to a power of two of entries (empty ones, at least `min_entries`) so
    the compiled shapes stay few; an unchanged store is returned as it is. Without any entry left the store is
    dropped."""
    if not cache.has_prefix_store:
        return cache, None
    ids = np.asarray(cache.prefix_id)
    if keep is None:
        keep = sorted(set(ids[ids >= 0].tolist()))
    table = np.full(cache.num_prefixes, -1, np.int32)
    table[np.asarray(keep, np.int64)] = np.arange(len(keep), dtype=np.int32)
    if not keep:  # no row reads a prefix (any prefix_len left is on rows nobody owns)
        return cache.replace(prefix_k=None, prefix_v=None, prefix_valid=None, prefix_id=None, prefix_len=None), table
    capacity = next_bucket(len(keep), min_entries)
    new_ids = np.where(ids >= 0, table[np.maximum(ids, 0)], -1).astype(np.int32)
    if list(keep) == list(range(len(keep))) and capacity == cache.num_prefixes:
        return cache.replace(prefix_id=jnp.asarray(new_ids)), table
    order = jnp.asarray(list(keep) + [keep[0]] * (capacity - len(keep)), jnp.int32)
    filled = jnp.asarray(np.arange(capacity) < len(keep))
    return cache.replace(prefix_k=jnp.take(cache.prefix_k, order, axis=1),
                         prefix_v=jnp.take(cache.prefix_v, order, axis=1),
                         prefix_valid=jnp.take(cache.prefix_valid, order, axis=0) & filled[:, None],
                         prefix_id=jnp.asarray(new_ids)), table


def append_rows(sampler, cache: KVCache, append_ids: list[list[int]],
                stats: SessionStats) -> tuple[KVCache, jax.Array]:
    """Append each row's ids in chunks of at most sampler.prefill_chunk tokens; return the cache (grown to the
    next bucket that fits) and the logits after each row's last appended token [rows, vocab]."""
    longest = max(max(map(len, append_ids)), 1)
    ends = np.asarray(cache.end)
    needed = int((ends + np.asarray([len(ids) for ids in append_ids])).max()) + 1
    cache = sampler.shard_cache(grow_cache(cache, sampler.cache_bucket(needed, cache.max_len)))
    stats.prefill_tokens += sum(map(len, append_ids))
    next_logits = None
    for start in range(0, longest, sampler.prefill_chunk):
        pieces = [ids[start:start + sampler.prefill_chunk] for ids in append_ids]
        width = next_bucket(max(max(map(len, pieces)), 1), sampler.min_chunk_len)
        tokens = np.zeros((len(pieces), width), np.int32)
        mask = np.zeros((len(pieces), width), bool)
        for row, ids in enumerate(pieces):
            tokens[row, :len(ids)] = ids
            mask[row, :len(ids)] = True
        rows, store = split_store(cache)
        rows, logits = append_chunk(sampler.graphdef, sampler.state, rows,
                                    sampler.shard_rows(jnp.asarray(tokens)), sampler.shard_rows(jnp.asarray(mask)), store)
        cache = attach_store(rows, store)
        if next_logits is None:
            next_logits = logits
        else:  # rows whose ids ended in an earlier chunk keep that chunk's logits
            has_tokens = sampler.shard_rows(jnp.asarray(mask.any(axis=1)))
            next_logits = jnp.where(has_tokens[:, None], logits, next_logits)
        stats.prefill_calls += 1
    return cache, next_logits


def prefill_prefixes(sampler, prefixes: list[tuple[int, ...]], stats: SessionStats) -> KVCache:
    """A fresh cache with one row per prefix (rows padded to a power of two and the mesh's row multiple)."""
    rows = next_bucket(len(prefixes), 1)
    rows = -(-rows // sampler.batch_multiple) * sampler.batch_multiple
    longest = max(map(len, prefixes))
    cache = KVCache.init(sampler.cfg, rows, sampler.cache_bucket(longest + 1), sampler.cache_dtype)
    padded = [list(p) for p in prefixes] + [[]] * (rows - len(prefixes))
    cache, _ = append_rows(sampler, sampler.shard_cache(cache), padded, stats)
    return cache
