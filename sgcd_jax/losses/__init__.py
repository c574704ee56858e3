"""Loss library: pure, jit-able, registered functions (advantages, PPO/GRPO policy loss, chunked
vocabulary math, SGCD credit weights, SDPO self-distillation). No model code is imported here.

Select by name: ``get("advantage/grpo")``, ``get("policy_loss/sgcd")``, ``get("credit/sgcd")``,
``get("aux_loss/sdpo")``; ``registered(kind)`` lists the names of one kind.
"""

from sgcd_jax.losses.advantages import (AdvantageBatch, AdvantageConfig, AdvantageOutput,
                                        compute_advantages, grpo_advantages, rloo_advantages)
from sgcd_jax.losses.credit import (CreditBatch, CreditConfig, CreditOutput, lam_at, no_credit,
                                    sgcd_credit)
from sgcd_jax.losses.distill import DistillBatch, DistillConfig, sdpo_loss
from sgcd_jax.losses.policy import (PolicyBatch, PolicyLossConfig, kl_penalty, ppo_policy_loss,
                                    ppo_token_losses)
from sgcd_jax.losses.registry import KINDS, get, register, registered
from sgcd_jax.losses.sgcd import SGCDBatch, SGCDLossConfig, sgcd_policy_loss
from sgcd_jax.losses.types import AGG_MODES, LossOutput, aggregate, masked_mean
from sgcd_jax.losses.vocab import VocabConfig, naive_pair_stats, pair_stats, token_stats

__all__ = [
    "AGG_MODES", "KINDS", "AdvantageBatch", "AdvantageConfig", "AdvantageOutput", "CreditBatch",
    "CreditConfig", "CreditOutput", "DistillBatch", "DistillConfig", "LossOutput", "PolicyBatch",
    "PolicyLossConfig", "SGCDBatch", "SGCDLossConfig", "VocabConfig", "aggregate",
    "compute_advantages", "get", "grpo_advantages", "kl_penalty", "lam_at", "masked_mean",
    "naive_pair_stats", "no_credit", "pair_stats", "ppo_policy_loss", "ppo_token_losses",
    "register", "registered", "rloo_advantages", "sdpo_loss", "sgcd_credit", "sgcd_policy_loss",
    "token_stats",
]
