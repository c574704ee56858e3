"""Accelerator-scale recipe: SGCD on AppWorld with Qwen3-4B.

Needs AppWorld data ($APPWORLD_ROOT/data; `appworld download data` where there is internet), the
AppWorld venv (launch/appworld_setup.sh), a Qwen3-4B HF checkpoint at $QWEN3_4B_DIR. Training reward
is the fraction of unit tests passed (success threshold 1.0 for groups); eval reports TGC/SGC.
    python -m sgcd_jax.train --config configs/appworld_qwen3_4b.py
"""

from sgcd_jax.config_files import base_config


def get_config():
    cfg = base_config("tau3_airline_qwen3_4b")
    cfg.run.name = "appworld_qwen3_4b"
    cfg.env.name = "appworld"
    cfg.env.train_split = "train"
    cfg.env.eval_split = "dev"
    cfg.env.max_turns = 40
    cfg.env.user = "scripted"
    cfg.rollout.max_total_tokens = 24576  # longer rows: keeps the τ³ recipe's cudnn attention + full remat
    cfg.annotation.success_threshold = 1.0
    cfg.eval.trials = 1
    return cfg
