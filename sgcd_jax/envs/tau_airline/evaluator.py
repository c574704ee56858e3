"""The official τ²/τ³ airline reward, reimplemented.

reward = [episode ended by agent or user stop]
       × [DB after the episode == DB after replaying the task's gold actions on a fresh DB]
       × [every communicate_info string appears in some agent message (case-insensitive, commas
          removed from the message)]
Both DBs are copy-on-write views over the same pristine base, so equality of their effective changes
is equality of the whole databases.
"""

from __future__ import annotations

from typing import Any

from sgcd_jax.envs.cowdb import CowDB
from sgcd_jax.envs.tau_airline.tools import AirlineTools


def replay_gold(base: dict[str, Any], actions: list[dict[str, Any]], now: str) -> tuple[CowDB, list[str]]:
    """Fresh DB with the gold actions applied; also the errors any gold action raised (expected none)."""
    db = CowDB(base)
    tools = AirlineTools(db, now=now)
    errors = []
    for action in actions:
        _, error = tools.call(action["name"], action.get("arguments", {}))
        if error:
            errors.append(f"{action['name']}: {error}")
    return db, errors


def score(*, termination: str, proper_ends: frozenset[str], db: CowDB, gold_db: CowDB,
          communicated: dict[str, bool]) -> tuple[float, dict[str, Any]]:
    """Reward and the JSON-serialisable breakdown of what was checked."""
    ended_ok = termination in proper_ends
    db_match = db.changes_hash() == gold_db.changes_hash()
    info_ok = all(communicated.values())
    reward = float(ended_ok and db_match and info_ok)
    reasons = []
    if not ended_ok:
        reasons.append(f"episode ended by '{termination or 'nothing'}', not by an agent/user stop")
    if not db_match:
        reasons.append("final DB differs from the gold-action DB")
    if not info_ok:
        reasons.append("missing communicate_info: " + ", ".join(s for s, ok in communicated.items() if not ok))
    return reward, {"reward": reward, "ended_by_stop": ended_ok, "db_match": db_match,
                    "communicate": communicated, "communicate_ok": info_ok,
                    "changed_records": {t: sorted(r) for t, r in db.changes().items()},
                    "gold_changed_records": {t: sorted(r) for t, r in gold_db.changes().items()},
                    "fail_reasons": reasons}
