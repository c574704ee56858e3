"""SGCD (defaults of the credit family): decoupled β, bounds, mean-1 renormalisation, token level."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import quickstart  # noqa: E402


def get_config():
    cfg = quickstart.get_config()
    cfg.run.name = "sgcd"
    cfg.loss.credit = "sgcd"
    return cfg
