"""airline_lite: built-in procedurally generated airline tasks with a scripted user (fast default)."""

from sgcd_jax.envs.airline_lite.env import AirlineLiteEnv, AirlineLiteFactory
from sgcd_jax.envs.airline_lite.oracle import (demo_conversation, oracle_actions, oracle_demos, oracle_policy,
                                              shortcut_actions)

__all__ = ["AirlineLiteEnv", "AirlineLiteFactory", "demo_conversation", "oracle_actions", "oracle_demos",
           "oracle_policy", "shortcut_actions"]
