"""LOOP / RLOO leave-one-out advantages, no credit weights."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import quickstart  # noqa: E402


def get_config():
    cfg = quickstart.get_config()
    cfg.run.name = "loop"
    cfg.loss.credit = "none"
    cfg.credit.annotator = "none"
    cfg.loss.advantage = "rloo"
    return cfg
