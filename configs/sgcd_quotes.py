"""SGCD whose teacher reads a sibling's answer: the compact reference plus a ``success: <action>`` line under
each step where a successful sibling did something else (``annotation.reference_format="compact_quotes"``),
and warm-up reading rows with drills whose tool results are withheld, so the quoted reply is the only
source of the answer (trainer/reading_demos.py). Compare with configs/sgcd.py (the compact reference, which
the rotated-reference control showed is not read) and with ``--config.annotation.reference_control=rotated``.
"""

from sgcd_jax.config_files import base_config


def get_config():
    cfg = base_config("quickstart")
    cfg.run.name = "sgcd_quotes"
    cfg.loss.credit = "sgcd"
    cfg.annotation.reference_format = "compact_quotes"
    cfg.annotation.reference_tokens = 128  # the compact lines + up to two quoted calls or replies (<= ~50 tokens each)
    return cfg
