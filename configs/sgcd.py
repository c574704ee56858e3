"""SGCD (defaults of the credit family): decoupled β, bounds, mean-1 renormalisation, token level."""

from sgcd_jax.config_files import base_config


def get_config():
    cfg = base_config("quickstart")
    cfg.run.name = "sgcd"
    cfg.loss.credit = "sgcd"
    return cfg
