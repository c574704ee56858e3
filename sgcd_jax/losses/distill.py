"""SDPO-style direct self-distillation: an actor loss pulling the policy toward the "teacher" (the
same policy conditioned on a successful sibling / the credit reference). A baseline to SGCD, which
instead keeps the teacher out of the actor loss and only reweights advantages.

Modes (``DistillConfig.mode``):
- ``"sampled"``: the per-token teacher log-ratio δ_t = log q_T(y_t) − log π_old(y_t) acts as a
  (detached) token reward in a clipped importance-weighted surrogate,
      loss_t = max(−δ_t·r_t, −δ_t·clip(r_t, 1 − c, 1 + c)),  r_t = π_θ(y_t)/π_old(y_t);
  at r = 1 its gradient is −δ_t ∇log π_θ(y_t), the on-policy estimator of ∇KL(π_θ‖q_T).
- ``"full"``: loss_t = the full-vocabulary divergence (reverse KL by default) computed by
  ``vocab.pair_stats`` from the current student hidden states (differentiable) and a detached teacher.
The returned ``LossOutput.sum`` is already multiplied by ``coef``, the weight relative to the
policy loss (total = policy.value + distill.value).
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from sgcd_jax.losses.registry import register
from sgcd_jax.losses.types import LossOutput, aggregate, masked_mean, validate_agg_mode

DISTILL_MODES = ("sampled", "full")
DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig:
    mode: str = "sampled"
    coef: float = 1.0  # weight of this loss relative to the policy loss
    ratio_clip: float = 0.2  # importance-ratio clip c of the sampled mode
    log_ratio_clamp: float = 20.0
    divergence: str = "reverse_kl"  # which pair_stats feature the full mode minimises
    agg_mode: str = "token-mean"
    norm_length: int | None = None

    def __post_init__(self):
        if self.mode not in DISTILL_MODES:
            raise ValueError(f"DistillConfig.mode={self.mode!r}; use one of {DISTILL_MODES}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"DistillConfig.divergence={self.divergence!r}; use one of {DIVERGENCES}")
        if self.coef < 0:
            raise ValueError(f"DistillConfig.coef must be >= 0, got {self.coef}")
        if not 0 <= self.ratio_clip < 1:
            raise ValueError(f"DistillConfig.ratio_clip must be in [0, 1), got {self.ratio_clip}")
        validate_agg_mode(self.agg_mode)


@flax.struct.dataclass
class DistillBatch:
    loss_mask: jax.Array  # [B, T] tokens to distil (e.g. only failed siblings' generated tokens)
    logprobs: jax.Array | None = None  # [B, T] log π_θ(y_t), differentiable (sampled mode)
    old_logprobs: jax.Array | None = None  # [B, T] log π_old(y_t) (sampled mode)
    teacher_logprobs: jax.Array | None = None  # [B, T] log q_T(y_t) (sampled mode)
    divergence: jax.Array | None = None  # [B, T] pair_stats[cfg.divergence] (full mode)


@register("aux_loss/sdpo")
def sdpo_loss(batch: DistillBatch, cfg: DistillConfig) -> LossOutput:
    """Self-distillation toward the sibling-conditioned teacher (module docstring)."""
    mask = batch.loss_mask.astype(jnp.float32)
    if cfg.mode == "sampled":
        missing = [name for name in ("logprobs", "old_logprobs", "teacher_logprobs")
                   if getattr(batch, name) is None]
        if missing:
            raise ValueError(f"DistillConfig.mode='sampled' needs DistillBatch.{missing}")
        old = jax.lax.stop_gradient(batch.old_logprobs)
        reward = jax.lax.stop_gradient(batch.teacher_logprobs) - old  # δ_t
        ratio = jnp.exp(jnp.clip(batch.logprobs - old, -cfg.log_ratio_clamp, cfg.log_ratio_clamp))
        unclipped = -reward * ratio
        clipped = -reward * jnp.clip(ratio, 1 - cfg.ratio_clip, 1 + cfg.ratio_clip)
        token_loss = jnp.maximum(unclipped, clipped)
        metrics = {"distill/teacher_log_ratio": masked_mean(reward, mask),
                   "distill/clip_fraction": masked_mean((clipped > unclipped).astype(jnp.float32),
                                                        mask)}
    else:
        if batch.divergence is None:
            raise ValueError("DistillConfig.mode='full' needs DistillBatch.divergence "
                             f"(vocab.pair_stats(...)[{cfg.divergence!r}])")
        token_loss = batch.divergence
        metrics = {f"distill/{cfg.divergence}": masked_mean(jax.lax.stop_gradient(token_loss), mask)}
    total, denominator = aggregate(token_loss, mask, cfg.agg_mode, cfg.norm_length)
    return LossOutput(sum=cfg.coef * total, denominator=denominator, metrics=metrics)
