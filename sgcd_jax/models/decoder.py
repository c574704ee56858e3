"""Flax NNX decoder: Llama / Qwen2 / Qwen3 (and hybrids via `layer_types`) by config.

    tokens [B,T] ─► embed ─► N × block(layer_types[i]) ─► final RMSNorm ─► hidden [B,T,D]
    block "full_attention":  x + Attn(RMSNorm(x));  x + SwiGLU(RMSNorm(x))

Parameters are stored in `cfg.param_dtype` and cast to `cfg.dtype` where used; attention scores, softmax,
norms, RoPE and the LM-head logits run/accumulate in float32 (so a bf16 `dtype` keeps them accurate).
Accelerator knobs (ModelConfig): `attention_impl` ("xla" einsum path, or jax.nn.dot_product_attention
with "dot_product_attention" | "cudnn" | "auto") and `remat_policy` (memory_plan.remat_policy names,
applied with nnx.remat per block in the no-cache forward; attention output is named "attention_out"). Kernels are [in, out]. Another block kind (e.g. Gated DeltaNet) plugs in with
`register_block("linear_attention")(factory)` and may keep its recurrent state in `KVCache.extra`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from sgcd_jax.models.cache import KVCache
from sgcd_jax.models.config import ModelConfig

_INIT_STD = 0.02


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


# ----------------------------------------------------------------------------- pure math
def rope_inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
    """inv_freq [rotary_dim // 2] with optional linear / llama3 (Llama 3.1 paper) scaling."""
    dim = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq.astype(np.float32)
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return (inv_freq / factor).astype(np.float32)
    # llama3: long wavelengths divided by factor, short kept, a smooth blend in between.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return np.where(is_medium, blended, scaled).astype(np.float32)


def rope_angles(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, rotary_dim // 2] for integer positions [B, T]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inverse_frequencies(cfg))
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the first 2*cos.shape[-1] dims of x [B,T,H,Dh] (HF 'rotate_half' layout: halves, not pairs)."""
    half = cos.shape[-1]
    rot, rest = x[..., : 2 * half].astype(jnp.float32), x[..., 2 * half:]
    first, second = rot[..., :half], rot[..., half:]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return jnp.concatenate([rotated.astype(x.dtype), rest], axis=-1)


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


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array, query_slots: jax.Array,
                        block: int) -> jax.Array:
    """Softmax attention with GQA that never materialises T × S: an online softmax (running max m, running
    sum l, running output acc; the flash-attention recurrence) over key blocks of `block` slots, and query
    blocks of `block` rows when T > block. Peak scratch per head is O(block²) instead of O(T·S).

    mask[b,t,s] = key_valid[b,s] & (s <= query_slots[b,t]); key blocks no query of the block may see
    (beyond the causal diagonal, or unused cache slots) are skipped by a `lax.cond`. Equal to
    grouped_attention on rows with at least one visible key (fp32 summation order aside); rows with none
    (padding) return 0. Differentiable: the per-block body is rematerialised in the backward pass, so the
    saved residuals are O(T · D) per block, not the scores.
    q [B,T,H,Dh], k/v [B,S,Hkv,Dh], key_valid [B,S] bool, query_slots [B,T] int32 → [B,T,H,Dh].
    """
    batch, steps, num_heads, head_dim = q.shape
    num_kv, kv_len = k.shape[2], k.shape[1]
    groups = num_heads // num_kv
    key_block = min(block, kv_len)
    kv_blocks = -(-kv_len // key_block)
    pad_kv = kv_blocks * key_block - kv_len
    if pad_kv:  # copies k/v: keep cache lengths multiples of the block (sampling buckets are)
        k = jnp.pad(k, [(0, 0), (0, pad_kv), (0, 0), (0, 0)])
        v = jnp.pad(v, [(0, 0), (0, pad_kv), (0, 0), (0, 0)])
        key_valid = jnp.pad(key_valid, [(0, 0), (0, pad_kv)])
    scale = 1.0 / math.sqrt(head_dim)
    body_math = jax.checkpoint(_online_softmax_block)

    def one_query_block(q_block, slots):  # q_block [B,Tq,H,Dh], slots [B,Tq]
        q_rows = q_block.shape[1]
        qg = (q_block.astype(jnp.float32) * scale).astype(q.dtype).reshape(batch, q_rows, num_kv, groups, head_dim)

        def body(carry, index):
            start = index * key_block  # key blocks are sliced in place: no blocked copy of the cache
            k_b = jax.lax.dynamic_slice_in_dim(k, start, key_block, axis=1)
            v_b = jax.lax.dynamic_slice_in_dim(v, start, key_block, axis=1)
            valid_b = jax.lax.dynamic_slice_in_dim(key_valid, start, key_block, axis=1)
            key_slots = start + jnp.arange(key_block, dtype=jnp.int32)
            seen = jnp.any(valid_b[:, None, :] & (key_slots[None, None, :] <= slots[:, :, None]))
            carry = jax.lax.cond(seen, lambda c: body_math(qg, k_b, v_b, valid_b, key_slots, slots, c),
                                 lambda c: c, carry)
            return carry, None

        init = (jnp.full((batch, num_kv, groups, q_rows), -jnp.inf, jnp.float32),
                jnp.zeros((batch, num_kv, groups, q_rows), jnp.float32),
                jnp.zeros((batch, num_kv, groups, q_rows, head_dim), jnp.float32))
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
              block: int = 512) -> jax.Array:
    """Full attention by `ModelConfig.attention_impl`; q [B,T,H,Dh], k/v [B,S,Hkv,Dh] → [B,T,H,Dh].

    "xla": with a cache (prefill, continuation, decode) always `blockwise_attention` (online softmax over
    key blocks of `block` slots: no [T, S] scores, unused cache blocks skipped); without a cache
    `causal_blocked_attention` up to T = `block` (same values on real tokens) and `blockwise_attention`
    beyond. "splash": JAX's Pallas TPU splash-attention kernel without a cache (TPU; T a multiple of 128),
    blockwise with one. The others call `jax.nn.dot_product_attention` with the same mask (causal +
    padding, or the cache's valid slots); without a cache `is_causal=True` is passed too: redundant for
    XLA, lets cuDNN skip the upper triangle.
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
        return blockwise_attention(q, k, v, ctx.key_valid, ctx.query_slots, block)
    from sgcd_jax.memory_plan import attention_implementation  # memory_plan imports models.config
    implementation = attention_implementation("xla" if impl == "dot_product_attention" else impl)
    return jax.nn.dot_product_attention(q, k, v, mask=full_attention_mask(ctx)[:, None],  # [B, 1, T, S]
                                        is_causal=no_cache, implementation=implementation)


# ----------------------------------------------------------------------------- layers
class Linear(nnx.Module):
    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, cfg: ModelConfig, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(_INIT_STD)
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), cfg.param_dtype))  # [in, out]
        self.bias = nnx.Param(jnp.zeros((out_features,), cfg.param_dtype)) if use_bias else None
        self.dtype = cfg.dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, cfg: ModelConfig, rngs: nnx.Rngs | None = None):
        del rngs
        # zero-centred (Qwen3.5): the stored weight is an offset, scale = 1 + w, applied in float32
        self.zero_centered = bool(cfg.extra.get("zero_centered_norm", False))
        self.scale = nnx.Param(jnp.full((dim,), 0.0 if self.zero_centered else 1.0, cfg.param_dtype))
        self.eps = cfg.rms_norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.zero_centered:
            return (normed * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)
        return normed.astype(x.dtype) * self.scale[...].astype(x.dtype)


class Attention(nnx.Module):
    """GQA self-attention; with a cache, writes this chunk's k/v at ctx.write_slots then attends to the cache."""

    def __init__(self, cfg: ModelConfig, layer_index: int, *, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Linear(d, h * hd, use_bias=cfg.attention_bias, cfg=cfg, rngs=rngs)
        self.k_proj = Linear(d, kv * hd, use_bias=cfg.attention_bias, cfg=cfg, rngs=rngs)
        self.v_proj = Linear(d, kv * hd, use_bias=cfg.attention_bias, cfg=cfg, rngs=rngs)
        self.o_proj = Linear(h * hd, d, use_bias=False, cfg=cfg, rngs=rngs)
        self.q_norm = RMSNorm(hd, cfg=cfg) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg=cfg) if cfg.qk_norm else None
        self.shape = (h, kv, hd)
        self.layer_index = layer_index
        self.attention_impl = cfg.attention_impl
        self.attention_block = cfg.attention_block

    def __call__(self, x: jax.Array, ctx: AttentionContext, cache: KVCache | None) -> tuple[jax.Array, KVCache | None]:
        batch, steps, _ = x.shape
        num_heads, num_kv, head_dim = self.shape
        q = self.q_proj(x).reshape(batch, steps, num_heads, head_dim)
        k = self.k_proj(x).reshape(batch, steps, num_kv, head_dim)
        v = self.v_proj(x).reshape(batch, steps, num_kv, head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, ctx.rope_cos, ctx.rope_sin)
        k = apply_rope(k, ctx.rope_cos, ctx.rope_sin)
        if cache is not None:
            rows = jnp.arange(batch)[:, None]
            layer = self.layer_index
            cache = cache.replace(
                k=cache.k.at[layer, rows, ctx.write_slots].set(k.astype(cache.k.dtype), mode="drop"),
                v=cache.v.at[layer, rows, ctx.write_slots].set(v.astype(cache.v.dtype), mode="drop"))
            k, v = cache.k[layer].astype(q.dtype), cache.v[layer].astype(q.dtype)
        out = checkpoint_name(attention(q, k, v, ctx, self.attention_impl, self.attention_block),
                              "attention_out")  # [B,T,H,Dh]
        return self.o_proj(out.reshape(batch, steps, num_heads * head_dim)), cache


class SwiGLU(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, f, use_bias=False, cfg=cfg, rngs=rngs)
        self.up_proj = Linear(d, f, use_bias=False, cfg=cfg, rngs=rngs)
        self.down_proj = Linear(f, d, use_bias=False, cfg=cfg, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nnx.Module):
    """Pre-norm residual block: attention then SwiGLU MLP."""

    def __init__(self, cfg: ModelConfig, layer_index: int, *, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg=cfg)
        self.attn = Attention(cfg, layer_index, rngs=rngs)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg=cfg)
        self.mlp = SwiGLU(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, ctx: AttentionContext, cache: KVCache | None) -> tuple[jax.Array, KVCache | None]:
        attn_out, cache = self.attn(self.input_norm(x), ctx, cache)
        x = x + attn_out
        return x + self.mlp(self.post_attention_norm(x)), cache


BlockFactory = Callable[..., nnx.Module]  # (cfg, layer_index, *, rngs) -> module(x, ctx, cache) -> (x, cache)
BLOCK_FACTORIES: dict[str, BlockFactory] = {"full_attention": DecoderBlock}


def register_block(layer_type: str) -> Callable[[BlockFactory], BlockFactory]:
    """Register the block class used for layers whose `cfg.layer_types[i] == layer_type`."""
    def decorator(factory: BlockFactory) -> BlockFactory:
        BLOCK_FACTORIES[layer_type] = factory
        return factory
    return decorator


def _run_block_no_cache(block: nnx.Module, x: jax.Array, ctx: AttentionContext) -> jax.Array:
    return block(x, ctx, None)[0]


# ----------------------------------------------------------------------------- model
class Decoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        unknown = sorted(set(cfg.layer_types) - set(BLOCK_FACTORIES))
        if unknown:
            raise ValueError(f"no block registered for layer types {unknown}; known: {sorted(BLOCK_FACTORIES)}. "
                             "Import the module that calls register_block for them.")
        self.cfg = cfg
        init = jax.nn.initializers.normal(_INIT_STD)
        self.embed_tokens = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), cfg.param_dtype))
        self.layers = nnx.List([BLOCK_FACTORIES[kind](cfg, i, rngs=rngs) for i, kind in enumerate(cfg.layer_types)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg=cfg)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, use_bias=False, cfg=cfg, rngs=rngs)

    def __call__(self, tokens: jax.Array, positions: jax.Array, token_mask: jax.Array,
                 cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """tokens/positions int32 [B,T], token_mask bool [B,T] → (hidden [B,T,D] after final norm, cache)."""
        cfg = self.cfg
        token_mask = token_mask.astype(jnp.bool_)
        steps = tokens.shape[1]
        x = jnp.take(self.embed_tokens[...], tokens, axis=0).astype(cfg.dtype)  # [B, T, D]
        cos, sin = rope_angles(cfg, positions)
        if cache is None:
            query_slots = jnp.broadcast_to(jnp.arange(steps, dtype=jnp.int32)[None], token_mask.shape)
            ctx = AttentionContext(positions, token_mask, token_mask, query_slots, cos, sin, None)
            policy_name = cfg.effective_remat_policy
            if policy_name == "none":
                run = _run_block_no_cache
            else:
                from sgcd_jax.memory_plan import remat_policy  # memory_plan imports models.config
                run = nnx.remat(_run_block_no_cache, policy=remat_policy(policy_name))
            for block in self.layers:
                x = run(block, x, ctx)
            return self.final_norm(x), None
        rows = jnp.arange(tokens.shape[0])[:, None]
        write_slots = cache.end[:, None] + jnp.arange(steps, dtype=jnp.int32)[None, :]  # [B, T]
        valid = cache.valid.at[rows, write_slots].set(token_mask, mode="drop")  # [B, S]
        ctx = AttentionContext(positions, token_mask, valid, write_slots, cos, sin, write_slots)
        for block in self.layers:
            x, cache = block(x, ctx, cache)
        cache = cache.replace(valid=valid, end=cache.end + token_mask.sum(axis=1, dtype=jnp.int32))
        return self.final_norm(x), cache

    def lm_head_kernel(self) -> jax.Array:
        """[D, V] output projection (embedding transposed when tied), in param dtype."""
        return self.embed_tokens[...].T if self.lm_head is None else self.lm_head.kernel[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [B,T,D] → float32 logits [B,T,V]. Materialises the vocab axis: small T only."""
        kernel = self.lm_head_kernel().astype(self.cfg.dtype)
        return jnp.einsum("btd,dv->btv", hidden.astype(self.cfg.dtype), kernel, preferred_element_type=jnp.float32)
