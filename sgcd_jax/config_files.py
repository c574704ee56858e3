"""Config files: ``configs/*.py`` whose ``get_config()`` returns an ``ml_collections.ConfigDict``.

A config file starts from another with ``base_config("quickstart")`` (no ``sys.path`` edits; works from
any working directory), takes a library preset with ``credit_preset("rlsd")``, and may register its
own loss functions (``sgcd_jax.losses.register``) before selecting them by name.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

from sgcd_jax.config import ConfigError, TrainConfig, from_config_dict, unknown_key_message
from sgcd_jax.losses import CreditConfig


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def load_config_file(path: str, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Load ``configs/x.py`` (its ``get_config()``), apply dotted ``overrides``, validate."""
    cd = _module(path).get_config()
    for dotted, value in (overrides or {}).items():
        node = cd
        *parents, leaf = dotted.split(".")
        for p in parents:
            _check(p in node, unknown_key_message(dotted))
            node = node[p]
        _check(leaf in node, unknown_key_message(dotted))
        node[leaf] = value
    return from_config_dict(cd)


def base_config(name: str) -> Any:
    """``get_config()`` of ``configs/<name>.py``: how a config file starts from another (``base``,
    ``quickstart``, ``sgcd`` …) without ``sys.path`` edits, from any working directory."""
    path = name if name.endswith(".py") else os.path.join(configs_dir(), f"{name}.py")
    _check(os.path.exists(path), f"no config file {path!r}; configs: {sorted(os.listdir(configs_dir()))}")
    return _module(path).get_config()


def credit_preset(name: str) -> dict[str, Any]:
    """The loss library's credit preset (``CreditConfig.preset``: sgcd | rlsd | none) as ``credit.*``
    values for a config file: ``cfg.credit.update(credit_preset("rlsd"))``."""
    return dataclasses.asdict(CreditConfig.preset(name))


def _module(path: str):
    spec = importlib.util.spec_from_file_location(f"sgcd_config_{abs(hash(os.path.abspath(path)))}", path)
    _check(spec is not None and spec.loader is not None, f"cannot load config file {path!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def configs_dir() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(here, "configs")


