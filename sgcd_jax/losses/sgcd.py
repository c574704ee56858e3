"""The SGCD policy loss: credit-weighted token advantages (detached) fed to the PPO-clip loss.

The teacher only shapes *advantages* through ``credit.sgcd_credit`` (under ``stop_gradient``); it
never appears as an actor loss, so the gradient w.r.t. teacher log-probs is exactly zero.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax

from sgcd_jax.losses.credit import CreditBatch, CreditConfig
from sgcd_jax.losses.policy import PolicyBatch, PolicyLossConfig, ppo_policy_loss
from sgcd_jax.losses.registry import get, register
from sgcd_jax.losses.types import LossOutput


@dataclasses.dataclass(frozen=True, kw_only=True)
class SGCDLossConfig:
    policy: PolicyLossConfig = dataclasses.field(default_factory=PolicyLossConfig)
    credit: CreditConfig = dataclasses.field(default_factory=CreditConfig)
    credit_fn: str = "sgcd"  # registry name under "credit/"

    def __post_init__(self):
        get(f"credit/{self.credit_fn}")


@flax.struct.dataclass
class SGCDBatch:
    logprobs: jax.Array  # [B, T] log π_θ(y_t), differentiable
    old_logprobs: jax.Array  # [B, T]
    advantages: jax.Array  # [B] sequence advantages (GRPO / RLOO)
    student_logprobs: jax.Array  # [B, T] score-pass log p_S(y_t)
    teacher_logprobs: jax.Array  # [B, T] score-pass log q_T(y_t)
    loss_mask: jax.Array  # [B, T]
    step_ids: jax.Array | None = None
    reverse_kl: jax.Array | None = None
    student_entropy: jax.Array | None = None  # score-pass H(p_S), for the credit gate
    entropy: jax.Array | None = None  # current-policy entropy, differentiable, for the bonus
    ref_logprobs: jax.Array | None = None


@register("policy_loss/sgcd")
def sgcd_policy_loss(batch: SGCDBatch, cfg: SGCDLossConfig, step=0) -> LossOutput:
    credit = get(f"credit/{cfg.credit_fn}")(
        CreditBatch(advantages=batch.advantages, student_logprobs=batch.student_logprobs,
                    teacher_logprobs=batch.teacher_logprobs, loss_mask=batch.loss_mask,
                    step_ids=batch.step_ids, reverse_kl=batch.reverse_kl,
                    entropy=batch.student_entropy),
        cfg.credit, step)
    out = ppo_policy_loss(
        PolicyBatch(logprobs=batch.logprobs, old_logprobs=batch.old_logprobs,
                    advantages=credit.token_advantages, loss_mask=batch.loss_mask,
                    ref_logprobs=batch.ref_logprobs, entropy=batch.entropy),
        cfg.policy)
    return out.replace(metrics={**out.metrics, **credit.metrics})
