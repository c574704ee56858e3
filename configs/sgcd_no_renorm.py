"""SGCD ablation: no mean-1 renormalisation per trajectory (credit can be created)."""

from sgcd_jax.config_files import base_config


def get_config():
    cfg = base_config("quickstart")
    cfg.run.name = "sgcd_no_renorm"
    cfg.loss.credit = "sgcd"
    cfg.credit.renormalize = False
    return cfg
