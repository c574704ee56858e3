"""GRPO + KL to the frozen initial policy (k3 estimator)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import quickstart  # noqa: E402


def get_config():
    cfg = quickstart.get_config()
    cfg.run.name = "grpo_kl"
    cfg.loss.credit = "none"
    cfg.credit.annotator = "none"
    cfg.loss.kl_coef = 0.05
    cfg.loss.kl_estimator = "k3"
    return cfg
