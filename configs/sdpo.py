"""SDPO-style direct self-distillation: GRPO + an actor loss pulling the student toward the
teacher (same policy conditioned on the credit reference). The teacher IS in the gradient here."""

from sgcd_jax.config_files import base_config


def get_config():
    cfg = base_config("quickstart")
    cfg.run.name = "sdpo"
    cfg.loss.credit = "none"
    cfg.loss.aux = ("sdpo",)  # aux_loss/sdpo, configured by distill.*
    cfg.distill.coef = 1.0
    cfg.distill.mode = "sampled"
    cfg.annotation.name = "none"  # the SDPO teacher sees a successful sibling, not a credit reference
    cfg.annotation.reference_tokens = 512  # room for that sibling's demonstration (the quickstart sizes a compact reference)
    return cfg
