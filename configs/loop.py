"""LOOP / RLOO leave-one-out advantages, no credit weights."""

from sgcd_jax.config_files import base_config


def get_config():
    cfg = base_config("quickstart")
    cfg.run.name = "loop"
    cfg.loss.credit = "none"
    cfg.annotation.name = "none"
    cfg.loss.advantage = "rloo"
    return cfg
