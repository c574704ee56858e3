"""Ablation on the quickstart setting: plain GRPO (no credit weights, no teacher)."""

from sgcd_jax.config_files import base_config


def get_config():
    cfg = base_config("quickstart")
    cfg.run.name = "grpo"
    cfg.loss.credit = "none"
    cfg.annotation.name = "none"
    return cfg
