"""SGCD ablation: no clipping of the raw weights: bounds [0.01, 100] that never bind in practice."""

from sgcd_jax.config_files import base_config


def get_config():
    cfg = base_config("quickstart")
    cfg.run.name = "sgcd_no_bounds"
    cfg.loss.credit = "sgcd"
    for sign in ("pos", "neg"):
        cfg.credit[f"eps_low_{sign}"] = 0.99  # w >= 0.01
        cfg.credit[f"eps_high_{sign}"] = 99.0  # w <= 100
    return cfg
