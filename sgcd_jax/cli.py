"""The trainer's command line: ``--config file.py``, ``--config.a.b=value`` overrides, ``--dry_run``
and ``--help``. Overrides are applied by ``ml_collections.config_flags`` after every key is checked
here, so an unknown key names itself and the closest valid ones instead of absl's bare ``'foo'``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from sgcd_jax import config as config_lib
from sgcd_jax import config_files

USAGE = """usage: python -m sgcd_jax.train [--config configs/x.py] [--config.SECTION.KEY=VALUE ...] [--dry_run]

Train (or resume) a policy. With no --config it runs the quickstart (configs/quickstart.py).
  --config FILE            experiment config file (its get_config() returns an ml_collections ConfigDict)
  --config.a.b=VALUE       override one key (listed below with its default)
  --dry_run                validate, print the resolved config as JSON and exit (no model is built)
  -h, --help               this text
Loss functions are chosen by registry name: loss.advantage, loss.policy, loss.credit, loss.aux
(sgcd_jax.losses.registered(kind)); a config file may register its own with sgcd_jax.losses.register.
"""


def help_text() -> str:
    defaults = _flatten(config_lib.to_dict(config_lib.TrainConfig()))
    width = max(len(k) for k in defaults)
    lines = [f"  {key:<{width}}  {json.dumps(value)}" for key, value in defaults.items()]
    return USAGE + "\nkeys (default):\n" + "\n".join(lines) + "\n"


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _override_key(arg: str) -> str | None:
    """``--config.a.b=v`` → ``a.b`` (None for other arguments)."""
    if not arg.startswith("--config."):
        return None
    return arg[len("--config."):].split("=", 1)[0]


def parse_args(argv: list[str]) -> tuple[config_lib.TrainConfig, bool]:
    """(validated config, dry_run). ``argv[0]`` is the program name. Raises ConfigError naming the bad key."""
    from absl import flags
    from ml_collections import config_flags

    dry_run = any(a in ("--dry_run", "--dry_run=true", "--dry_run=True") for a in argv[1:])
    argv = [a for a in argv if not a.startswith("--dry_run")]
    valid = set(config_lib.all_keys())
    for arg in argv[1:]:
        key = _override_key(arg)
        if key is not None and key not in valid:
            raise config_lib.ConfigError(config_lib.unknown_key_message(key))
        if key is None and not arg.startswith("--config") and arg.startswith("-"):
            raise config_lib.ConfigError(f"unknown argument {arg!r}\n{USAGE}")
    flag_values = flags.FlagValues()
    default = os.path.join(config_files.configs_dir(), "quickstart.py")
    try:
        config_flags.DEFINE_config_file("config", default, "experiment config file", flag_values=flag_values,
                                        sys_argv=list(argv), lock_config=True)
        flag_values(argv)
        config_dict = flag_values.config
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as err:
        overrides = [a for a in argv[1:] if a.startswith("--config")]
        raise config_lib.ConfigError(f"bad command line {overrides}: {err}. Keys and defaults: "
                                     "python -m sgcd_jax.train --help") from None
    return config_lib.from_config_dict(config_dict), dry_run


def resolved_json(config: config_lib.TrainConfig) -> str:
    """The resolved config as ``save_resolved`` writes it (secret-looking keys dropped)."""
    return json.dumps(config_lib.scrub_secrets(dataclasses.asdict(config)), indent=2, sort_keys=True)


def parse_or_exit(argv: list[str]) -> tuple[config_lib.TrainConfig, bool]:
    """``parse_args`` for ``main``: ``--help`` prints and exits 0; a config error exits 1 with its message."""
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        sys.stdout.write(help_text())
        sys.exit(0)
    try:
        return parse_args(argv)
    except config_lib.ConfigError as err:
        sys.exit(f"config error: {err}")
