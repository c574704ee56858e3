"""Multi-turn episode driver (RolloutEngine), tool-call parsing, Trajectory and its text rendering."""

from sgcd_jax.rollout.trajectory import Step, Trajectory

__all__ = ["Step", "Trajectory", "RolloutEngine", "RolloutConfig", "trajectory_to_text", "parse_tool_calls"]


def __getattr__(name: str):
    # The engine pulls in jax and the sampler; keep `from sgcd_jax.rollout import Trajectory` light.
    if name in ("RolloutEngine", "RolloutConfig"):
        from sgcd_jax.rollout import engine
        return getattr(engine, name)
    if name == "trajectory_to_text":
        from sgcd_jax.rollout.text import trajectory_to_text
        return trajectory_to_text
    if name == "parse_tool_calls":
        from sgcd_jax.rollout.toolparse import parse_tool_calls
        return parse_tool_calls
    raise AttributeError(f"module 'sgcd_jax.rollout' has no attribute {name!r}")
