"""GRPO + KL to the frozen initial policy (k3 estimator)."""

from sgcd_jax.config_files import base_config


def get_config():
    cfg = base_config("quickstart")
    cfg.run.name = "grpo_kl"
    cfg.loss.credit = "none"
    cfg.annotation.name = "none"
    cfg.policy.kl_coef = 0.05
    cfg.policy.kl_estimator = "k3"
    return cfg
