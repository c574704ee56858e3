"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks"), the linear-attention mixer of Qwen3.5.

Per value head, with a key-space state S [Dk, Dv], decay a_t = exp(g_t) (g_t <= 0) and write strength β_t:

    S_t = a_t S_{t-1} + k_t β_t (v_t - a_t S_{t-1}^T k_t)^T          o_t = S_t^T q_t

Two exact forms of the same map:
  * `gated_delta_rule_recurrent` — a scan over tokens (decode, short chunks).
  * `gated_delta_rule_chunked` — the WY/UT form: inside a chunk of C tokens the writes U solve the unit lower
    triangular system (I + L) U = βV − diag(βΓ) K S_0 with L_ts = β_t (k_t·k_s) Γ_t/Γ_s (s < t), so the chunk is a
    few matmuls plus one unit-triangular inverse; a scan over chunks carries S. All of it runs in float32 with
    decay ratios exp(γ_t − γ_s) only for s <= t (never > 1), so no overflow under long chunks or strong decay.
A padded position (token_mask False) gets g = 0 and β = 0: an exact no-op on the state, so a right-padded
chunk leaves each row's state where its last real token put it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from sgcd_jax.models.config import ModelConfig
from sgcd_jax.models.decoder import Linear

_HIGHEST = jax.lax.Precision.HIGHEST  # fp32 accumulation of the delta rule even where fp32 matmuls default to TF32/bf16


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / sqrt(sum(x^2) + eps) over the last axis (the FLA convention Qwen3.5 was trained with)."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


# ----------------------------------------------------------------------------- short causal convolution
def causal_depthwise_conv(x: jax.Array, weight: jax.Array, conv_state: jax.Array) -> jax.Array:
    """Depthwise causal conv (no bias) over time, continuing from `conv_state`.

    x [B,T,C], weight [K,C], conv_state [B,K-1,C] (the K-1 inputs before x; zeros at sequence start) → [B,T,C]
    y[t] = Σ_j weight[j] · xp[t + j] with xp = concat(conv_state, x): tap K-1 is the current token.
    """
    kernel_size, steps = weight.shape[0], x.shape[1]
    padded = jnp.concatenate([conv_state.astype(x.dtype), x], axis=1)  # [B, K-1+T, C]
    w = weight.astype(jnp.float32)
    out = sum(padded[:, j:j + steps].astype(jnp.float32) * w[j] for j in range(kernel_size))
    return out.astype(x.dtype)


def next_conv_state(x: jax.Array, conv_state: jax.Array, lengths: jax.Array) -> jax.Array:
    """The last K-1 real inputs per row after a right-padded chunk. x [B,T,C], conv_state [B,K-1,C], lengths [B]."""
    window = conv_state.shape[1]
    padded = jnp.concatenate([conv_state.astype(x.dtype), x], axis=1)  # [B, K-1+T, C]
    take = lambda row, n: jax.lax.dynamic_slice_in_dim(row, n, window, axis=0)  # noqa: E731
    return jax.vmap(take)(padded, lengths.astype(jnp.int32))


# ----------------------------------------------------------------------------- the gated delta rule
def unit_lower_triangular_inverse(strictly_lower: jax.Array) -> jax.Array:
    """(I + L)^-1 for strictly lower triangular L [..., C, C], C a power of two.

    Recursive block inversion (the blocked LAPACK trtri scheme): the inverse of [[A, 0], [B, D]] is
    [[A^-1, 0], [-D^-1 B A^-1, D^-1]], applied to all diagonal blocks of one size at once, sizes 1, 2, 4, .. C.
    Only batched matmuls (log2 C levels), so it is fast on every backend and differentiates as matmuls; batched
    triangular_solve is ~500x slower on XLA:CPU and its gradient is another solve.
    """
    size_total = strictly_lower.shape[-1]
    batch = strictly_lower.shape[:-2]
    inverse = jnp.ones(batch + (size_total, 1, 1), strictly_lower.dtype)  # [..., blocks, s, s] diagonal blocks
    size = 1
    while size < size_total:
        pairs = size_total // (2 * size)
        blocks = strictly_lower.reshape(batch + (pairs, 2 * size, pairs, 2 * size))
        diagonal = jnp.moveaxis(jnp.diagonal(blocks, axis1=-4, axis2=-2), -1, -3)  # [..., pairs, 2s, 2s]
        upper_inv, lower_inv = inverse[..., 0::2, :, :], inverse[..., 1::2, :, :]
        off_diagonal = -jnp.matmul(jnp.matmul(lower_inv, diagonal[..., size:, :size], precision=_HIGHEST),
                                   upper_inv, precision=_HIGHEST)
        inverse = jnp.concatenate([jnp.concatenate([upper_inv, jnp.zeros_like(upper_inv)], axis=-1),
                                   jnp.concatenate([off_diagonal, lower_inv], axis=-1)], axis=-2)
        size *= 2
    return inverse[..., 0, :, :]


def gated_delta_rule_recurrent(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array,
                               initial_state: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Token-by-token form. q,k [B,T,H,Dk], v [B,T,H,Dv], g,beta [B,T,H] (q,k already normalised and q scaled).

    Returns (out [B,T,H,Dv] float32, final state [B,H,Dk,Dv] float32).
    """
    batch, _, heads, key_dim = k.shape
    value_dim = v.shape[-1]
    state = (jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32) if initial_state is None
             else initial_state.astype(jnp.float32))

    def step(state, inputs):
        q_t, k_t, v_t, g_t, beta_t = inputs  # [B,H,Dk], [B,H,Dk], [B,H,Dv], [B,H], [B,H]
        state = state * jnp.exp(g_t)[..., None, None]
        predicted = jnp.einsum("bhkv,bhk->bhv", state, k_t, precision=_HIGHEST)
        delta = (v_t - predicted) * beta_t[..., None]
        state = state + k_t[..., :, None] * delta[..., None, :]
        return state, jnp.einsum("bhkv,bhk->bhv", state, q_t, precision=_HIGHEST)

    time_major = [jnp.moveaxis(x.astype(jnp.float32), 1, 0) for x in (q, k, v, g, beta)]
    state, out = jax.lax.scan(step, state, time_major)
    return jnp.moveaxis(out, 0, 1), state


def gated_delta_rule_chunked(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array,
                             initial_state: jax.Array | None = None,
                             chunk_size: int = 64) -> tuple[jax.Array, jax.Array]:
    """Chunk-parallel form, same contract as `gated_delta_rule_recurrent`; any T (padded internally with no-ops)."""
    if chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size={chunk_size} must be a power of two (set extra['deltanet_chunk_size'])")
    batch, steps, heads, key_dim = k.shape
    value_dim = v.shape[-1]
    pad = (-steps) % chunk_size
    num_chunks = (steps + pad) // chunk_size

    def to_chunks(x):  # [B,T,H,...] → [B,H,N,C,...] float32, zero padded (g=0, β=0: state untouched)
        x = jnp.pad(x.astype(jnp.float32), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(batch, num_chunks, chunk_size, *x.shape[2:])
        return jnp.moveaxis(x, 3, 1)

    q, k, v, g, beta = map(to_chunks, (q, k, v, g, beta))
    log_decay = jnp.cumsum(g, axis=-1)  # γ [B,H,N,C]: log of the decay from chunk start to t (inclusive)
    causal = jnp.tril(jnp.ones((chunk_size, chunk_size), jnp.bool_))
    strictly_lower = jnp.tril(causal, -1)
    pair = log_decay[..., :, None] - log_decay[..., None, :]  # γ_t − γ_s  [B,H,N,C,C]
    pair_decay = jnp.where(causal, jnp.exp(jnp.where(causal, pair, 0.0)), 0.0)  # Γ_t/Γ_s for s <= t

    mm = lambda spec, a, b: jnp.einsum(spec, a, b, precision=_HIGHEST)  # noqa: E731
    key_gram = mm("...td,...sd->...ts", k, k)
    system = jnp.where(strictly_lower, beta[..., :, None] * key_gram * pair_decay, 0.0)  # L; solve uses I + L
    rhs = jnp.concatenate([v * beta[..., None], k * (beta * jnp.exp(log_decay))[..., None]], axis=-1)
    solved = jnp.matmul(unit_lower_triangular_inverse(system), rhs, precision=_HIGHEST)  # (I + L)^-1 rhs
    writes_from_values, writes_per_state = solved[..., :value_dim], solved[..., value_dim:]  # U = first − second·S_0
    intra = mm("...td,...sd->...ts", q, k) * pair_decay  # [B,H,N,C,C], diagonal included
    q_from_start = q * jnp.exp(log_decay)[..., None]
    k_to_end = k * jnp.exp(log_decay[..., -1:] - log_decay)[..., None]
    chunk_decay = jnp.exp(log_decay[..., -1])  # [B,H,N]

    def step(state, chunk):  # state [B,H,Dk,Dv]
        from_values, per_state, q_start, attn, k_end, decay = chunk
        writes = from_values - mm("bhck,bhkv->bhcv", per_state, state)  # U [B,H,C,Dv]
        out = mm("bhck,bhkv->bhcv", q_start, state) + mm("bhts,bhsv->bhtv", attn, writes)
        state = state * decay[..., None, None] + mm("bhck,bhcv->bhkv", k_end, writes)
        return state, out

    state = (jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32) if initial_state is None
             else initial_state.astype(jnp.float32))
    chunk_major = [jnp.moveaxis(x, 2, 0) for x in
                   (writes_from_values, writes_per_state, q_from_start, intra, k_to_end, chunk_decay)]
    state, out = jax.lax.scan(step, state, chunk_major)  # out [N,B,H,C,Dv]
    out = jnp.moveaxis(out, 0, 2).reshape(batch, heads, num_chunks * chunk_size, value_dim)[:, :, :steps]
    return jnp.swapaxes(out, 1, 2), state


# ----------------------------------------------------------------------------- layers
def deltanet_state_shapes(cfg: ModelConfig, batch_size: int) -> dict[str, tuple[tuple[int, ...], jnp.dtype]]:
    """Per-row states a GatedDeltaNet layer keeps in a cache: conv [B,K-1,C] (compute dtype), recurrent
    [B,Hv,Dk,Dv] float32."""
    extra = cfg.extra
    channels = 2 * extra["linear_num_key_heads"] * extra["linear_key_head_dim"] + \
        extra["linear_num_value_heads"] * extra["linear_value_head_dim"]
    kernel_size = extra.get("linear_conv_kernel_dim", 4)
    return {"conv": ((batch_size, kernel_size - 1, channels), cfg.dtype),
            "recurrent": ((batch_size, extra["linear_num_value_heads"], extra["linear_key_head_dim"],
                           extra["linear_value_head_dim"]), jnp.float32)}


class GatedRMSNorm(nnx.Module):
    """RMSNorm over the last axis, then × SiLU(gate) (norm before gate; weight initialised to ones)."""

    def __init__(self, dim: int, *, eps: float, param_dtype, rngs: nnx.Rngs | None = None):
        del rngs
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)).astype(x.dtype)
        out = self.weight[...].astype(x.dtype) * normed * jax.nn.silu(gate.astype(jnp.float32))
        return out.astype(x.dtype)


class GatedDeltaNet(nnx.Module):
    """The Qwen3.5 linear-attention mixer: x [B,T,D] → [B,T,D], carrying (conv_state, recurrent_state) per row.

    Settings from `cfg.extra`: linear_num_key_heads, linear_num_value_heads, linear_key_head_dim,
    linear_value_head_dim, linear_conv_kernel_dim, and optionally deltanet_chunk_size (default 64) and
    deltanet_recurrent_max_len (chunks up to this length use the token scan; default 8, covers decode).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        extra = cfg.extra
        self.num_k_heads, self.num_v_heads = extra["linear_num_key_heads"], extra["linear_num_value_heads"]
        self.key_dim, self.value_dim = extra["linear_key_head_dim"], extra["linear_value_head_dim"]
        self.kernel_size = extra.get("linear_conv_kernel_dim", 4)
        self.chunk_size = extra.get("deltanet_chunk_size", 64)
        self.recurrent_max_len = extra.get("deltanet_recurrent_max_len", 8)
        if self.num_v_heads % self.num_k_heads:
            raise ValueError(f"linear_num_value_heads={self.num_v_heads} must be a multiple of "
                             f"linear_num_key_heads={self.num_k_heads}")
        keys, values = self.num_k_heads * self.key_dim, self.num_v_heads * self.value_dim
        self.conv_channels = 2 * keys + values
        d = cfg.hidden_size
        self.in_proj_qkv = Linear(d, self.conv_channels, use_bias=False, cfg=cfg, rngs=rngs)
        self.in_proj_z = Linear(d, values, use_bias=False, cfg=cfg, rngs=rngs)
        self.in_proj_b = Linear(d, self.num_v_heads, use_bias=False, cfg=cfg, rngs=rngs)
        self.in_proj_a = Linear(d, self.num_v_heads, use_bias=False, cfg=cfg, rngs=rngs)
        bound = 1.0 / math.sqrt(self.kernel_size)
        self.conv_weight = nnx.Param(jax.random.uniform(  # [C, 1, K] depthwise taps, the checkpoint layout
            rngs.params(), (self.conv_channels, 1, self.kernel_size), cfg.param_dtype, -bound, bound))
        self.dt_bias = nnx.Param(jnp.ones((self.num_v_heads,), cfg.param_dtype))
        decay_rate = jax.random.uniform(rngs.params(), (self.num_v_heads,), jnp.float32, 0.01, 16.0)
        self.A_log = nnx.Param(jnp.log(decay_rate).astype(cfg.param_dtype))
        self.norm = GatedRMSNorm(self.value_dim, eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
        self.out_proj = Linear(values, d, use_bias=False, cfg=cfg, rngs=rngs)
        self.dtype = cfg.dtype
        self.cfg = cfg

    def state_shapes(self, batch_size: int) -> dict[str, tuple[tuple[int, ...], jnp.dtype]]:
        return deltanet_state_shapes(self.cfg, batch_size)

    def __call__(self, x: jax.Array, token_mask: jax.Array, conv_state: jax.Array | None = None,
                 recurrent_state: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B,T,D], token_mask [B,T] (right padding) → (out [B,T,D], conv_state, recurrent_state)."""
        batch, steps, _ = x.shape
        if conv_state is None:
            conv_state = jnp.zeros((batch, self.kernel_size - 1, self.conv_channels), self.dtype)
        x = jnp.where(token_mask[..., None], x, 0).astype(self.dtype)
        mixed = self.in_proj_qkv(x)  # [B,T,2·Hk·Dk + Hv·Dv]
        new_conv_state = next_conv_state(mixed, conv_state, token_mask.sum(axis=1))
        taps = self.conv_weight[...][:, 0, :].T  # [K, C]
        mixed = jax.nn.silu(causal_depthwise_conv(mixed, taps, conv_state).astype(jnp.float32))
        keys = self.num_k_heads * self.key_dim
        q = mixed[..., :keys].reshape(batch, steps, self.num_k_heads, self.key_dim)
        k = mixed[..., keys:2 * keys].reshape(batch, steps, self.num_k_heads, self.key_dim)
        v = mixed[..., 2 * keys:].reshape(batch, steps, self.num_v_heads, self.value_dim)
        # the compute dtype's rounding of q/k/v, as in the reference, then fp32 for the delta rule
        q, k, v = (t.astype(self.dtype).astype(jnp.float32) for t in (q, k, v))
        repeat = self.num_v_heads // self.num_k_heads  # each key head serves `repeat` consecutive value heads
        q = jnp.repeat(l2_normalize(q), repeat, axis=2) / math.sqrt(self.key_dim)
        k = jnp.repeat(l2_normalize(k), repeat, axis=2)
        beta = jax.nn.sigmoid(self.in_proj_b(x).astype(jnp.float32))  # [B,T,Hv]
        a = self.in_proj_a(x).astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32)
        g = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(a)  # log decay <= 0
        beta = jnp.where(token_mask[..., None], beta, 0.0)  # padded position: exact no-op on the state
        g = jnp.where(token_mask[..., None], g, 0.0)
        if steps <= self.recurrent_max_len:
            core, new_state = gated_delta_rule_recurrent(q, k, v, g, beta, recurrent_state)
        else:
            core, new_state = gated_delta_rule_chunked(q, k, v, g, beta, recurrent_state, self.chunk_size)
        core = checkpoint_name(core, "attention_out")  # [B,T,Hv,Dv]: what remat "save_attention_out" keeps
        z = self.in_proj_z(x).reshape(batch, steps, self.num_v_heads, self.value_dim)
        out = self.norm(core.astype(self.dtype), z).reshape(batch, steps, self.num_v_heads * self.value_dim)
        return self.out_proj(out), new_conv_state, new_state
