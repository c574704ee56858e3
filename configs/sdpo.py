"""SDPO-style direct self-distillation: GRPO + an actor loss pulling the student toward the
teacher (same policy conditioned on the credit reference). The teacher IS in the gradient here."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import quickstart  # noqa: E402


def get_config():
    cfg = quickstart.get_config()
    cfg.run.name = "sdpo"
    cfg.loss.credit = "none"
    cfg.loss.sdpo_coef = 1.0
    cfg.loss.sdpo_mode = "sampled"
    cfg.credit.annotator = "none"  # the SDPO teacher sees a successful sibling, not a credit reference
    return cfg
