"""Per-episode bookkeeping for the rollout driver: the token streams of one conversation and the
guarded env calls (timeouts, exceptions, malformed results never escape an episode)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import time
from collections import Counter
from typing import Any

import numpy as np

from sgcd_jax.envs.base import EnvStep, Task
from sgcd_jax.rollout.trajectory import Step, Trajectory


class EnvCallError(RuntimeError):
    """An env call raised, timed out or returned something that is not what the protocol promises."""

    def __init__(self, termination: str, message: str):
        super().__init__(message)
        self.termination = termination  # "env_timeout" | "env_error"


def wait_result(future: concurrent.futures.Future, deadline: float, what: str) -> Any:
    try:
        return future.result(timeout=max(deadline - time.monotonic(), 0.0))
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise EnvCallError("env_timeout", f"{what} did not return before its timeout") from None
    except Exception as exc:  # noqa: BLE001 — any env failure ends only this episode
        raise EnvCallError("env_error", f"{what} raised {type(exc).__name__}: {exc}") from exc


def checked_env_step(result: Any) -> EnvStep:
    """Validate an env.step result; coerce non-string observation content to JSON text."""
    if not isinstance(result, EnvStep):
        raise EnvCallError("env_error", f"env.step returned {type(result).__name__}, expected EnvStep")
    if not isinstance(result.observations, list):
        raise EnvCallError("env_error", "EnvStep.observations must be a list of chat messages")
    observations = []
    for message in result.observations:
        if not isinstance(message, dict) or message.get("role") not in ("tool", "user"):
            raise EnvCallError("env_error", f"observation {str(message)[:80]!r} is not a tool/user chat message")
        content = message.get("content", "")
        if not isinstance(content, str):
            content = json.dumps(content, default=str)
        observations.append({**message, "content": content})
    if not result.done and not observations:
        raise EnvCallError("env_error", "env.step returned no observation and done=False: the agent would have "
                                        "nothing to respond to")
    return dataclasses.replace(result, observations=observations)


@dataclasses.dataclass
class Episode:
    key: tuple[int, int]  # (task index, sibling index)
    task: Task
    group_id: str
    env: Any = None
    tools: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    messages: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    loss_mask: list[int] = dataclasses.field(default_factory=list)
    step_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    prompt_len: int = 0
    steps: list[Step] = dataclasses.field(default_factory=list)
    pending: list[int] = dataclasses.field(default_factory=list)  # ids the policy must read before generating
    metrics: Counter = dataclasses.field(default_factory=Counter)
    timing: Counter = dataclasses.field(default_factory=Counter)
    parsed: Any = None  # ParsedTurn of the latest assistant turn
    ended_with_end_of_turn: bool = True  # the latest turn ended with a stop token (not cut by max tokens)
    termination: str = ""
    error: str = ""
    started: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def done(self) -> bool:
        return bool(self.termination)

    def finish(self, termination: str, error: str = "") -> None:
        if not self.termination:
            self.termination, self.error = termination, error

    def add_context(self, ids: list[int]) -> None:
        """Template / observation ids: read by the policy, never trained on."""
        self.token_ids += ids
        self.loss_mask += [0] * len(ids)
        self.step_ids += [-1] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.pending += ids

    def add_generated(self, ids: np.ndarray, logprobs: np.ndarray, step_index: int) -> None:
        """The sampler's ids, verbatim; already in the KV cache, so nothing becomes pending."""
        self.token_ids += ids.tolist()
        self.loss_mask += [1] * len(ids)
        self.step_ids += [step_index] * len(ids)
        self.logprobs += logprobs.astype(float).tolist()
        self.pending = []

    def to_trajectory(self, sample_index: int, reward: float, info: dict[str, Any]) -> Trajectory:
        """``reward`` is validated here, at the env boundary: a reward that is not a finite number
        (NaN / inf / not a number) becomes 0 and is counted in ``reward_errors``, so one env bug
        never turns a whole update's advantages NaN."""
        try:
            reward = float(reward)
        except (TypeError, ValueError):
            reward = float("nan")
        if not math.isfinite(reward):
            self.metrics["reward_errors"] += 1
            self.error = self.error or "env.reward returned a non-finite value; scored 0"
            reward = 0.0
        self.timing["total_s"] = time.monotonic() - self.started
        return Trajectory(
            task_id=self.task.task_id, group_id=self.group_id, sample_index=sample_index,
            token_ids=np.asarray(self.token_ids, np.int32), loss_mask=np.asarray(self.loss_mask, np.int32),
            step_ids=np.asarray(self.step_ids, np.int32), sampler_logprobs=np.asarray(self.logprobs, np.float32),
            prompt_len=self.prompt_len, messages=self.messages, steps=self.steps, reward=float(reward),
            info={**info, **({"rollout_error": self.error} if self.error else {})},
            termination=self.termination, timing=dict(self.timing),
            metrics={k: float(v) for k, v in self.metrics.items()})
