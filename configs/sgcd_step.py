"""SGCD ablation: step granularity (weights averaged within each assistant turn)."""

from sgcd_jax.config_files import base_config


def get_config():
    cfg = base_config("quickstart")
    cfg.run.name = "sgcd_step"
    cfg.loss.credit = "sgcd"
    cfg.credit.granularity = "step"
    return cfg
