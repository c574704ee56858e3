"""SGCD ablation: action granularity (each assistant turn weighted by its summed teacher/student log-ratio).

A turn's weight is clip(exp(β·σ·Σ_turn s_t)): the log-ratio of the turn's whole action. On the quickstart the
teacher moves the one token where a failed attempt chose (``###STOP###`` where the answer was due, −7 to −8 nats)
and leaves the rest of the turn at ~0, so token granularity raises one token of the decisive turn and mean-of-w
("step") dilutes it; summing first gives the whole decisive turn the blame (losses/credit.py)."""

from sgcd_jax.config_files import base_config


def get_config():
    cfg = base_config("quickstart")
    cfg.run.name = "sgcd_action"
    cfg.loss.credit = "sgcd"
    cfg.credit.granularity = "action"
    return cfg
