"""RLSD: w = clip(exp(sign(A)·δ), 1±ε), λ mix; no renormalisation, token granularity."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import quickstart  # noqa: E402


def get_config():
    cfg = quickstart.get_config()
    cfg.run.name = "rlsd"
    cfg.loss.credit = "rlsd"
    cfg.loss.beta_pos = 1.0
    cfg.loss.beta_neg = 1.0
    for key in ("eps_low_pos", "eps_high_pos", "eps_low_neg", "eps_high_neg"):
        cfg.loss[key] = 0.2
    cfg.loss.eta = 0.0
    cfg.loss.renormalize = False
    cfg.loss.granularity = "token"
    return cfg
