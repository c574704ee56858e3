"""Softmax attention kernels of the decoder, chosen by `ModelConfig.attention_impl` in `attention()`.

    AttentionContext (per forward) ─► attention(q, k, v, ctx, impl, block)
      "xla":    cache → blockwise_attention (online softmax over key blocks, never [T, S]; a shared-prefix
                store read once per entry);
                no cache → causal_blocked_attention / grouped_attention up to T = block,
                causal_blockwise_attention beyond
      "splash": JAX's Pallas TPU splash kernel without a cache, blockwise with one
      others:   jax.nn.dot_product_attention with full_attention_mask (cuDNN on GPU)

All scores and softmax statistics are float32. q [B,T,H,Dh], k/v [B,S,Hkv,Dh] with GQA (H a multiple of Hkv).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class AttentionContext(NamedTuple):
    """What every block needs about the current chunk; built once per forward.

    The attention mask is implied, never stored: mask[b,t,s] = key_valid[b,s] & (s <= query_slots[b,t])
    (causal + padding without a cache; the cache's valid slots up to the query's own slot with one).
    `full_attention_mask(ctx)` builds the [B,T,S] array for the paths that need it.
    """

    positions: jax.Array  # [B, T] int32
    token_mask: jax.Array  # [B, T] bool
    key_valid: jax.Array  # [B, S] bool: key slot holds a real token; S = T without cache, cache.max_len with it
    query_slots: jax.Array  # [B, T] int32: slot of each query; query t may see key s iff key_valid[b,s] & s <= slot
    rope_cos: jax.Array  # [B, T, rotary_dim // 2] float32
    rope_sin: jax.Array  # [B, T, rotary_dim // 2] float32
    write_slots: jax.Array | None  # [B, T] int32 cache slot of each token; None without cache
    # [B, S_p] bool: slots of the cache's shared-prefix store (models/cache.py) a row reads as keys before
    # its own; None without a store
    prefix_key_valid: jax.Array | None = None


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention with GQA. q [B,T,H,Dh], k/v [B,S,Hkv,Dh], mask [B,T,S] → [B,T,H,Dh]."""
    batch, steps, num_heads, head_dim = q.shape
    num_kv = k.shape[2]
    q = q.reshape(batch, steps, num_kv, num_heads // num_kv, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(head_dim)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(batch, steps, num_heads, head_dim)


CAUSAL_BLOCK_MIN_ROWS = 128  # query rows per block of causal_blocked_attention (smaller blocks: matmuls too thin)
# Each block unrolls its own ops per layer: SmolLM2 (30 layers) T=512 fwd+bwd compiles in 7 s plain, 12 s with 2
# blocks, 19 s with 4, 36 s with 8, for 37% / 45% / 53% less attention time (2-core CPU). 2 is the default trade.
CAUSAL_MAX_BLOCKS = 2


def causal_blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, blocks: int) -> jax.Array:
    """grouped_attention for a causal self-attention chunk (S == T) that skips the all-masked upper blocks.

    Query block i attends keys [0, end_i) only, end_i = its last row + 1: every later key is masked by
    causality, so its softmax weight is exactly 0 in grouped_attention too and the result is the same up
    to fp32 summation order. Costs (blocks+1)/(2·blocks) of the score/value matmuls and softmax work.
    q [B,T,H,Dh], k/v [B,T,Hkv,Dh], mask [B,T,T] (must include causality) → [B,T,H,Dh].
    """
    steps = q.shape[1]
    bounds = [round(i * steps / blocks) for i in range(blocks + 1)]
    outs = [grouped_attention(q[:, lo:hi], k[:, :hi], v[:, :hi], mask[:, lo:hi, :hi])
            for lo, hi in zip(bounds[:-1], bounds[1:])]
    return jnp.concatenate(outs, axis=1)


def causal_blocks(steps: int) -> int:
    """How many query blocks causal_blocked_attention uses for a chunk of `steps` tokens (1 = plain)."""
    return max(1, min(CAUSAL_MAX_BLOCKS, steps // CAUSAL_BLOCK_MIN_ROWS))


def full_attention_mask(ctx: AttentionContext) -> jax.Array:
    """[B, T, S] bool mask implied by ctx (materialises T × S: the einsum / dot_product_attention paths)."""
    slot_ids = jnp.arange(ctx.key_valid.shape[1], dtype=jnp.int32)
    return ctx.key_valid[:, None, :] & (slot_ids[None, None, :] <= ctx.query_slots[:, :, None])


def _online_softmax_block(q, k, v, key_valid, key_slots, query_slots, carry):
    """One key block of blockwise attention. q [B,Tq,Hkv,G,Dh] (pre-scaled), k/v [B,Sb,Hkv,Dh],
    key_valid [B,Sb], key_slots [Sb], query_slots [B,Tq]; carry (m, l [B,Hkv,G,Tq], acc [B,Hkv,G,Tq,Dh])."""
    m, l, acc = carry
    mask = key_valid[:, None, :] & (key_slots[None, None, :] <= query_slots[:, :, None])  # [B, Tq, Sb]
    mask = mask[:, None, None]  # [B, 1, 1, Tq, Sb]
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    m_new = jnp.maximum(m, jnp.max(jnp.where(mask, scores, -jnp.inf), axis=-1))  # -inf while no key seen
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    probs = jnp.where(mask, jnp.exp(scores - m_safe[..., None]), 0.0)
    correction = jnp.where(jnp.isfinite(m), jnp.exp(m - m_safe), 0.0)
    l = l * correction + probs.sum(axis=-1)
    acc = acc * correction[..., None] + jnp.einsum("bkgts,bskd->bkgtd", probs.astype(v.dtype), v,
                                                   preferred_element_type=jnp.float32)
    return m_new, l, acc


# blockwise_attention's store phase computes every row's queries against each store entry (rows of other
# entries masked): P× the score work of the rows' own prefixes, worth it only for a store of a few entries;
# with more, each row's entry block is gathered and attended per row
SHARED_READ_MAX_PREFIXES = 2


def _store_phase(qg: jax.Array, slots: jax.Array, carry: tuple, prefix: tuple, layer: int, block: int) -> tuple:
    """The online softmax over a shared-prefix store (models/cache.py) before the row's own key blocks: every
    valid slot of a row's entry precedes all of its own slots, so it is visible to each of the row's real
    queries (slots >= 0; padded query rows have -1). qg [B,Tq,Hkv,G,Dh] pre-scaled, slots [B,Tq];
    prefix = (prefix_k, prefix_v [L,P,S_p,Hkv,Dh], row_valid [B,S_p], prefix_id [B], entry_valid [P,S_p]).
    With at most SHARED_READ_MAX_PREFIXES entries, each entry's block is read once and attended by all B·Tq
    queries as one matrix product ([1, B·Tq] × [1, block], rows of other entries masked) instead of B thin
    products over B copies: at τ³ size (8 rows, 4.4k shared slots) a decode step 0.41 → 0.20 s on 2 CPU cores."""
    store_k, store_v, row_valid, ids, entry_valid = prefix
    batch, q_rows, num_kv, groups, head_dim = qg.shape
    num_prefixes, store_len = entry_valid.shape
    key_block = min(block, store_len)
    body_math = jax.checkpoint(_online_softmax_block)
    zero_slots = jnp.zeros((key_block,), jnp.int32)  # before every real query (slot >= 0)

    def read(store, start, first, count):  # [count, key_block, Hkv, Dh] entries [first, first + count)
        return jax.lax.dynamic_slice(store, (layer, first, start, 0, 0),
                                     (1, count, key_block, num_kv, head_dim))[0].astype(qg.dtype)

    def block_at(index):  # (slot read from, fresh [key_block]: slots an earlier block did not cover)
        start = index * key_block
        read_from = jnp.minimum(start, store_len - key_block)
        return read_from, read_from + jnp.arange(key_block, dtype=jnp.int32) >= start

    if num_prefixes > SHARED_READ_MAX_PREFIXES:  # per row: its entry's block gathered by prefix_id
        def gathered(c, index):
            read_from, fresh = block_at(index)
            valid = jax.lax.dynamic_slice_in_dim(row_valid, read_from, key_block, axis=1) & fresh[None]

            def attend(c):
                k_b, v_b = (jnp.take(read(store, read_from, 0, num_prefixes), jnp.maximum(ids, 0), axis=0)
                            for store in (store_k, store_v))
                return body_math(qg, k_b, v_b, valid, zero_slots, slots, c)

            seen = jnp.any(valid[:, None, :] & (slots[:, :, None] >= 0))
            return jax.lax.cond(seen, attend, lambda c: c, c), None

        return jax.lax.scan(gathered, carry, jnp.arange(-(-store_len // key_block), dtype=jnp.int32))[0]

    q_all = qg.reshape(1, batch * q_rows, num_kv, groups, head_dim)

    def shared(c, index):
        read_from, fresh = block_at(index)
        for entry in range(num_prefixes):
            valid = jax.lax.dynamic_slice_in_dim(entry_valid[entry], read_from, key_block)[None] & fresh[None]
            entry_slots = jnp.where((ids == entry)[:, None], slots, -1).reshape(1, batch * q_rows)
            seen = jnp.any(valid) & jnp.any(entry_slots >= 0)

            def attend(c, entry=entry, valid=valid, entry_slots=entry_slots):
                k_b, v_b = (read(store, read_from, entry, 1) for store in (store_k, store_v))
                return body_math(q_all, k_b, v_b, valid, zero_slots, entry_slots, c)

            c = jax.lax.cond(seen, attend, lambda c: c, c)
        return c, None

    # carries in the all-rows layout [1, Hkv, G, B·Tq(, Dh)] and back
    flat = tuple(x.transpose(1, 2, 0, 3, *range(4, x.ndim)).reshape(1, num_kv, groups, batch * q_rows, *x.shape[4:])
                 for x in carry)
    flat, _ = jax.lax.scan(shared, flat, jnp.arange(-(-store_len // key_block), dtype=jnp.int32))
    return tuple(x.reshape(num_kv, groups, batch, q_rows, *x.shape[4:]).transpose(2, 0, 1, 3, *range(4, x.ndim))
                 for x in flat)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array, query_slots: jax.Array,
                        block: int, layer: int | None = None, prefix: tuple | None = None) -> jax.Array:
    """Softmax attention with GQA that never materialises T × S: an online softmax (running max m, running
    sum l, running output acc; the flash-attention recurrence) over key blocks of `block` slots, and query
    blocks of `block` rows when T > block. Peak scratch per head is O(block²) instead of O(T·S).

    mask[b,t,s] = key_valid[b,s] & (s <= query_slots[b,t]); key blocks no query of the block may see
    (beyond the causal diagonal, or unused cache slots) are skipped by a `lax.cond`. Equal to
    grouped_attention on rows with at least one visible key (fp32 summation order aside); rows with none
    (padding) return 0. Differentiable: the per-block body is rematerialised in the backward pass, so the
    saved residuals are O(T · D) per block, not the scores.
    q [B,T,H,Dh], k/v [B,S,Hkv,Dh], key_valid [B,S] bool, query_slots [B,T] int32 → [B,T,H,Dh].
    With `layer`, k/v are the stacked cache [L,B,S,Hkv,Dh] (any dtype; cast per block to q's) and each key
    block is read from k[layer] in place, only when the block is not skipped: slicing k[layer] first would
    copy the layer's whole cache every call (2 × 41 MB per layer per decode step at τ³ size).
    `prefix` = (prefix_k, prefix_v [L,P,S_p,Hkv,Dh], row_valid [B,S_p], prefix_id [B], entry_valid [P,S_p])
    with `layer`: the cache's shared-prefix store, whose keys precede each row's own (`_store_phase`, run
    first). Equal to a cache whose rows hold copies of their prefix up to fp32 summation order (a block
    that would mix prompt and own keys is two blocks here).
    """
    batch, steps, num_heads, head_dim = q.shape
    slot_axis = 1 if layer is None else 2
    num_kv, kv_len = k.shape[slot_axis + 1], k.shape[slot_axis]
    groups = num_heads // num_kv
    key_block = min(block, kv_len)
    kv_blocks = -(-kv_len // key_block)
    scale = 1.0 / math.sqrt(head_dim)
    body_math = jax.checkpoint(_online_softmax_block)
    if prefix is not None and layer is None:
        raise ValueError("blockwise_attention: a prefix store needs the stacked cache and its `layer`")

    def key_block_at(kv, start):  # [B, key_block, Hkv, Dh] in q's dtype
        if layer is None:
            return jax.lax.dynamic_slice_in_dim(kv, start, key_block, axis=1).astype(q.dtype)
        return jax.lax.dynamic_slice(kv, (layer, 0, start, 0, 0),
                                     (1, batch, key_block, num_kv, head_dim))[0].astype(q.dtype)

    def one_query_block(q_block, slots):  # q_block [B,Tq,H,Dh], slots [B,Tq]
        q_rows = q_block.shape[1]
        qg = (q_block.astype(jnp.float32) * scale).astype(q.dtype).reshape(batch, q_rows, num_kv, groups, head_dim)

        def body(carry, index):
            # key blocks are sliced in place (no blocked or padded copy of k/v); a last partial block is read
            # ending at kv_len and its slots the block before already covered are masked out
            start = index * key_block
            read = jnp.minimum(start, kv_len - key_block)
            key_slots = read + jnp.arange(key_block, dtype=jnp.int32)
            fresh = (key_slots >= start)[None]
            visible = key_slots[None, None, :] <= slots[:, :, None]  # [B, Tq, Sb]
            valid_b = jax.lax.dynamic_slice_in_dim(key_valid, read, key_block, axis=1) & fresh
            seen = jnp.any(valid_b[:, None, :] & visible)
            outside = None if layer is not None else (key_block_at(k, read), key_block_at(v, read))

            def attend(c):  # the cache path reads its block here, so a skipped block is never read
                k_b, v_b = outside if outside is not None else (key_block_at(k, read), key_block_at(v, read))
                return body_math(qg, k_b, v_b, valid_b, key_slots, slots, c)

            return jax.lax.cond(seen, attend, lambda c: c, carry), None

        init = (jnp.full((batch, num_kv, groups, q_rows), -jnp.inf, jnp.float32),
                jnp.zeros((batch, num_kv, groups, q_rows), jnp.float32),
                jnp.zeros((batch, num_kv, groups, q_rows, head_dim), jnp.float32))
        if prefix is not None:
            init = _store_phase(qg, slots, init, prefix, layer, block)
        (_, l, acc), _ = jax.lax.scan(body, init, jnp.arange(kv_blocks, dtype=jnp.int32))
        out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # [B, Hkv, G, Tq, Dh]
        return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_rows, num_heads, head_dim).astype(q.dtype)

    if steps <= block:
        return one_query_block(q, query_slots)
    q_blocks = -(-steps // block)
    pad_q = q_blocks * block - steps
    q_p = jnp.pad(q, [(0, 0), (0, pad_q), (0, 0), (0, 0)])
    slots_p = jnp.pad(query_slots, [(0, 0), (0, pad_q)], constant_values=-1)  # padded queries see nothing
    q_p = q_p.reshape(batch, q_blocks, block, num_heads, head_dim).swapaxes(0, 1)
    slots_p = slots_p.reshape(batch, q_blocks, block).swapaxes(0, 1)
    outs = jax.lax.map(lambda xs: one_query_block(*xs), (q_p, slots_p))  # [nq, B, Tq, H, Dh]
    return outs.swapaxes(0, 1).reshape(batch, q_blocks * block, num_heads, head_dim)[:, :steps]


def causal_blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array,
                               block: int) -> jax.Array:
    """Causal self-attention without a cache (S == T, query t at slot t) as an online softmax over
    query × key blocks of `block` tokens, unrolled in Python: query block i visits key blocks 0..i only
    (the ones above the diagonal are never built, no `lax.cond`), and only the diagonal block is
    partly masked by causality. Peak scratch per head O(block²); each (i, j) body is rematerialised in
    the backward, so the residuals are the running (m, l, acc), never scores. Equal to
    grouped_attention on rows that see a valid key (fp32 summation order aside); rows that see none
    (left padding) return 0. Costs (n+1)/(2n) of the full square's matmuls for n blocks; compiles
    n(n+1)/2 bodies per layer. q [B,T,H,Dh], k/v [B,T,Hkv,Dh], key_valid [B,T] bool → [B,T,H,Dh].
    """
    batch, steps, num_heads, head_dim = q.shape
    num_kv = k.shape[2]
    groups = num_heads // num_kv
    scale = 1.0 / math.sqrt(head_dim)
    body_math = jax.checkpoint(_online_softmax_block)
    slots = jnp.arange(steps, dtype=jnp.int32)
    bounds = list(range(0, steps, block)) + [steps]
    outs = []
    for q_lo, q_hi in zip(bounds[:-1], bounds[1:]):
        rows = q_hi - q_lo
        qg = (q[:, q_lo:q_hi].astype(jnp.float32) * scale).astype(q.dtype).reshape(batch, rows, num_kv, groups,
                                                                                     head_dim)
        query_slots = jnp.broadcast_to(slots[q_lo:q_hi], (batch, rows))
        carry = (jnp.full((batch, num_kv, groups, rows), -jnp.inf, jnp.float32),
                 jnp.zeros((batch, num_kv, groups, rows), jnp.float32),
                 jnp.zeros((batch, num_kv, groups, rows, head_dim), jnp.float32))
        for k_lo, k_hi in zip(bounds[:-1], bounds[1:]):
            if k_lo >= q_hi:  # every key after every query of the block: fully masked, skipped
                break
            carry = body_math(qg, k[:, k_lo:k_hi], v[:, k_lo:k_hi], key_valid[:, k_lo:k_hi], slots[k_lo:k_hi],
                              query_slots, carry)
        _, l, acc = carry
        out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # [B, Hkv, G, Tq, Dh]
        outs.append(out.transpose(0, 3, 1, 2, 4).reshape(batch, rows, num_heads, head_dim).astype(q.dtype))
    return jnp.concatenate(outs, axis=1)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, token_mask: jax.Array, *,
                     interpret: bool = False) -> jax.Array:
    """Causal self-attention (no cache) through JAX's Pallas TPU splash-attention kernel
    (jax.experimental.pallas.ops.tpu.splash_attention); padding via segment ids (real tokens 1, padding 0:
    a padding query sees only padding keys, whose output is ignored). `interpret=True` runs the kernel in
    the Pallas interpreter (CPU tests). T must be a multiple of 128 (the kernel's block size).
    q [B,T,H,Dh], k/v [B,T,Hkv,Dh] → [B,T,H,Dh]."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    batch, steps, num_heads, head_dim = q.shape
    num_kv = k.shape[2]
    if steps % 128:
        raise ValueError(f"model.attention_impl='splash' needs sequence lengths that are multiples of 128, got {steps}")
    mask = splash.MultiHeadMask([splash.CausalMask((steps, steps)) for _ in range(num_heads)])
    block = min(512, steps)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)
    groups = num_heads // num_kv
    scale = 1.0 / math.sqrt(head_dim)
    qh = (q.astype(jnp.float32) * scale).astype(q.dtype).transpose(0, 2, 1, 3)  # [B, H, T, Dh]
    kh = jnp.repeat(k.transpose(0, 2, 1, 3), groups, axis=1)
    vh = jnp.repeat(v.transpose(0, 2, 1, 3), groups, axis=1)
    segments = token_mask.astype(jnp.int32)
    out = jax.vmap(lambda qq, kk, vv, seg: kernel(qq, kk, vv, segment_ids=splash.SegmentIds(q=seg, kv=seg)))(
        qh, kh, vh, segments)
    return out.transpose(0, 2, 1, 3).astype(q.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, ctx: AttentionContext, impl: str,
              block: int = 512, layer: int | None = None, prefix: tuple | None = None) -> jax.Array:
    """Full attention by `ModelConfig.attention_impl`; q [B,T,H,Dh], k/v [B,S,Hkv,Dh] → [B,T,H,Dh].
    With a cache, pass the stacked cache k/v [L,B,S,Hkv,Dh] and this block's `layer`: blockwise attention
    reads the layer's key blocks in place; only the dot_product_attention paths slice out the layer.

    "xla": with a cache (prefill, continuation, decode) always `blockwise_attention` (online softmax over
    key blocks of `block` slots: no [T, S] scores, unused cache blocks skipped); without a cache
    `causal_blocked_attention` up to T = `block` (same values on real tokens) and
    `causal_blockwise_attention` beyond. "splash": JAX's Pallas TPU splash-attention kernel without a cache (TPU; T a multiple of 128),
    blockwise with one. The others call `jax.nn.dot_product_attention` with the same mask (causal +
    padding, or the cache's valid slots); without a cache `is_causal=True` is passed too: redundant for
    XLA, lets cuDNN skip the upper triangle.
    `prefix` = (prefix_k, prefix_v [L,P,S_p,Hkv,Dh], prefix_id [B], prefix_valid [P,S_p]): the cache's
    shared-prefix store, read in place by blockwise attention; the dot_product_attention paths put the row's
    entry in front of the layer's k/v first.
    """
    no_cache = ctx.write_slots is None
    if impl == "splash" and no_cache:
        return splash_attention(q, k, v, ctx.token_mask, interpret=jax.default_backend() != "tpu")
    if impl in ("xla", "splash"):
        if no_cache and q.shape[1] <= block:
            blocks = causal_blocks(q.shape[1])
            if blocks > 1:
                return causal_blocked_attention(q, k, v, full_attention_mask(ctx), blocks)
            return grouped_attention(q, k, v, full_attention_mask(ctx))
        if no_cache:
            return causal_blockwise_attention(q, k, v, ctx.key_valid, block)
        store = None if prefix is None else (prefix[0], prefix[1], ctx.prefix_key_valid, prefix[2], prefix[3])
        return blockwise_attention(q, k, v, ctx.key_valid, ctx.query_slots, block, layer, store)
    if layer is not None:
        k, v = k[layer].astype(q.dtype), v[layer].astype(q.dtype)
    if prefix is not None:  # the row's store entry in front of its own slots (these paths read whole rows)
        ids = jnp.maximum(prefix[2], 0)
        k = jnp.concatenate([jnp.take(prefix[0][layer], ids, axis=0).astype(q.dtype), k], axis=1)
        v = jnp.concatenate([jnp.take(prefix[1][layer], ids, axis=0).astype(q.dtype), v], axis=1)
        ctx = ctx._replace(key_valid=jnp.concatenate([ctx.prefix_key_valid, ctx.key_valid], axis=1),
                           query_slots=ctx.query_slots + ctx.prefix_key_valid.shape[1])
    from sgcd_jax.models.accel import attention_implementation
    implementation = attention_implementation("xla" if impl == "dot_product_attention" else impl)
    return jax.nn.dot_product_attention(q, k, v, mask=full_attention_mask(ctx)[:, None],  # [B, 1, T, S]
                                        is_causal=no_cache, implementation=implementation)
