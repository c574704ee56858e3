"""Host side of generation: batching, bucketing, shared-prefix prefill, multi-turn KV-cache continuation.

    sampler = Sampler(model, params=SamplingParams(temperature=1.0), stop_token_ids=(im_end_id,))
    outs = sampler.generate([prompt_ids_a, prompt_ids_b], max_new_tokens=128, rng=jax.random.key(0))

    session = sampler.session()
    turn1 = session.step({"ep0": prompt0, "ep1": prompt1}, max_new_tokens=256, rng=k1)  # prefill + decode
    turn2 = session.step({"ep0": observation0}, max_new_tokens=256, rng=k2)  # append + decode; ep1 released

A session keeps one KV cache whose rows are the live episodes. `step` receives, per episode key, the
token chunk that follows what the cache already holds: the whole prompt for a key it has not seen, the
observation suffix for a key it has. Keys missing from a step are released and their rows dropped
(compaction to the next power-of-two batch), so finished episodes stop costing compute. New keys
whose prompts share everything but the last token (G siblings of a task) are prefilled once; the prompt
is kept once in the cache's prefix store and read by the G rows (`share_prefixes`, models/cache.py), or
copied into each row (`KVCache.take_rows`) when rows are split over devices.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sgcd_jax.models.cache import KVCache
from sgcd_jax.sampling.kernels import (append_chunk, attach_store, decode_chunk, grow_cache, next_bucket, split_store,
                                      truncate_rows)
from sgcd_jax.sampling.prefill import (SessionStats, TurnOutput, append_rows, compact_prefix_store, concat_caches,
                                      prefill_prefixes)
from sgcd_jax.sampling.rules import SamplingParams


class Sampler:
    """Jitted batched generation for a `Decoder`. Stateless across calls except compiled functions."""

    def __init__(self, model: nnx.Module, *, params: SamplingParams = SamplingParams(),
                 stop_token_ids: Sequence[int] | None = None, decode_steps_per_chunk: int = 32,
                 min_cache_len: int = 256, min_chunk_len: int = 16, mesh: Mesh | None = None,
                 row_axes: str | tuple[str, ...] | None = None, decode_text: Callable[[Sequence[int]], str] | None = None,
                 prefill_chunk: int = 512, max_cache_len: int | None = None, share_prefixes: bool = True,
                 cache_dtype: Any = None, reserve_budget: bool = True):
        self.graphdef, self.state = nnx.split(model)
        self.cfg = model.cfg
        self.params = params
        # None: the model's eos ids; () generates until max tokens (benchmarks)
        self.stop_token_ids = tuple(int(t) for t in (self.cfg.eos_token_ids if stop_token_ids is None
                                                     else stop_token_ids))
        self.decode_steps_per_chunk = decode_steps_per_chunk
        self.min_cache_len = min_cache_len
        self.min_chunk_len = min_chunk_len
        self.mesh = mesh
        # batch rows split over these mesh axes (default: those of ("data", "fsdp") the mesh has)
        if row_axes is None and mesh is not None:
            row_axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
        self.row_axes = (row_axes,) if isinstance(row_axes, str) else tuple(row_axes or ())
        self.decode_text = decode_text  # needed only for stop strings
        if prefill_chunk < min_chunk_len or prefill_chunk & (prefill_chunk - 1):
            raise ValueError(f"rollout.prefill_chunk must be a power of two >= {min_chunk_len}, got {prefill_chunk}")
        # prompts / observations longer than this are appended in chunks of this many tokens: prefill memory
        # (activations [B, chunk, D], attention blocks) is bounded by the chunk, not the prompt
        self.prefill_chunk = prefill_chunk
        # cache-length buckets: powers of two from min_cache_len, the last one capped at max_cache_len (the
        # whole-conversation budget + one decode chunk): a fixed ladder chosen by the config
        self.max_cache_len = max_cache_len
        # siblings' common prompt is kept once in the cache's prefix store (models/cache.py) instead of
        # copied into each sibling's row: decoding reads it once per prefix; same values, same tokens. Only
        # with unsharded rows: the store is replicated, so with rows split over devices every device would
        # hold every task's prompt (and the rows there copy theirs, as before)
        self.share_prefixes = share_prefixes and self.batch_multiple == 1
        # KV cache storage dtype (None: the model's compute dtype). bf16 halves an fp32 model's cache; attention
        # reads it back in the compute dtype, and every token's k/v (the current one's too) passes through it
        self.cache_dtype = None if cache_dtype is None else jnp.dtype(cache_dtype)
        # a sibling row / decode slot gets KV slots for the whole conversation budget at once (no growth copies, one
        # shape per run); False: min_cache_len, grown to the next power of two as the conversation needs (the cache is
        # sized by the batch's longest live row, not the budget: SmolLM2 recipe's 32-row rollout 5.4 -> 2.2 GiB peak)
        self.reserve_budget = reserve_budget

    def cache_bucket(self, needed: int, current: int = 0) -> int:
        """Cache length for `needed` slots: the next power of two (>= current), capped at max_cache_len."""
        size = next_bucket(needed, max(self.min_cache_len, current))
        if self.max_cache_len is not None and needed <= self.max_cache_len:
            size = min(size, max(self.max_cache_len, current))
        return size

    def row_slots(self, prefix_len: int) -> int:
        """Own slots of a sibling row that reads a `prefix_len`-token prompt from the prefix store: what the
        conversation budget leaves after the prompt (a multiple of min_cache_len; min_cache_len uncapped)."""
        if self.max_cache_len is None or not self.reserve_budget:
            return self.min_cache_len
        room = max(self.max_cache_len - prefix_len, 1)
        return -(-room // self.min_cache_len) * self.min_cache_len

    def continuous(self, num_slots: int, decode_steps: int | None = None, prompts: int = 1):
        """A ContinuousSession: `num_slots` decode rows refilled across episodes (sampling.continuous);
        `prompts`: distinct prompts (tasks) the session will see, sizing the prefix store once."""
        from sgcd_jax.sampling.continuous import ContinuousSession

        return ContinuousSession(self, num_slots, decode_steps, prompts=prompts)

    @staticmethod
    def compiles() -> int:
        """Compiled shapes of the two generation kernels so far (process-wide; count deltas per run)."""
        return append_chunk._cache_size() + decode_chunk._cache_size()

    def update_weights(self, model: nnx.Module) -> None:
        """Use new policy weights (after a train step) for the next sessions."""
        self.graphdef, self.state = nnx.split(model)

    def session(self, *, reuse_cache: bool = True, compact: bool = True,
                park_idle_rows: bool = False) -> "GenerationSession":
        """reuse_cache=False re-prefills every turn (baseline); compact drops released rows between turns;
        park_idle_rows also shrinks the batch mid-turn (see GenerationSession._decode; off by default:
        on a weight-bandwidth-bound CPU decode the row copies cost more than the smaller batch saves)."""
        return GenerationSession(self, reuse_cache=reuse_cache, compact=compact, park_idle_rows=park_idle_rows)

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int], rng: jax.Array,
                 stop_strings: Sequence[str] = ()) -> list[TurnOutput]:
        """One-shot batched generation: prompts (token ids, any lengths) → one TurnOutput per prompt."""
        budgets = max_new_tokens if isinstance(max_new_tokens, Sequence) else [max_new_tokens] * len(prompts)
        outs = self.session().step({i: p for i, p in enumerate(prompts)}, max_new_tokens=dict(enumerate(budgets)),
                                   rng=rng, stop_strings=stop_strings)
        return [outs[i] for i in range(len(prompts))]

    # --- sharding helpers: rows over row_axes, the rest of cache/inputs replicated; weights stay as placed
    @property
    def batch_multiple(self) -> int:
        return int(np.prod([self.mesh.shape[a] for a in self.row_axes])) if self.mesh is not None else 1

    def shard_rows(self, x: jax.Array, axis: int = 0) -> jax.Array:
        if self.mesh is None:
            return x
        spec = [None] * x.ndim
        spec[axis] = self.row_axes
        return jax.device_put(x, NamedSharding(self.mesh, P(*spec)))

    def shard_cache(self, cache: KVCache) -> KVCache:
        if self.mesh is None:
            return cache
        if cache.prefix_id is not None:  # the store stays replicated (every row may read any entry)
            cache = cache.replace(prefix_id=self.shard_rows(cache.prefix_id),
                                  prefix_len=self.shard_rows(cache.prefix_len))
        return cache.replace(k=self.shard_rows(cache.k, 1), v=self.shard_rows(cache.v, 1),
                             valid=self.shard_rows(cache.valid), end=self.shard_rows(cache.end),
                             extra={n: self.shard_rows(s) for n, s in cache.extra.items()})


class GenerationSession:
    """One KV cache whose rows are live episodes; see the module docstring."""

    def __init__(self, sampler: Sampler, *, reuse_cache: bool = True, compact: bool = True,
                 park_idle_rows: bool = False):
        self.sampler = sampler
        self.park_idle_rows = park_idle_rows
        self.reuse_cache = reuse_cache
        self.compact = compact
        self.cache: KVCache | None = None
        self.row_keys: list[Hashable | None] = []  # row i of the cache belongs to row_keys[i] (None = free)
        self.history: dict[Hashable, list[int]] = {}  # all ids of a key so far (re-prefill mode only)
        self.stats = SessionStats()

    # ------------------------------------------------------------------ public
    def step(self, chunks: dict[Hashable, Sequence[int]], *, max_new_tokens: int | dict[Hashable, int],
             rng: jax.Array | Mapping[Hashable, jax.Array], stop_strings: Sequence[str] = ()
             ) -> dict[Hashable, TurnOutput]:
        """Append each key's chunk and generate one turn for every key in `chunks`; release the others.

        ``rng``: one key for the turn, or one key per chunk key (``{key: jax.random.key}``). With
        per-key keys a row's samples depend only on its own key and token positions — not on which
        other episodes share the batch (so a multi-host run samples what one host would)."""
        if not chunks:
            self.cache, self.row_keys = None, []
            return {}
        if stop_strings and self.sampler.decode_text is None:
            raise ValueError("stop_strings need Sampler(decode_text=tokenizer.decode)")
        chunks = {key: [int(t) for t in ids] for key, ids in chunks.items()}
        if not self.reuse_cache:  # baseline: forget the cache, re-prefill the whole conversation
            for key, ids in chunks.items():
                self.history[key] = self.history.get(key, []) + ids
            chunks = {key: list(self.history[key]) for key in chunks}
            self.cache, self.row_keys = None, []
        budgets = max_new_tokens if isinstance(max_new_tokens, dict) else dict.fromkeys(chunks, max_new_tokens)
        empty = [key for key, ids in chunks.items() if not ids]
        if empty:
            raise ValueError(f"empty chunk for keys {empty[:3]}: every step must append at least one token "
                             "(the observation / generation prompt)")
        append_ids = self._arrange_rows(chunks)
        next_logits = self._append(append_ids)
        if isinstance(rng, Mapping):
            missing = [key for key in chunks if key not in rng]
            if missing:
                raise ValueError(f"rng has no key for episodes {missing[:3]}: pass one key per chunk key")
        outputs = self._decode(next_logits, budgets, rng, stop_strings)
        if not self.reuse_cache:
            for key, out in outputs.items():
                self.history[key] += out.token_ids.tolist()
        return outputs

    # ------------------------------------------------------------------ rows
    def _arrange_rows(self, chunks: dict[Hashable, list[int]]) -> list[list[int]]:
        """Build the cache for this step's keys (compaction + shared-prefix prefill of new keys); return the
        ids each row still has to append, row-aligned with self.row_keys."""
        sampler = self.sampler
        old_row = {key: i for i, key in enumerate(self.row_keys) if key is not None}
        new_keys = [key for key in chunks if key not in old_row]
        # siblings: prompts equal up to the last token share one prefill of prompt[:-1]
        prefix_rows: dict[tuple[int, ...], int] = {}
        for key in new_keys:
            prefix = tuple(chunks[key][:-1])
            if prefix and prefix not in prefix_rows:
                prefix_rows[prefix] = len(prefix_rows)
        prefix_cache = prefill_prefixes(sampler, list(prefix_rows), self.stats) if prefix_rows else None
        if prefix_cache is not None:
            saved = sum(len(chunks[k]) - 1 for k in new_keys if len(chunks[k]) > 1) - sum(map(len, prefix_rows))
            self.stats.shared_prefix_tokens_saved += saved
            if sampler.share_prefixes:  # sibling rows refer to the prefix instead of copying it
                lengths = [len(p) for p in prefix_rows] + [0] * (prefix_cache.batch_size - len(prefix_rows))
                prefix_cache = prefix_cache.as_prefix_store(lengths, sampler.row_slots(min(map(len, prefix_rows))))

        if self.compact or self.cache is None:
            keys = [key for key in chunks if key in old_row] + new_keys
        else:  # keep released rows in place (idle), put new keys in free rows first
            keys = [key if key in chunks else None for key in self.row_keys]
            for key in new_keys:
                if None in keys:
                    keys[keys.index(None)] = key
                else:
                    keys.append(key)
        num_rows = next_bucket(max(len(keys), 1), 1)
        num_rows = -(-num_rows // sampler.batch_multiple) * sampler.batch_multiple
        keys = keys + [None] * (num_rows - len(keys))

        # gather sources: old cache rows [0, n_old), then prefix rows, then (only if needed) one empty row
        n_old = 0 if self.cache is None else self.cache.batch_size
        n_prefix = 0 if prefix_cache is None else prefix_cache.batch_size
        empty = n_old + n_prefix
        gather, append_ids = [], []
        for row, key in enumerate(keys):
            if key is None:  # padding / idle row: any row will do (it appends nothing and stays inactive)
                gather.append(row if row < n_old else (0 if n_old + n_prefix else empty))
                append_ids.append([])
            elif key in old_row:
                gather.append(old_row[key])
                append_ids.append(chunks[key])
            elif len(chunks[key]) > 1:
                gather.append(n_old + prefix_rows[tuple(chunks[key][:-1])])
                append_ids.append(chunks[key][-1:])
            else:
                gather.append(empty)
                append_ids.append(chunks[key])
        if self.cache is not None and gather == list(range(n_old)):
            cache = self.cache  # same rows, same order: no copy
        elif empty not in gather and prefix_cache is None:
            cache = self.cache.take_rows(jnp.asarray(gather, jnp.int32))  # compaction only: one copy
        else:
            sources = [self.cache, prefix_cache]
            if empty in gather:
                template = self.cache if self.cache is not None else prefix_cache
                empty_row = KVCache.init(sampler.cfg, 1, sampler.min_cache_len, sampler.cache_dtype)
                if template is not None:
                    empty_row = grow_cache(empty_row, template.max_len).replace(
                        extra={n: jnp.zeros_like(x[:1]) for n, x in template.extra.items()})
                sources.append(empty_row)
            cache = concat_caches(sources).take_rows(jnp.asarray(gather, jnp.int32))
        cache = compact_prefix_store(cache)[0]  # prefixes of released rows (and padding rows) dropped
        self.cache = sampler.shard_cache(cache)
        self.row_keys = keys
        return append_ids

    # ------------------------------------------------------------------ device calls
    def _append(self, append_ids: list[list[int]]) -> jax.Array:
        self.cache, next_logits = append_rows(self.sampler, self.cache, append_ids, self.stats)
        return next_logits

    def _decode(self, next_logits: jax.Array, budgets: dict[Hashable, int],
                rng: jax.Array | Mapping[Hashable, jax.Array],
                stop_strings: Sequence[str]) -> dict[Hashable, TurnOutput]:
        """Decode one turn for every live row. Rows index self.row_keys; while decoding, the working cache
        holds `work_rows` (original row per position, -1 = padding). When at most half of the working
        rows are still active, the idle ones are parked and the batch shrinks (a straggler then no longer
        drags the whole batch); parked rows are put back in order at the end of the turn."""
        sampler = self.sampler
        num_rows = len(self.row_keys)
        live = np.array([key is not None and key in budgets for key in self.row_keys])
        remaining = np.array([budgets[key] if live[i] else 0 for i, key in enumerate(self.row_keys)], np.int32)
        active = live & (remaining > 0)
        generated = [[] for _ in range(num_rows)]
        logprobs = [[] for _ in range(num_rows)]
        finish = ["length"] * num_rows
        steps = sampler.decode_steps_per_chunk
        work_rows, parked = list(range(num_rows)), []
        keys_by_row = None  # [num_rows] per-row keys (rows that decode nothing get any key)
        if isinstance(rng, Mapping):
            filler = next(iter(rng.values()))
            keys_by_row = jnp.stack([rng[key] if live[i] else filler for i, key in enumerate(self.row_keys)])
        while active.any():
            if self.park_idle_rows:
                next_logits, active, remaining, work_rows = self._park_idle_rows(
                    next_logits, active, remaining, work_rows, parked)
            ends = np.asarray(self.cache.end)
            self.cache = sampler.shard_cache(grow_cache(self.cache, sampler.cache_bucket(int(ends.max()) + steps + 1,
                                                                                         self.cache.max_len)))
            if keys_by_row is None:
                rng, chunk_key = jax.random.split(rng)
            else:  # the same per-row keys every chunk: decode_chunk folds in each token's position
                chunk_key = sampler.shard_rows(keys_by_row[np.maximum(np.asarray(work_rows), 0)])
            rows, store = split_store(self.cache)
            (rows, next_logits, active_dev, remaining_dev, _, tokens, token_logprobs,
             num_generated) = decode_chunk(
                sampler.graphdef, sampler.state, rows, next_logits, sampler.shard_rows(jnp.asarray(active)),
                sampler.shard_rows(jnp.asarray(remaining)), chunk_key, params=sampler.params, num_steps=steps,
                stop_ids=sampler.stop_token_ids, store=store)
            self.cache = attach_store(rows, store)
            tokens, token_logprobs = np.asarray(tokens), np.asarray(token_logprobs)
            num_generated = np.asarray(num_generated)
            self.stats.decode_row_steps += len(work_rows) * int(num_generated.max())
            self.stats.generated_tokens += int(num_generated.sum())
            new_active, remaining = np.asarray(active_dev).copy(), np.asarray(remaining_dev).copy()
            truncate_to = None
            for pos in np.flatnonzero(active):
                row, n = work_rows[pos], int(num_generated[pos])
                generated[row] += tokens[pos, :n].tolist()
                logprobs[row] += token_logprobs[pos, :n].tolist()
                if n and generated[row][-1] in sampler.stop_token_ids:
                    finish[row] = "stop_token"
                elif stop_strings:
                    cut = _stop_string_cut(generated[row], n, stop_strings, sampler.decode_text)
                    if cut is not None:
                        dropped = len(generated[row]) - cut
                        del generated[row][cut:], logprobs[row][cut:]
                        finish[row], new_active[pos] = "stop_string", False
                        if dropped:
                            truncate_to = np.asarray(self.cache.end).copy() if truncate_to is None else truncate_to
                            truncate_to[pos] -= dropped
            if truncate_to is not None:
                rows, store = split_store(self.cache)
                self.cache = attach_store(truncate_rows(rows, jnp.asarray(truncate_to)), store)
            active = new_active
        if parked:
            self._unpark(work_rows, parked, num_rows)
        return {key: TurnOutput(np.asarray(generated[i], np.int32), np.asarray(logprobs[i], np.float32), finish[i])
                for i, key in enumerate(self.row_keys) if live[i]}

    def _park_idle_rows(self, next_logits, active, remaining, work_rows, parked):
        sampler = self.sampler
        keep = np.flatnonzero(active)
        target = next_bucket(len(keep), 1)
        target = -(-target // sampler.batch_multiple) * sampler.batch_multiple
        if target > len(work_rows) // 2:
            return next_logits, active, remaining, work_rows
        idle = np.flatnonzero(~active)
        parked.append(([work_rows[i] for i in idle], self.cache.take_rows(jnp.asarray(idle, jnp.int32))))
        gather = np.concatenate([keep, np.full(target - len(keep), keep[0])]).astype(np.int32)
        self.cache = sampler.shard_cache(self.cache.take_rows(jnp.asarray(gather)))
        next_logits = sampler.shard_rows(jnp.take(next_logits, jnp.asarray(gather), axis=0))
        pad = target - len(keep)
        active = np.concatenate([active[keep], np.zeros(pad, bool)])
        remaining = np.concatenate([remaining[keep], np.zeros(pad, np.int32)]).astype(np.int32)
        return next_logits, active, remaining, [work_rows[i] for i in keep] + [-1] * pad

    def _unpark(self, work_rows, parked, num_rows) -> None:
        pieces = parked + [(work_rows, self.cache)]
        position_of, offset = {}, 0
        for rows, cache in pieces:
            for j, row in enumerate(rows):
                if row >= 0:
                    position_of.setdefault(row, offset + j)
            offset += cache.batch_size
        source = concat_caches([cache for _, cache in pieces])
        gather = jnp.asarray([position_of[row] for row in range(num_rows)], jnp.int32)
        self.cache = self.sampler.shard_cache(source.take_rows(gather))


def _stop_string_cut(ids: list[int], num_new: int, stop_strings: Sequence[str],
                     decode: Callable[[Sequence[int]], str]) -> int | None:
    """Smallest token count whose decoded text contains a stop string, if the new tokens completed one."""
    text = decode(ids)
    if not any(s in text for s in stop_strings):
        return None
    for cut in range(max(len(ids) - num_new, 0) + 1, len(ids) + 1):
        prefix = decode(ids[:cut])
        if any(s in prefix for s in stop_strings):
            return cut
    return len(ids)
