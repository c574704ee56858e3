"""SGCD ablation: step granularity (weights averaged within each assistant turn)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import quickstart  # noqa: E402


def get_config():
    cfg = quickstart.get_config()
    cfg.run.name = "sgcd_step"
    cfg.loss.credit = "sgcd"
    cfg.loss.granularity = "step"
    return cfg
