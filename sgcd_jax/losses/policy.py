"""Token-level PPO-clip policy loss with clip-higher, dual clip, KL-to-reference and entropy bonus.

Per token t with r_t = exp(clamp(log π_θ − log π_old, ±log_ratio_clamp)) and token advantage A_t:
    pg_t = max(−A_t·r_t, −A_t·clip(r_t, 1−clip_low, 1+clip_high))           (PPO; DAPO clip-higher)
    if A_t < 0 and dual_clip is set: pg_t = min(pg_t, −A_t·dual_clip)       (Ye et al. 2020)
    loss_t = pg_t + kl_coef·KL_t − entropy_coef·H_t
KL_t estimates KL(π_θ‖π_ref) from d = log π_θ − log π_ref (Schulman, "Approximating KL"):
    k1 = d,  k2 = ½d²,  k3 = exp(−d) − 1 + d  (d clamped to ±20, k3 clamped to ≤ kl_clamp, as verl)
Advantages, old and reference log-probs are treated as constants (``stop_gradient``).
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from sgcd_jax.losses.registry import register
from sgcd_jax.losses.types import LossOutput, aggregate, masked_mean, validate_agg_mode

KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PolicyLossConfig:
    clip_low: float = 0.2  # ε_low: ratio lower bound 1−ε_low
    clip_high: float = 0.28  # ε_high: ratio upper bound 1+ε_high (DAPO clip-higher)
    dual_clip: float | None = 3.0  # c > 1 caps the loss of negative-advantage tokens; None = off
    log_ratio_clamp: float = 20.0  # clamp log π_θ − log π_old before exp (overflow guard)
    kl_coef: float = 0.0  # 0 = no KL-to-reference term
    kl_estimator: str = "k3"
    kl_clamp: float = 10.0  # upper clamp of the k3 value
    entropy_coef: float = 0.0  # entropy bonus; needs batch.entropy
    agg_mode: str = "token-mean"
    norm_length: int | None = None  # L for "seq-mean-token-sum-norm" (None = padded T)

    def __post_init__(self):
        if not (0 <= self.clip_low < 1):
            raise ValueError(f"clip_low must be in [0, 1), got {self.clip_low}")
        if self.clip_high < 0:
            raise ValueError(f"clip_high must be >= 0, got {self.clip_high}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1 (or None to disable), got {self.dual_clip}")
        if self.log_ratio_clamp <= 0 or self.kl_clamp <= 0:
            raise ValueError("log_ratio_clamp and kl_clamp must be > 0")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator={self.kl_estimator!r}; use one of {KL_ESTIMATORS}")
        if self.kl_coef < 0 or self.entropy_coef < 0:
            raise ValueError("kl_coef and entropy_coef must be >= 0")
        validate_agg_mode(self.agg_mode)
        if self.norm_length is not None and self.norm_length <= 0:
            raise ValueError(f"norm_length must be positive, got {self.norm_length}")


@flax.struct.dataclass
class PolicyBatch:
    logprobs: jax.Array  # [B, T] log π_θ(y_t), differentiable
    old_logprobs: jax.Array  # [B, T] log π_old(y_t) (sampler or pre-update policy)
    advantages: jax.Array  # [B, T] token advantages (or [B, 1] to broadcast)
    loss_mask: jax.Array  # [B, T] 1 on policy-generated tokens
    ref_logprobs: jax.Array | None = None  # [B, T] log π_ref(y_t); needed when kl_coef > 0
    entropy: jax.Array | None = None  # [B, T] H(π_θ(·|ctx_t)), differentiable; needed for the bonus


def kl_penalty(logprobs: jax.Array, ref_logprobs: jax.Array, estimator: str,
               kl_clamp: float = 10.0) -> jax.Array:
    """Per-token estimate of KL(π_θ‖π_ref) from sampled-token log-probs."""
    diff = logprobs - ref_logprobs
    if estimator == "k1":
        return diff
    if estimator == "k2":
        return 0.5 * jnp.square(diff)
    if estimator == "k3":
        neg = jnp.clip(-diff, -20.0, 20.0)  # log(π_ref/π_θ)
        return jnp.minimum(jnp.exp(neg) - 1.0 - neg, kl_clamp)
    raise ValueError(f"unknown KL estimator {estimator!r}; use one of {KL_ESTIMATORS}")


def ppo_token_losses(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array,
                     cfg: PolicyLossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token clipped surrogate loss [B, T] and boolean clip indicators [B, T]."""
    log_ratio = jnp.clip(logprobs - old_logprobs, -cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    loss = jnp.maximum(unclipped, clipped)
    flags = {
        "clip_high": (clipped > unclipped) & (advantages > 0),
        "clip_low": (clipped > unclipped) & (advantages < 0),
    }
    if cfg.dual_clip is not None:
        cap = -advantages * cfg.dual_clip
        dual = (advantages < 0) & (loss > cap)
        loss = jnp.where(dual, cap, loss)
        flags["clip_dual"] = dual
    return loss, flags


@register("policy_loss/ppo")
def ppo_policy_loss(batch: PolicyBatch, cfg: PolicyLossConfig) -> LossOutput:
    """PPO-clip / GRPO token loss; returns the unreduced sum and denominator under ``cfg.agg_mode``."""
    mask = batch.loss_mask.astype(jnp.float32)
    advantages = jax.lax.stop_gradient(jnp.broadcast_to(batch.advantages, mask.shape))
    old_logprobs = jax.lax.stop_gradient(batch.old_logprobs)
    loss, flags = ppo_token_losses(batch.logprobs, old_logprobs, advantages, cfg)
    log_ratio = jax.lax.stop_gradient(batch.logprobs - old_logprobs)
    metrics = {f"policy/{name}_fraction": masked_mean(flag.astype(jnp.float32), mask)
               for name, flag in flags.items()}
    metrics["policy/pg_loss"] = masked_mean(jax.lax.stop_gradient(loss), mask)
    metrics["policy/approx_kl_old"] = masked_mean(0.5 * jnp.square(log_ratio), mask)
    if cfg.kl_coef > 0:
        if batch.ref_logprobs is None:
            raise ValueError("PolicyLossConfig.kl_coef > 0 needs PolicyBatch.ref_logprobs")
        kl = kl_penalty(batch.logprobs, jax.lax.stop_gradient(batch.ref_logprobs),
                        cfg.kl_estimator, cfg.kl_clamp)
        loss = loss + cfg.kl_coef * kl
        metrics["policy/kl_ref"] = masked_mean(jax.lax.stop_gradient(kl), mask)
    if batch.entropy is not None:
        metrics["policy/entropy"] = masked_mean(jax.lax.stop_gradient(batch.entropy), mask)
    if cfg.entropy_coef > 0:
        if batch.entropy is None:
            raise ValueError("PolicyLossConfig.entropy_coef > 0 needs PolicyBatch.entropy")
        loss = loss - cfg.entropy_coef * batch.entropy
    total, denominator = aggregate(loss, mask, cfg.agg_mode, cfg.norm_length)
    return LossOutput(sum=total, denominator=denominator, metrics=metrics)
