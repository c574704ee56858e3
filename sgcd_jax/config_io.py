"""The resolved config as saved in the run dir (``config.json``): plain dicts, secret-looking keys dropped.
Re-exported by ``sgcd_jax.config``; kept apart so that module stays the dataclasses and their checks."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SECRET_KEY_MARKERS = ("api_key", "apikey", "token_secret", "password", "secret")


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def scrub_secrets(tree: dict) -> dict:
    """``tree`` without keys that look like secrets (api keys, passwords), at any depth."""
    return {k: (scrub_secrets(v) if isinstance(v, dict) else v) for k, v in tree.items()
            if not any(m in k.lower() for m in SECRET_KEY_MARKERS)}


def save_resolved(config: Any, run_dir: str) -> str:
    """Write the resolved config as JSON; keys that look like secrets are dropped."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "config.json")
    with open(path, "w") as f:
        json.dump(scrub_secrets(to_dict(config)), f, indent=2, sort_keys=True)
    return path
