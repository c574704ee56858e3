"""``make_factory(name, **kwargs)``: the one way the trainer, eval and rollout code get an env factory.

Unknown keyword arguments are ignored by each factory, so a whole ``EnvSpec`` can be passed through.
"""

from __future__ import annotations

from typing import Any, Callable

from sgcd_jax.envs.base import EnvFactory


def _airline_lite(**kwargs: Any) -> EnvFactory:
    from sgcd_jax.envs.airline_lite import AirlineLiteFactory
    return AirlineLiteFactory(**kwargs)


def _tau3_airline(**kwargs: Any) -> EnvFactory:
    from sgcd_jax.envs.tau_airline import TauAirlineFactory
    return TauAirlineFactory(**kwargs)


def _appworld(**kwargs: Any) -> EnvFactory:
    from sgcd_jax.envs.appworld import AppWorldFactory
    return AppWorldFactory(**kwargs)


FACTORIES: dict[str, Callable[..., EnvFactory]] = {
    "airline_lite": _airline_lite, "tau3_airline": _tau3_airline, "appworld": _appworld}


def make_factory(name: str, **kwargs: Any) -> EnvFactory:
    if name not in FACTORIES:
        raise ValueError(f"unknown env {name!r}; registered: {sorted(FACTORIES)}")
    return FACTORIES[name](**kwargs)


def make_factory_from_spec(spec: Any, **overrides: Any) -> EnvFactory:
    """``make_factory(spec.name, **other fields of spec, **overrides)`` for a dataclass spec
    (e.g. ``config.EnvSpec``); fields a factory does not use are ignored."""
    import dataclasses
    fields = dataclasses.asdict(spec) if dataclasses.is_dataclass(spec) else dict(vars(spec))
    name = fields.pop("name")
    return make_factory(name, **{**fields, **overrides})
