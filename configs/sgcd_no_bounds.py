"""SGCD ablation: no clipping of the raw weights (bounded=False)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import quickstart  # noqa: E402


def get_config():
    cfg = quickstart.get_config()
    cfg.run.name = "sgcd_no_bounds"
    cfg.loss.credit = "sgcd"
    cfg.loss.bounded = False
    return cfg
