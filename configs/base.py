"""Base config: every key with its default (mirrors sgcd_jax.config.TrainConfig).

Usage: ``python -m sgcd_jax.train --config configs/base.py --config.rollout.group_size=8``.
Other configs start from ``base.get_config()`` and change only what differs.
"""

import dataclasses

from ml_collections import config_dict

from sgcd_jax.config import TrainConfig


def get_config() -> config_dict.ConfigDict:
    cfg = config_dict.ConfigDict(dataclasses.asdict(TrainConfig()))
    cfg.lock()  # adding a key that TrainConfig does not know fails here, not mid-run
    return cfg
