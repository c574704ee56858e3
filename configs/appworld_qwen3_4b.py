"""Accelerator-scale recipe: SGCD on AppWorld with Qwen3-4B.

Needs AppWorld data ($APPWORLD_ROOT/data; `appworld download data` where there is internet), the
AppWorld venv (launch/appworld_setup.sh), a Qwen3-4B HF checkpoint at $QWEN3_4B_DIR. Training reward
is the fraction of unit tests passed (success threshold 1.0 for groups); eval reports TGC/SGC.
    python -m sgcd_jax.train --config configs/appworld_qwen3_4b.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import tau3_airline_qwen3_4b  # noqa: E402


def get_config():
    cfg = tau3_airline_qwen3_4b.get_config()
    cfg.run.name = "appworld_qwen3_4b"
    cfg.env.name = "appworld"
    cfg.env.train_split = "train"
    cfg.env.eval_split = "dev"
    cfg.env.max_turns = 40
    cfg.env.user = "scripted"
    cfg.rollout.max_total_tokens = 24576  # longer rows: keeps the τ³ recipe's cudnn attention + full remat
    cfg.credit.success_threshold = 1.0
    cfg.eval.trials = 1
    return cfg
