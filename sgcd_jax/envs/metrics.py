"""Evaluation metrics and the eval runner.

pass^k (τ-bench): probability that k i.i.d. trials of a task all succeed, unbiased from n trials with c
successes: C(c, k) / C(n, k), averaged over tasks. pass@k (Codex): probability at least one of k
succeeds: 1 − C(n − c, k) / C(n, k). AppWorld: TGC = fraction of tasks whose unit tests all pass;
SGC = fraction of scenarios all of whose tasks pass.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sgcd_jax.envs.base import Env, EnvFactory, Task

SUCCESS_THRESHOLD = 1.0 - 1e-9  # a trial succeeds when its reward is 1 (binary verifiers)


def pass_hat_k(successes: int, trials: int, k: int) -> float:
    """C(c, k) / C(n, k) for one task."""
    _check(successes, trials, k)
    return math.comb(successes, k) / math.comb(trials, k)


def pass_at_k(successes: int, trials: int, k: int) -> float:
    """1 − C(n − c, k) / C(n, k) for one task."""
    _check(successes, trials, k)
    return 1.0 - math.comb(trials - successes, k) / math.comb(trials, k)


def _check(successes: int, trials: int, k: int) -> None:
    if not 0 <= successes <= trials or not 1 <= k <= trials:
        raise ValueError(f"need 0 <= successes ({successes}) <= trials ({trials}) and 1 <= k ({k}) <= trials")


def mean_over_tasks(fn: Callable[[int, int, int], float], counts: Sequence[tuple[int, int]], k: int) -> float:
    """Average of ``fn(c, n, k)`` over tasks given (successes, trials) per task."""
    if not counts:
        raise ValueError("no tasks to average over")
    return sum(fn(c, n, k) for c, n in counts) / len(counts)


def task_goal_completion(task_success: dict[str, bool]) -> float:
    """AppWorld TGC: fraction of tasks that pass all their unit tests."""
    return sum(task_success.values()) / len(task_success) if task_success else 0.0


def scenario_goal_completion(task_success: dict[str, bool], scenario_of: Callable[[str], str]) -> float:
    """AppWorld SGC: fraction of scenarios whose every task passes (AppWorld task ids are
    ``<scenario>_<n>``; pass ``scenario_of`` to map ids)."""
    by_scenario: dict[str, list[bool]] = defaultdict(list)
    for task_id, ok in task_success.items():
        by_scenario[scenario_of(task_id)].append(ok)
    return sum(all(v) for v in by_scenario.values()) / len(by_scenario) if by_scenario else 0.0


def appworld_scenario(task_id: str) -> str:
    return task_id.rsplit("_", 1)[0]


# A policy plays one whole episode on a fresh env and returns a JSON-able record (optional).
# It sees only what ``env.reset`` returns: the eval path never renders training-only context.
PolicyFn = Callable[[Env, Task], Any]


def play_episode(policy_fn: PolicyFn, factory: EnvFactory, task: Task) -> dict[str, Any]:
    env = factory.make()
    start = time.perf_counter()
    error = ""
    try:
        policy_fn(env, task)
    except Exception as exc:  # noqa: BLE001 - a crashing episode scores 0, the eval goes on
        error = f"{type(exc).__name__}: {exc}"
    try:
        reward, info = float(env.reward()), env.info()
    except Exception as exc:  # noqa: BLE001
        reward, info, error = 0.0, {}, error or f"{type(exc).__name__}: {exc}"
    return {"reward": reward, "success": reward >= SUCCESS_THRESHOLD, "info": info, "error": error,
            "seconds": time.perf_counter() - start}


def evaluate(policy_fn: PolicyFn, factory: EnvFactory, split: str, n_trials: int,
             ks: Iterable[int] | None = None, tasks: Sequence[Task] | None = None,
             ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Play every task of ``split`` ``n_trials`` times; (per-task rows, summary).

    Row: task_id, trials, successes, rewards, mean_reward, errors, infos. Summary: mean reward, pass^k
    and pass@k for k in ``ks`` (default 1..n_trials), TGC/SGC for AppWorld, counts.
    """
    if n_trials < 1:
        raise ValueError("n_trials must be >= 1")
    tasks = list(tasks if tasks is not None else factory.tasks(split))
    rows = []
    for task in tasks:
        episodes = [play_episode(policy_fn, factory, task) for _ in range(n_trials)]
        rewards = [e["reward"] for e in episodes]
        rows.append({"task_id": task.task_id, "trials": n_trials,
                     "successes": sum(e["success"] for e in episodes), "rewards": rewards,
                     "mean_reward": sum(rewards) / n_trials,
                     "errors": [e["error"] for e in episodes if e["error"]],
                     "infos": [e["info"] for e in episodes]})
    return rows, summarize(rows, factory.name, split, ks)


def summarize(rows: list[dict[str, Any]], env_name: str, split: str,
              ks: Iterable[int] | None = None) -> dict[str, Any]:
    if not rows:
        raise ValueError(f"no tasks in split {split!r}")
    n = min(r["trials"] for r in rows)
    counts = [(min(r["successes"], n), n) for r in rows]
    ks = sorted(set(ks or range(1, n + 1)))
    summary = {"env": env_name, "split": split, "num_tasks": len(rows), "trials": n,
               "mean_reward": sum(r["mean_reward"] for r in rows) / len(rows),
               "pass_hat_k": {k: mean_over_tasks(pass_hat_k, counts, k) for k in ks if k <= n},
               "pass_at_k": {k: mean_over_tasks(pass_at_k, counts, k) for k in ks if k <= n},
               "episode_errors": sum(len(r.get("errors", [])) for r in rows)}
    writes = [i for r in rows for i in r.get("infos", []) if isinstance(i, dict) and "write_calls" in i]
    if writes:
        total = sum(i["write_calls"] for i in writes)
        summary["write_call_success_rate"] = (sum(i["write_calls_ok"] for i in writes) / total
                                              if total else None)
    if env_name == "appworld":
        first_trial = {r["task_id"]: r["rewards"][0] >= SUCCESS_THRESHOLD for r in rows}
        summary["tgc"] = task_goal_completion(first_trial)
        summary["sgc"] = scenario_goal_completion(first_trial, appworld_scenario)
    return summary


def save_eval(rows: list[dict[str, Any]], summary: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``per_task.jsonl`` (one row per task) and ``summary.json`` under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows_path, summary_path = out / "per_task.jsonl", out / "summary.json"
    with rows_path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row, default=str) + "\n")
    summary_path.write_text(json.dumps(summary, indent=2, default=str))
    return rows_path, summary_path
