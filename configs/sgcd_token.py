"""SGCD ablation: token granularity (explicit; the default)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import quickstart  # noqa: E402


def get_config():
    cfg = quickstart.get_config()
    cfg.run.name = "sgcd_token"
    cfg.loss.credit = "sgcd"
    cfg.loss.granularity = "token"
    return cfg
