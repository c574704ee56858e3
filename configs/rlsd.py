"""RLSD: w = clip(exp(sign(A)·δ), 1±ε), λ mix; no renormalisation, token granularity."""

from sgcd_jax.config_files import base_config, credit_preset


def get_config():
    cfg = base_config("quickstart")
    cfg.run.name = "rlsd"
    cfg.loss.credit = "sgcd"  # the same credit function with RLSD's values (the library's preset)
    cfg.credit.update(credit_preset("rlsd"))
    return cfg
