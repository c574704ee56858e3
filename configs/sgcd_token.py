"""SGCD ablation: token granularity (explicit; the default)."""

from sgcd_jax.config_files import base_config


def get_config():
    cfg = base_config("quickstart")
    cfg.run.name = "sgcd_token"
    cfg.loss.credit = "sgcd"
    cfg.credit.granularity = "token"
    return cfg
