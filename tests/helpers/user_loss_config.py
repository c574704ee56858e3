"""A researcher's own config file: it registers a policy loss and selects it by name, without touching
the package (README, "Your own loss"). The loss is PPO scaled by ``SCALE`` = 0, so an update through
it must leave the parameters exactly where they were."""

from sgcd_jax.config_files import base_config
from sgcd_jax.losses import register
from sgcd_jax.losses.policy import ppo_policy_loss

SCALE = 0.0


@register("policy_loss/scaled_ppo")
def scaled_ppo(batch, cfg):
    out = ppo_policy_loss(batch, cfg)
    return out.replace(sum=SCALE * out.sum)


def get_config():
    cfg = base_config("sgcd")
    cfg.run.name = "user_loss"
    cfg.loss.policy = "scaled_ppo"
    return cfg
