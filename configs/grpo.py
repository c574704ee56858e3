"""Ablation on the quickstart setting: plain GRPO (no credit weights, no teacher)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import quickstart  # noqa: E402


def get_config():
    cfg = quickstart.get_config()
    cfg.run.name = "grpo"
    cfg.loss.credit = "none"
    cfg.credit.annotator = "none"
    return cfg
