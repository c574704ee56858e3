"""Copy-on-write view over a shared, read-only JSON database (dict of tables of records).

The τ³ airline DB is 7 MB of JSON; deep-copying it per episode costs ~100 ms and ~30 MB. Instead every
episode gets a ``CowDB``: reads fall through to the shared base, the first write to a record copies
just that record into a per-episode overlay. Two CowDBs over the same base hold the same database iff
their *effective changes* (overlay records that differ from the base) are equal, which makes the
verifier's "final DB == gold DB" check proportional to what the episode touched, not to the DB size.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, Iterator


class CowDB:
    """``base``: ``{table: {key: record}}``, shared between episodes and never mutated."""

    def __init__(self, base: dict[str, dict[str, Any]]):
        self._base = base
        self._overlay: dict[str, dict[str, Any]] = {table: {} for table in base}

    # -- reads: returned records must be treated as read-only --------------------------------
    def has(self, table: str, key: str) -> bool:
        return key in self._overlay[table] or key in self._base[table]

    def get(self, table: str, key: str) -> Any:
        overlay = self._overlay[table]
        return overlay[key] if key in overlay else self._base[table][key]

    def keys(self, table: str) -> Iterator[str]:
        """Base keys in base order, then keys added by this episode (dict insertion order)."""
        yield from self._base[table]
        for key in self._overlay[table]:
            if key not in self._base[table]:
                yield key

    def values(self, table: str) -> Iterator[Any]:
        for key in self.keys(table):
            yield self.get(table, key)

    # -- writes ------------------------------------------------------------------------------
    def get_mut(self, table: str, key: str) -> Any:
        """The record, copied into this episode's overlay on first access, safe to mutate."""
        overlay = self._overlay[table]
        if key not in overlay:
            overlay[key] = copy.deepcopy(self._base[table][key])
        return overlay[key]

    def put(self, table: str, key: str, record: Any) -> None:
        self._overlay[table][key] = record

    # -- comparison --------------------------------------------------------------------------
    def changes(self) -> dict[str, dict[str, Any]]:
        """Records whose value differs from the base (new records included), per table."""
        out: dict[str, dict[str, Any]] = {}
        for table, overlay in self._overlay.items():
            base = self._base[table]
            diff = {k: v for k, v in overlay.items() if k not in base or canonical(base[k]) != canonical(v)}
            if diff:
                out[table] = dict(sorted(diff.items()))
        return out

    def changes_hash(self) -> str:
        return hashlib.sha256(json.dumps(canonical(self.changes()), sort_keys=True).encode()).hexdigest()

    def materialize(self) -> dict[str, dict[str, Any]]:
        """The full database as a plain dict (deep copy; for tests and export, not per episode)."""
        return {table: {k: copy.deepcopy(self.get(table, k)) for k in self.keys(table)}
                for table in self._base}


def canonical(value: Any) -> Any:
    """Normalised JSON value: integral floats become ints, ``None``-valued keys are dropped, so a
    pydantic dump (``amount: 128.0``, ``status: None``) and the raw JSON compare equal."""
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
