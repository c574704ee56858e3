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
from sgcd_jax.sampling.kernels import append_chunk, grow_cache, next_bucket


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
    """Rows of all caches (None skipped) in order, grown to the longest max_len."""
    caches = [c for c in caches if c is not None]
    if len(caches) == 1:
        return caches[0]
    max_len = max(c.max_len for c in caches)
    caches = [grow_cache(c, max_len) for c in caches]
    return KVCache(k=jnp.concatenate([c.k for c in caches], 1), v=jnp.concatenate([c.v for c in caches], 1),
                   valid=jnp.concatenate([c.valid for c in caches], 0), end=jnp.concatenate([c.end for c in caches], 0),
                   extra={n: jnp.concatenate([c.extra[n] for c in caches], 0) for n in caches[0].extra})


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
        cache, logits = append_chunk(sampler.graphdef, sampler.state, cache,
                                     sampler.shard_rows(jnp.asarray(tokens)), sampler.shard_rows(jnp.asarray(mask)))
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
    cache = KVCache.init(sampler.cfg, rows, sampler.cache_bucket(longest + 1))
    padded = [list(p) for p in prefixes] + [[]] * (rows - len(prefixes))
    cache, _ = append_rows(sampler, sampler.shard_cache(cache), padded, stats)
    return cache
