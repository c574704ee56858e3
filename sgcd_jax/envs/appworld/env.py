"""AppWorld env over a pool of ``appworld serve environment`` processes.

The agent writes Python through one tool, ``execute_python(code)`` (a ```python block in plain text
works too); the episode ends when the code calls ``apis.supervisor.complete_task(...)``, on the turn
limit, or when the server fails. Training reward = fraction of the task's unit tests passed; eval
success = all pass (``info["success"]``).
"""

from __future__ import annotations

import atexit
import os
import re
from pathlib import Path
from typing import Any, Callable

from sgcd_jax.envs.appworld.server import (AppWorldCallError, AppWorldServer, AppWorldServerError,
                                           ServerPool, default_command)
from sgcd_jax.envs.base import AgentAction, EnvReset, EnvStep, Task

ENV_NAME = "appworld"
SPLITS = ("train", "dev", "test_normal", "test_challenge")
EXECUTE_TOOL = {"type": "function", "function": {
    "name": "execute_python", "description": "Run Python code in the AppWorld shell and see its output. "
    "Call apps through `apis.<app>.<api>(...)`; `apis.api_docs` documents them.",
    "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}}}
SYSTEM_PROMPT = (
    "You are a coding agent acting for your supervisor in AppWorld, a world of everyday apps reachable "
    "through Python APIs. Solve the task step by step with execute_python. Look up API docs with "
    "apis.api_docs.show_api_descriptions(app_name=...) and show_api_doc(app_name=..., api_name=...). "
    "When done, call apis.supervisor.complete_task(answer=...) (answer only if the task asks a question).")
_CODE_BLOCK = re.compile(r"```(?:python)?\s*\n(.*?)```", re.S)


def data_root(root: str | os.PathLike | None = None) -> Path:
    """$APPWORLD_ROOT (or ``root``), checked to hold ``data/``."""
    root = Path(root or os.environ.get("APPWORLD_ROOT", ""))
    if not str(root) or not (root / "data" / "tasks").is_dir():
        raise FileNotFoundError(
            f"AppWorld data not found at {root or '$APPWORLD_ROOT (unset)'}/data — run `appworld download "
            "data` where there is internet (inside the venv from launch/appworld_setup.sh), copy it here "
            "and set $APPWORLD_ROOT")
    return root


def load_task_ids(root: Path, split: str) -> list[str]:
    path = root / "data" / "datasets" / f"{split}.txt"
    if not path.exists():
        raise FileNotFoundError(f"AppWorld split file {path} missing; splits: {', '.join(SPLITS)}")
    return [line.strip().split(":")[0] for line in path.read_text().splitlines() if line.strip()]


class AppWorldEnv:
    name = ENV_NAME

    def __init__(self, pool: ServerPool, max_turns: int = 30, experiment_name: str = "sgcd",
                 acquire_timeout_s: float | None = 600.0):
        self.pool, self.max_turns, self.experiment_name = pool, max_turns, experiment_name
        self.acquire_timeout_s = acquire_timeout_s
        self.server: AppWorldServer | None = None
        self.task: Task | None = None
        self.turns, self.termination, self.error = 0, "", ""
        self._evaluation: dict[str, Any] | None = None

    def reset(self, task: Task) -> EnvReset:
        self.task = task
        self.server = self.pool.acquire(self.acquire_timeout_s)
        try:
            spec = self.server.call("initialize", {"task_id": task.task_id,
                                                   "experiment_name": self.experiment_name})
        except (AppWorldServerError, AppWorldCallError):
            self._release(broken=True)
            raise
        sup = spec["supervisor"]
        user = (f"My name is {sup['first_name']} {sup['last_name']} (email {sup['email']}, phone "
                f"{sup['phone_number']}). Task: {spec['instruction']}")
        return EnvReset(messages=[{"role": "system", "content": SYSTEM_PROMPT},
                                  {"role": "user", "content": user}], tools=[EXECUTE_TOOL])

    def step(self, action: AgentAction) -> EnvStep:
        if self.server is None or self.termination:
            raise RuntimeError("step() needs reset(task) first and a running episode")
        self.turns += 1
        codes = [(c.call_id, c.arguments.get("code") if isinstance(c.arguments, dict) else None, c.name)
                 for c in action.tool_calls] or [("", m, "execute_python")
                                                  for m in _CODE_BLOCK.findall(action.content)]
        observations, errors = [], 0
        if not codes:
            observations.append({"role": "user", "content": "Continue by writing Python code with "
                                 "execute_python; call apis.supervisor.complete_task() when done."})
        for call_id, code, name in codes:
            if name != "execute_python" or not isinstance(code, str):
                errors += 1
                text = f"Error: unknown tool {name!r} or missing string 'code'; use execute_python(code)"
            else:
                try:
                    text = str(self.server.call("execute", {"task_id": self.task.task_id, "code": code}))
                except AppWorldCallError as exc:
                    errors, text = errors + 1, f"Error: {exc}"
                except AppWorldServerError as exc:
                    errors, text = errors + 1, f"Error: the AppWorld environment failed ({exc})"
                    self.error, self.termination = str(exc), "error"
            observations.append({"role": "tool", "tool_call_id": call_id, "name": "execute_python",
                                 "content": text})
            if self.termination:
                break
        if not self.termination and self._completed():
            self.termination = "agent_stop"
        if not self.termination and self.turns >= self.max_turns:
            self.termination = "max_turns"
        return EnvStep(observations=observations, done=bool(self.termination),
                       termination=self.termination, tool_errors=errors)

    def _completed(self) -> bool:
        try:
            return bool(self.server.call("task_completed", {"task_id": self.task.task_id}))
        except (AppWorldServerError, AppWorldCallError) as exc:
            self.error, self.termination = str(exc), "error"
            return False

    def _evaluate(self) -> dict[str, Any]:
        if self._evaluation is None:
            if self.task is None:
                raise RuntimeError("reward()/info() before reset(task)")
            result: dict[str, Any] = {}
            if self.server is not None and not self.error:
                try:
                    result = self.server.call("evaluate", {"task_id": self.task.task_id,
                                                           "suppress_errors": True})
                except (AppWorldServerError, AppWorldCallError) as exc:
                    self.error = str(exc)
            num_tests = int(result.get("num_tests") or 0)
            passed = len(result.get("passes") or [])
            self._evaluation = {
                "reward": passed / num_tests if num_tests else 0.0, "success": bool(result.get("success")),
                "num_tests": num_tests, "passed": passed,
                "failed_requirements": [f.get("requirement", "") for f in result.get("failures") or []],
                "termination": self.termination, "error": self.error, "task_id": self.task.task_id}
            self._release(broken=bool(self.error))
        return self._evaluation

    def reward(self) -> float:
        return self._evaluate()["reward"]

    def info(self) -> dict[str, Any]:
        return dict(self._evaluate())

    def close(self) -> None:
        """Give the server back without evaluating (e.g. an aborted episode)."""
        self._release(broken=bool(self.error))

    def _release(self, broken: bool) -> None:
        if self.server is None:
            return
        if not broken:
            try:
                self.server.call("close", {"task_id": self.task.task_id}, timeout_s=30)
            except (AppWorldServerError, AppWorldCallError):
                broken = True
        self.pool.release(self.server, broken=broken)
        self.server = None


class AppWorldFactory:
    name = ENV_NAME
    cheap_reset = False  # a reset is a server round trip: preflight does not measure prompts here

    def __init__(self, root: str | None = None, pool_size: int = 2, venv: str | None = None,
                 command: Callable[[int], list[str]] | None = None, max_turns: int = 30,
                 startup_timeout_s: float = 180.0, request_timeout_s: float = 120.0,
                 experiment_name: str = "sgcd", log_dir: str | None = None, **_: Any):
        self.root = data_root(root)
        command = command or default_command(venv, self.root)
        server_env = {"APPWORLD_ROOT": str(self.root)}
        self.pool = ServerPool(pool_size, lambda: AppWorldServer(
            command, env=server_env, startup_timeout_s=startup_timeout_s,
            request_timeout_s=request_timeout_s, log_dir=log_dir))
        self.max_turns, self.experiment_name = max_turns, experiment_name
        atexit.register(self.pool.close)

    def tasks(self, split: str) -> list[Task]:
        return [Task(task_id, ENV_NAME, {"task_id": task_id}) for task_id in load_task_ids(self.root, split)]

    def make(self) -> AppWorldEnv:
        return AppWorldEnv(self.pool, self.max_turns, self.experiment_name)

    def close(self) -> None:
        self.pool.close()
