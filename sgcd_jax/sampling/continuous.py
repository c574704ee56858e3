"""Continuous batching: a fixed number of decode slots whose rows are handed from episode to episode.

    slots = sampler.continuous(num_slots=8)
    slots.submit("ep0", prompt_ids, max_new_tokens=128, rng=key0)   # queue a turn (prompt or observation)
    while slots.has_work():
        for key, out in slots.step().items():                       # one decode chunk over all slots
            ...  # hand `out` to the env (thread pool); later: slots.submit(key, observation_ids, ...)
    slots.release("ep0")                                              # episode over: its slot is free

A slot is FREE, ACTIVE (decoding a turn) or IDLE (its episode waits on env/user; the cache row is kept so
the observation is appended, not re-prefilled). When a submitted turn finds no free slot, the least
recently used IDLE slot's row is parked (copied out of the batch) and handed over; a parked episode gets
a slot back, row restored, when its next turn is submitted. Each `step` first appends every queued chunk
(chunked prefill, like GenerationSession), then runs one `decode_chunk` of `decode_steps_per_chunk` tokens
over all slots, and returns the turns that ended in it. Per-row sampling keys (fold_in(rng, position))
make a turn's tokens independent of which slot it ran in and of who shared the batch. New episodes whose
prompts share everything but the last token (siblings) are prefilled once; the prompt goes to the cache's
prefix store, which their slots read (or, with Sampler(share_prefixes=False), is copied into each slot). In the
tail of a rollout (at most half the slots decoding) the active rows decode as a smaller batch when rows
are short enough that copying them is cheap (`shrink_row_bytes`).
Stop strings are not supported here (use GenerationSession).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sgcd_jax.models.cache import KVCache, scatter_set
from sgcd_jax.sampling.kernels import attach_store, decode_chunk, grow_cache, next_bucket, split_store
from sgcd_jax.sampling.prefill import (SessionStats, TurnOutput, append_rows, compact_prefix_store, concat_stores,
                                      prefill_prefixes)


@functools.partial(jax.jit, donate_argnums=(0,))
def put_row(cache: KVCache, slot: jax.Array, source: KVCache, source_row: jax.Array) -> KVCache:
    """cache row `slot` ← source row `source_row` (same max_len), in place: one row copied, never the batch.
    Rows only (kernels.split_store): a prefix store would be donated with them."""
    def put(dst, src, axis):
        row = jax.lax.dynamic_index_in_dim(src, source_row, axis, keepdims=True)
        return jax.lax.dynamic_update_index_in_dim(dst, row, slot, axis)
    if cache.prefix_id is None:
        prefix_id = prefix_len = None
    elif source.prefix_id is None:  # a row without a prefix (fresh) in a cache with a store
        prefix_id, prefix_len = cache.prefix_id.at[slot].set(-1), cache.prefix_len.at[slot].set(0)
    else:  # source's prefix_id must already index the cache's store (see ContinuousSession._add_prefixes)
        prefix_id, prefix_len = put(cache.prefix_id, source.prefix_id, 0), put(cache.prefix_len, source.prefix_len, 0)
    return cache.replace(k=put(cache.k, source.k, 1), v=put(cache.v, source.v, 1),
                         valid=put(cache.valid, source.valid, 0), end=put(cache.end, source.end, 0),
                         extra={n: put(cache.extra[n], source.extra[n], 0) for n in cache.extra}, prefix_id=prefix_id,
                         prefix_len=prefix_len)


@functools.partial(jax.jit, donate_argnums=(0,))
def put_rows(cache: KVCache, rows: jax.Array, source: KVCache) -> KVCache:
    """cache rows[i] ← source row i for distinct rows (a shrunk decode batch written back)."""
    return cache.replace(k=scatter_set(cache.k, (slice(None), rows), source.k),
                         v=scatter_set(cache.v, (slice(None), rows), source.v),
                         valid=cache.valid.at[rows].set(source.valid), end=cache.end.at[rows].set(source.end),
                         extra={n: cache.extra[n].at[rows].set(source.extra[n]) for n in cache.extra},
                         prefix_id=None if cache.prefix_id is None else cache.prefix_id.at[rows].set(source.prefix_id),
                         prefix_len=None if cache.prefix_len is None else
                         cache.prefix_len.at[rows].set(source.prefix_len))


@dataclasses.dataclass
class _Turn:
    ids: list[int]
    budget: int
    rng: jax.Array


@dataclasses.dataclass
class SlotStats:
    decode_row_steps: int = 0  # slots × decode steps run
    generated_tokens: int = 0  # useful row-steps
    parked: int = 0  # rows copied out to free a slot for a waiting episode
    restored: int = 0

    @property
    def slot_utilization(self) -> float:
        return self.generated_tokens / max(self.decode_row_steps, 1)


class ContinuousSession:
    """Fixed decode slots refilled across episodes; see the module docstring."""

    def __init__(self, sampler, num_slots: int, decode_steps: int | None = None,
                 shrink_row_bytes: int = 64 * 2**20, prompts: int = 1):
        if num_slots <= 0:
            raise ValueError(f"rollout.decode_slots must be positive, got {num_slots}")
        self.sampler = sampler
        self.num_slots = -(-num_slots // sampler.batch_multiple) * sampler.batch_multiple
        # tokens per decode call: a slot whose turn ends mid-call idles until the call returns, so shorter
        # calls refill sooner (more host round trips); default min(sampler.decode_steps_per_chunk, 8)
        self.decode_steps = decode_steps or min(sampler.decode_steps_per_chunk, 8)
        # when at most half the slots decode (the tail of a rollout), decode the active rows as a smaller
        # power-of-two batch (rows copied out and back) — only while a row's cache is at most this many bytes:
        # on CPU copying long rows costs more than the smaller batch saves (0 = never shrink)
        self.shrink_row_bytes = shrink_row_bytes
        # prefix store entries: at least this many (a power of two), never fewer later in the session, so the
        # compiled shapes do not depend on which episodes env timing lets share a step (one compile per bucket)
        self.store_entries = next_bucket(max(prompts, 1), 1)
        self.prefill_stats = SessionStats()  # prefill tokens / calls, shared prefix tokens saved
        self.cache: KVCache | None = None
        self.next_logits: jax.Array | None = None
        self.owner: list[Hashable | None] = [None] * self.num_slots
        self.active = np.zeros(self.num_slots, bool)
        self.remaining = np.zeros(self.num_slots, np.int32)
        self.keys: list[jax.Array | None] = [None] * self.num_slots
        self.generated: list[list[int]] = [[] for _ in range(self.num_slots)]
        self.logprobs: list[list[float]] = [[] for _ in range(self.num_slots)]
        self.last_used = np.zeros(self.num_slots, np.int64)
        self.queue: dict[Hashable, _Turn] = {}
        self.parked: dict[Hashable, KVCache] = {}
        self.stats = SlotStats()
        self._clock = 0

    # ------------------------------------------------------------------ public
    def submit(self, key: Hashable, ids: Sequence[int], *, max_new_tokens: int, rng: jax.Array) -> None:
        """Queue `key`'s next turn: append `ids` (whole prompt for a new key, observation suffix after) and decode."""
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError(f"empty chunk for key {key!r}: every turn must append at least one token")
        if key in self.queue or self._slot_of(key) is not None and self.active[self._slot_of(key)]:
            raise ValueError(f"key {key!r} already has a turn in flight")
        self.queue[key] = _Turn(ids, int(max_new_tokens), rng)

    def release(self, key: Hashable) -> None:
        """The episode is over: free its slot / parked row."""
        self.queue.pop(key, None)
        self.parked.pop(key, None)
        slot = self._slot_of(key)
        if slot is not None:
            self.owner[slot], self.active[slot] = None, False

    def has_work(self) -> bool:
        return bool(self.queue) or bool(self.active.any())

    def step(self) -> dict[Hashable, TurnOutput]:
        """Admit queued turns into slots (appending their chunks), then decode one chunk; → turns that ended."""
        if self.queue:
            self._admit()
        if not self.active.any():
            return {}
        return self._decode_chunk()

    # ------------------------------------------------------------------ internals
    def _slot_of(self, key: Hashable) -> int | None:
        try:
            return self.owner.index(key)
        except ValueError:
            return None

    def _ensure_cache(self, max_len: int, exact: bool = False) -> None:
        """A cache of at least `max_len` slots per row; a new one is the top bucket at once when the config caps
        it and Sampler.reserve_budget (no growth copies later), or exactly `max_len` (sibling templates:
        Sampler.row_slots)."""
        sampler = self.sampler
        if self.cache is None:
            if exact:
                length = max_len
            elif sampler.reserve_budget and sampler.max_cache_len and max_len <= sampler.max_cache_len:
                length = sampler.max_cache_len
            else:
                length = sampler.cache_bucket(max_len)
            self.cache = sampler.shard_cache(KVCache.init(sampler.cfg, self.num_slots, length, sampler.cache_dtype))
            self.next_logits = sampler.shard_rows(jnp.zeros((self.num_slots, sampler.cfg.vocab_size), jnp.float32))
        elif max_len > self.cache.max_len:
            self.cache = sampler.shard_cache(grow_cache(self.cache, sampler.cache_bucket(max_len, self.cache.max_len)))

    def _put(self, slots: list[int], source: KVCache, source_rows: list[int] | None = None) -> None:
        self._ensure_cache(source.max_len)
        source = grow_cache(source, self.cache.max_len)
        for slot, row in zip(slots, range(len(slots)) if source_rows is None else source_rows):
            own, store = split_store(self.cache)
            self.cache = attach_store(put_row(own, jnp.int32(slot), split_store(source)[0], jnp.int32(row)), store)
        self.cache = self.sampler.shard_cache(self.cache)

    def _free_slot(self) -> int | None:
        free = [s for s in range(self.num_slots) if self.owner[s] is None]
        if free:
            return free[0]
        idle = [s for s in range(self.num_slots) if not self.active[s] and self.owner[s] not in self.queue]
        if not idle:
            return None
        slot = min(idle, key=lambda s: self.last_used[s])  # park the least recently used waiting episode
        self.parked[self.owner[slot]] = self.cache.take_rows(jnp.asarray([slot], jnp.int32)).without_prefix_store()
        self.stats.parked += 1
        self.owner[slot] = None
        return slot

    def _admit(self) -> None:
        admitted: dict[int, list[int]] = {}  # slot → ids still to append
        new_keys: list[tuple[Hashable, int]] = []
        for key in list(self.queue):
            slot = self._slot_of(key)
            if slot is None:
                slot = self._free_slot()
                if slot is None:
                    continue  # every slot decodes or holds a queued key: wait for a later step
                self.owner[slot] = key
                if key in self.parked:
                    self._put([slot], self.parked.pop(key))
                    self.stats.restored += 1
                else:
                    new_keys.append((key, slot))
            turn = self.queue.pop(key)
            admitted[slot] = turn.ids
            self.active[slot] = True
            self.remaining[slot] = turn.budget
            self.keys[slot] = turn.rng
            self.generated[slot], self.logprobs[slot] = [], []
        if new_keys:
            self._prefill_new(new_keys, admitted)
        append = [admitted.get(s, []) for s in range(self.num_slots)]
        self._ensure_cache(1)
        self.cache, logits = append_rows(self.sampler, self.cache, append, self.prefill_stats)
        has = self.sampler.shard_rows(jnp.asarray([bool(ids) for ids in append]))
        self.next_logits = jnp.where(has[:, None], logits, self.next_logits)
        self.active &= self.remaining > 0

    def _prefill_new(self, new_keys: list[tuple[Hashable, int]], admitted: dict[int, list[int]]) -> None:
        """Reset the new keys' rows: siblings (prompts equal but for the last token) share one prefill of the
        prefix, copied into each sibling's slot; the last token is then appended like any chunk."""
        prefixes: dict[tuple[int, ...], int] = {}
        for key, slot in new_keys:
            prefix = tuple(admitted[slot][:-1])
            if prefix and prefix not in prefixes:
                prefixes[prefix] = len(prefixes)
        slots: list[int] = []
        if prefixes:
            prefix_cache = prefill_prefixes(self.sampler, list(prefixes), self.prefill_stats)
            gather, sibling_prefixes = [], []
            for key, slot in new_keys:
                if len(admitted[slot]) > 1:
                    gather.append(prefixes[tuple(admitted[slot][:-1])])
                    sibling_prefixes.append(admitted[slot][:-1])
                    slots.append(slot)
                    admitted[slot] = admitted[slot][-1:]
            self.prefill_stats.shared_prefix_tokens_saved += sum(
                len(admitted_prefix) for admitted_prefix in sibling_prefixes) - sum(map(len, prefixes))
            if self.sampler.share_prefixes:  # sibling rows refer to the prefix in the store instead of a copy
                lengths = [len(p) for p in prefixes] + [0] * (prefix_cache.batch_size - len(prefixes))
                row_slots = self.sampler.row_slots(min(map(len, prefixes)))
                prefix_cache = self._add_prefixes(prefix_cache.as_prefix_store(lengths, row_slots))
            self._put(slots, prefix_cache, gather)
            if self.sampler.share_prefixes:
                self._compact_prefixes()
        empty_slots = [slot for key, slot in new_keys if slot not in slots]
        if empty_slots:
            template = self.cache if self.cache is not None else None
            empty = KVCache.init(self.sampler.cfg, len(empty_slots), self.sampler.min_cache_len,
                                  self.sampler.cache_dtype)
            if template is not None:
                empty = empty.replace(extra={n: jnp.zeros((len(empty_slots),) + x.shape[1:], x.dtype)
                                             for n, x in template.extra.items()})
            self._put(empty_slots, empty)

    def _compact_prefixes(self) -> None:
        """Keep the store entries that slots with an owner or parked rows refer to (others dropped, ids remapped)."""
        if self.cache is None or not self.cache.has_prefix_store:
            return
        ids = np.asarray(self.cache.prefix_id)
        parked_ids = {key: int(np.asarray(row.prefix_id)[0]) for key, row in self.parked.items()
                      if row.prefix_id is not None}
        keep = sorted({int(ids[s]) for s in range(self.num_slots) if self.owner[s] is not None and ids[s] >= 0}
                      | {i for i in parked_ids.values() if i >= 0})
        self.cache, table = compact_prefix_store(self.cache, keep, min_entries=self.store_entries)
        if self.cache.has_prefix_store:
            self.store_entries = self.cache.num_prefixes
        self.cache = self.sampler.shard_cache(self.cache)
        for key, old in parked_ids.items():
            new = int(table[old]) if old >= 0 else -1
            self.parked[key] = self.parked[key].replace(prefix_id=jnp.asarray([new], jnp.int32))

    def _add_prefixes(self, templates: KVCache) -> KVCache:
        """Append the templates' store entries (KVCache.as_prefix_store) to the session store, after dropping
        unreferenced entries; → the templates with prefix ids into the session store."""
        self._compact_prefixes()
        self._ensure_cache(templates.max_len, exact=True)
        templates = grow_cache(templates, self.cache.max_len)
        cache = self.cache
        if cache.has_prefix_store:
            offset = cache.num_prefixes
            cache = cache.replace(**concat_stores([cache, templates]))
        else:
            offset = 0
            cache = cache.replace(prefix_k=templates.prefix_k, prefix_v=templates.prefix_v,
                                  prefix_valid=templates.prefix_valid,
                                  prefix_id=jnp.full((cache.batch_size,), -1, jnp.int32),
                                  prefix_len=jnp.zeros((cache.batch_size,), jnp.int32))
        self.cache = self.sampler.shard_cache(cache)
        return templates.replace(prefix_id=templates.prefix_id + offset)

    def _decode_rows(self) -> np.ndarray:
        """Slot of each row of this decode call: every slot, or (tail) the active ones padded to a power of two."""
        all_rows = np.arange(self.num_slots)
        row_bytes = (self.cache.k.nbytes + self.cache.v.nbytes) // self.num_slots
        if not self.shrink_row_bytes or row_bytes > self.shrink_row_bytes:
            return all_rows
        active = np.flatnonzero(self.active)
        target = next_bucket(len(active), 1)
        target = -(-target // self.sampler.batch_multiple) * self.sampler.batch_multiple
        if target > self.num_slots // 2:
            return all_rows
        others = [s for s in all_rows if not self.active[s]][:target - len(active)]  # distinct idle padding
        return np.concatenate([active, np.asarray(others, np.int64)]).astype(np.int32)

    def _decode_chunk(self) -> dict[Hashable, TurnOutput]:
        sampler = self.sampler
        steps = self.decode_steps
        ends = np.asarray(self.cache.end)
        self._ensure_cache(int(ends.max()) + steps + 1)
        rows = self._decode_rows()
        shrunk = len(rows) < self.num_slots
        filler = next(k for k in self.keys if k is not None)
        keys = sampler.shard_rows(jnp.stack([self.keys[s] if self.keys[s] is not None else filler for s in rows]))
        active = self.active[rows].copy()
        if shrunk:
            index = jnp.asarray(rows)
            cache, logits = sampler.shard_cache(self.cache.take_rows(index)), jnp.take(self.next_logits, index, 0)
        else:
            cache, logits = self.cache, self.next_logits
        cache, store = split_store(cache)
        (cache, logits, active_dev, remaining_dev, _, tokens, token_logprobs, num_generated) = decode_chunk(
            sampler.graphdef, sampler.state, cache, logits, sampler.shard_rows(jnp.asarray(active)),
            sampler.shard_rows(jnp.asarray(self.remaining[rows])), keys, params=sampler.params, num_steps=steps,
            stop_ids=sampler.stop_token_ids, store=store)
        cache = attach_store(cache, store)
        if shrunk:
            own, store = split_store(self.cache)
            self.cache = sampler.shard_cache(attach_store(put_rows(own, index, split_store(cache)[0]), store))
            self.next_logits = self.next_logits.at[index].set(logits)
        else:
            self.cache, self.next_logits = cache, logits
        tokens, token_logprobs, num_generated = np.asarray(tokens), np.asarray(token_logprobs), np.asarray(num_generated)
        self.stats.decode_row_steps += len(rows) * int(num_generated.max())
        self.stats.generated_tokens += int(num_generated.sum())
        self.active[rows], self.remaining[rows] = np.asarray(active_dev), np.asarray(remaining_dev)
        self._clock += 1
        finished = {}
        for pos in np.flatnonzero(active):
            slot, n = int(rows[pos]), int(num_generated[pos])
            self.generated[slot] += tokens[pos, :n].tolist()
            self.logprobs[slot] += token_logprobs[pos, :n].tolist()
            self.last_used[slot] = self._clock
            if not self.active[slot]:
                ids = self.generated[slot]
                reason = "stop_token" if ids and ids[-1] in sampler.stop_token_ids else "length"
                finished[self.owner[slot]] = TurnOutput(np.asarray(ids, np.int32),
                                                        np.asarray(self.logprobs[slot], np.float32), reason)
                self.keys[slot] = None
        return finished
