"""τ³-airline on the official tau2 airline data: own tools, copy-on-write DB, official reward."""

__all__ = ["TauAirlineEnv", "TauAirlineFactory"]


def __getattr__(name):  # lazy: tools/schemas are imported by the shared conversation module
    if name in __all__:
        from sgcd_jax.envs.tau_airline import env
        return getattr(env, name)
    raise AttributeError(name)
