"""τ³-airline on the official tau2 airline data: own tools, copy-on-write DB, official reward."""

from sgcd_jax.envs.tau_airline.env import TauAirlineEnv, TauAirlineFactory

__all__ = ["TauAirlineEnv", "TauAirlineFactory"]
