"""SGCD ablation: no mean-1 renormalisation per trajectory (credit can be created)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import quickstart  # noqa: E402


def get_config():
    cfg = quickstart.get_config()
    cfg.run.name = "sgcd_no_renorm"
    cfg.loss.credit = "sgcd"
    cfg.loss.renormalize = False
    return cfg
