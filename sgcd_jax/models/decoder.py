"""Flax NNX decoder: Llama / Qwen2 / Qwen3 (and hybrids via `layer_types`) by config.

    tokens [B,T] ─► embed ─► N × block(layer_types[i]) ─► final RMSNorm ─► hidden [B,T,D]
    block "full_attention":  x + Attn(RMSNorm(x));  x + SwiGLU(RMSNorm(x))

Parameters are stored in `cfg.param_dtype` and cast to `cfg.dtype` where used; attention scores, softmax,
norms, RoPE and the LM-head logits run/accumulate in float32 (so a bf16 `dtype` keeps them accurate).
Accelerator knobs (ModelConfig): `attention_impl` / `attention_block` (the kernels in models/attention.py)
and `remat_policy` (models/accel.remat_policy names, applied per block in the no-cache forward by
accel.recompute_after_cotangent; attention output is named "attention_out"). Kernels are [in, out]. Another block kind (e.g.
Gated DeltaNet) plugs in with `register_block("linear_attention")(factory)` and may keep its recurrent
state in `KVCache.extra`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from sgcd_jax.models.attention import AttentionContext, attention
from sgcd_jax.models.cache import KVCache, scatter_set
from sgcd_jax.models.config import ModelConfig

_INIT_STD = 0.02


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
        layer = None  # with a cache: this layer's index in the stacked cache k/v
        if cache is not None:
            rows = jnp.arange(batch)[:, None]
            layer = self.layer_index
            cache = cache.replace(
                k=scatter_set(cache.k, (layer, rows, ctx.write_slots), k, mode="drop"),
                v=scatter_set(cache.v, (layer, rows, ctx.write_slots), v, mode="drop"))
            k, v = cache.k, cache.v  # stacked [L,B,S,Hkv,Dh]: attention reads layer `layer` in place
        out = checkpoint_name(attention(q, k, v, ctx, self.attention_impl, self.attention_block, layer,
                                        None if cache is None else cache.prefix_store()), "attention_out")
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


def _run_block_no_cache(block: nnx.Module, x: jax.Array, ctx: AttentionContext, policy_name: str) -> jax.Array:
    """One block without a cache; under a remat policy its backward recomputes it after its cotangent."""
    if policy_name == "none":
        return block(x, ctx, None)[0]
    from sgcd_jax.models.accel import recompute_after_cotangent, remat_policy

    graphdef, state = nnx.split(block)
    run = recompute_after_cotangent(lambda state, x, ctx: nnx.merge(graphdef, state)(x, ctx, None)[0],
                                    remat_policy(policy_name))
    return run(state, x, ctx)


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
            for block in self.layers:
                x = _run_block_no_cache(block, x, ctx, cfg.effective_remat_policy)
            return self.final_norm(x), None
        rows = jnp.arange(tokens.shape[0])[:, None]
        write_slots = cache.end[:, None] + jnp.arange(steps, dtype=jnp.int32)[None, :]  # [B, T]
        valid = cache.valid.at[rows, write_slots].set(token_mask, mode="drop")  # [B, S]
        prefix_valid = cache.row_prefix_valid() if cache.has_prefix_store else None
        ctx = AttentionContext(positions, token_mask, valid, write_slots, cos, sin, write_slots, prefix_valid)
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
