"""Trajectory: the unit that flows from rollout to reward, sibling selection, annotation, scoring
and the train step.

Token-level arrays all have length ``len(token_ids)`` and index the whole rendered conversation.
``token_ids[:prompt_len]`` is the shared prompt (system, tools, task) that siblings of one task have
in common and that the teacher replaces with a prompt carrying the credit reference; everything from
``prompt_len`` on is the "response": generated assistant tokens (``loss_mask == 1``) interleaved with
tool observations / user replies / template tokens (``loss_mask == 0``). Generated ids are exactly the
ids the sampler produced: no decode→re-encode.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from sgcd_jax.envs.base import ToolCall


@dataclasses.dataclass
class Step:
    """One assistant turn and what followed it."""

    index: int
    text: str  # the generated assistant text (decoded from the sampler's ids, for humans)
    tool_calls: list[ToolCall]
    observations: list[dict[str, Any]]  # tool results / user reply appended after this turn
    parse_error: str = ""  # non-empty when the turn's tool call could not be parsed


@dataclasses.dataclass
class Trajectory:
    task_id: str
    group_id: str  # siblings of one task in one iteration share it
    sample_index: int  # index within the group
    token_ids: np.ndarray  # [T] int32, whole conversation
    loss_mask: np.ndarray  # [T] int32, 1 exactly on policy-generated tokens
    step_ids: np.ndarray  # [T] int32, assistant turn index on generated tokens, -1 elsewhere
    sampler_logprobs: np.ndarray  # [T] float32, sampler log p of generated tokens, 0 elsewhere
    prompt_len: int  # tokens of the shared prompt
    messages: list[dict[str, Any]]  # full chat (system, user, assistant, tool) for rendering
    steps: list[Step]
    reward: float = 0.0
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    termination: str = ""
    timing: dict[str, float] = dataclasses.field(default_factory=dict)
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # parse errors, tool errors…

    def __post_init__(self):
        n = len(self.token_ids)
        for name in ("loss_mask", "step_ids", "sampler_logprobs"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Trajectory.{name} has length {len(getattr(self, name))}, "
                                 f"token_ids has {n}: all token arrays must align")
        if not 0 <= self.prompt_len <= n:
            raise ValueError(f"prompt_len={self.prompt_len} outside [0, {n}]")

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def response_ids(self) -> np.ndarray:
        return self.token_ids[self.prompt_len:]
