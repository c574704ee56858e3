"""Environments: the Env protocol (base.py), τ³-airline, airline_lite, AppWorld, users and metrics."""

from sgcd_jax.envs.base import AgentAction, Env, EnvFactory, EnvReset, EnvStep, Task, ToolCall
from sgcd_jax.envs.registry import FACTORIES, make_factory, make_factory_from_spec

__all__ = ["AgentAction", "Env", "EnvFactory", "EnvReset", "EnvStep", "FACTORIES", "Task", "ToolCall",
           "make_factory", "make_factory_from_spec"]
