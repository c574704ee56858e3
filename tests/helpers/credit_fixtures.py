"""Hand-built sibling trajectories for the credit tests, with a toy prompt renderer.

``render_prompt_ids`` is a character-level stand-in for a chat template: deterministic,
context-sensitive (every character changes the ids) and cheap. Trajectories built here use it for
their prompt, so the teacher builder's consistency check sees the real contract.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import numpy as np

from sgcd_jax.credit.selection import SiblingGroup, group_siblings
from sgcd_jax.envs.base import ToolCall
from sgcd_jax.rollout.trajectory import Step, Trajectory

ROLE_IDS = {"system": 1, "user": 2, "assistant": 3, "tool": 4}
GENERATION_PROMPT = [5, 3]
SYSTEM = "You are an airline agent. Follow the policy."
TOOLS = [{"type": "function", "function": {"name": "get_reservation_details",
                                           "parameters": {"type": "object"}}}]


def render_prompt_ids(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
    ids = [7] + [10 + (ord(c) % 500) for c in json.dumps(tools or [], sort_keys=True)][:40]
    for msg in messages:
        ids.append(ROLE_IDS[msg["role"]])
        ids.extend(10 + (ord(c) % 500) for c in str(msg.get("content", "")))
        ids.append(6)
    return ids + GENERATION_PROMPT


def call(name: str, **arguments: Any) -> ToolCall:
    return ToolCall(name=name, arguments=arguments)


def make_trajectory(group_id: str, sample_index: int, reward: float,
                    steps: list[list[ToolCall] | str], *, task_id: str | None = None,
                    user_text: str = "Please cancel reservation ABC123.",
                    obs_text: str = '{"status": "ok"}', parse_errors: dict[int, str] | None = None,
                    info: dict[str, Any] | None = None) -> Trajectory:
    """``steps``: per assistant turn, its tool calls, or a string for a text-only turn."""
    parse_errors = parse_errors or {}
    prompt_msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user_text}]
    prompt = render_prompt_ids(prompt_msgs, TOOLS)
    ids, mask, step_ids = list(prompt), [0] * len(prompt), [-1] * len(prompt)
    messages, trajectory_steps = list(prompt_msgs), []
    rng = np.random.default_rng(zlib.crc32(f"{group_id}/{sample_index}".encode()))
    for k, spec in enumerate(steps):
        calls = [] if isinstance(spec, str) else list(spec)
        text = spec if isinstance(spec, str) else ""
        n_gen = int(rng.integers(3, 9))
        ids += [int(x) for x in rng.integers(600, 900, n_gen)]
        mask += [1] * n_gen
        step_ids += [k] * n_gen
        observations = [{"role": "tool", "content": obs_text}] if calls else [
            {"role": "user", "content": "ok thanks"}]
        n_obs = int(rng.integers(2, 5))
        ids += [int(x) for x in rng.integers(900, 999, n_obs)]
        mask += [0] * n_obs
        step_ids += [-1] * n_obs
        messages.append({"role": "assistant", "content": text,
                         "tool_calls": [{"name": c.name, "arguments": c.arguments} for c in calls]})
        messages.extend(observations)
        trajectory_steps.append(Step(index=k, text=text, tool_calls=calls, observations=observations,
                                     parse_error=parse_errors.get(k, "")))
    n = len(ids)
    return Trajectory(task_id=task_id or f"task-{group_id}", group_id=group_id,
                      sample_index=sample_index, token_ids=np.asarray(ids, np.int32),
                      loss_mask=np.asarray(mask, np.int32), step_ids=np.asarray(step_ids, np.int32),
                      sampler_logprobs=np.where(np.asarray(mask) == 1, -0.5, 0.0).astype(np.float32),
                      prompt_len=len(prompt), messages=messages, steps=trajectory_steps,
                      reward=reward, info=info or {}, termination="agent_stop")


def cancel_group(group_id: str = "g0", task_id: str | None = None) -> SiblingGroup:
    """Siblings 0 and 2 succeed (look up, cancel the right reservation); sibling 1 looks up the
    wrong reservation and cancels it (fatal write); sibling 3 looks up correctly, then stops."""
    lookup = call("get_reservation_details", reservation_id="ABC123")
    cancel = call("cancel_reservation", reservation_id="ABC123")
    trajs = [
        make_trajectory(group_id, 0, 1.0, [[lookup], [cancel], "Done, it is cancelled."], task_id=task_id),
        make_trajectory(group_id, 1, 0.0, [[call("get_reservation_details", reservation_id="XYZ999")],
                                           [call("cancel_reservation", reservation_id="XYZ999")],
                                           "Done."], task_id=task_id),
        make_trajectory(group_id, 2, 1.0, [[call("get_reservation_details", reservation_id=" abc123 ")],
                                           "Shall I cancel it?", [cancel], "Cancelled."], task_id=task_id),
        make_trajectory(group_id, 3, 0.0, [[lookup], "I cannot cancel this reservation."],
                        task_id=task_id),
    ]
    return group_siblings(trajs, 1.0)[0]


def valid_reference_json(group: SiblingGroup) -> str:
    """A well-formed reply for ``group``: decisive/fatal on write steps, neutral elsewhere."""
    siblings = []
    for traj, ok in zip(group.trajectories, group.successes):
        steps = []
        for step in traj.steps:
            writes = any(c.name.startswith("cancel") for c in step.tool_calls)
            verdict = ("decisive" if ok else "fatal") if writes else "neutral"
            steps.append({"step": step.index, "verdict": verdict, "reason": f"step {step.index}"})
        siblings.append({"sample_index": traj.sample_index, "steps": steps})
    return json.dumps({"summary": "Successes cancel ABC123; failures touch XYZ999 or stop.",
                       "siblings": siblings})
