"""The versioned annotation prompt and the canonical, hashable view of a sibling group.

The prompt shows the task, every sibling as numbered steps (assistant text, tool calls,
observations), its outcome and what the verifier reported, and asks for the ``CreditReference``
JSON. Over the token budget, observations are shortened first, then assistant prose; tool calls
are never cut (they are what the verdicts are about).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from sgcd_jax.credit.selection import SiblingGroup
from sgcd_jax.envs.base import ToolCall
from sgcd_jax.rollout.trajectory import Trajectory

PROMPT_VERSION = "sgcd-credit-v2"  # v2: success_action per step

_INSTRUCTIONS = """You are grading an AI agent's attempts at one customer-service task. Several \
independent attempts ("siblings") were made; the verifier marked some SUCCESS and some FAILURE. \
The verifier checks the final database state (the exact write actions taken) and that required \
information was communicated to the user.

For EVERY sibling and EVERY step (assistant turn), give a verdict:
- decisive: the step that made the task succeed (e.g. the correct write action)
- helpful: needed groundwork (correct lookups, confirmations) shared with successful siblings
- neutral: no effect on what the verifier checks
- harmful: a wrong lookup, argument or claim that moved the attempt toward failure
- fatal: the step that sealed the failure (e.g. a wrong irreversible write, or stopping early)
and a one-sentence reason tied to what the verifier checks. Where a harmful or fatal step of a \
failed sibling did something a successful sibling did differently, give that successful sibling's \
action at that point as success_action (its tool call or reply, verbatim, at most 200 characters); \
for a successful sibling's decisive step, its own action; otherwise an empty string. Then write a \
short summary of what separates the successful siblings from the failed ones.

Reply with JSON only: {"summary": str, "siblings": [{"sample_index": int, "steps": \
[{"step": int, "verdict": str, "reason": str, "success_action": str}]}]}"""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptConfig:
    """Budgets in characters except ``max_prompt_tokens``. ``count_tokens`` defaults to
    chars/4, a safe over-estimate for English + JSON on Gemini tokenizers."""

    max_prompt_tokens: int = 24_000
    max_observation_chars: int = 1_500
    max_assistant_text_chars: int = 600
    max_system_chars: int = 6_000
    max_verifier_info_chars: int = 800
    min_observation_chars: int = 0


def estimate_tokens(text: str) -> int:
    return (len(text) + 3) // 4


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    if limit <= 0:
        return f"[{len(text)} chars omitted]"
    return text[:limit] + f" …[{len(text) - limit} chars omitted]"


def format_call(call: ToolCall) -> str:
    return f"{call.name}({json.dumps(call.arguments, sort_keys=True, ensure_ascii=False)})"


def _observation_text(obs: dict[str, Any]) -> str:
    content = obs.get("content", obs)
    body = content if isinstance(content, str) else json.dumps(content, sort_keys=True, default=str)
    return f"{obs.get('role', 'tool')}: {body}"


def task_messages(traj: Trajectory) -> list[dict[str, Any]]:
    """The shared prompt messages: everything before the first assistant message."""
    out = []
    for msg in traj.messages:
        if msg.get("role") == "assistant":
            break
        out.append(msg)
    return out


def render_sibling(traj: Trajectory, success: bool, obs_chars: int, text_chars: int,
                    info_chars: int) -> str:
    outcome = "SUCCESS" if success else "FAILURE"
    lines = [f"### Sibling sample_index={traj.sample_index}: {outcome} (reward {traj.reward:.2f}, "
             f"ended by {traj.termination or 'unknown'})"]
    for step in traj.steps:
        lines.append(f"Step {step.index}:")
        if step.text.strip():
            lines.append(f"  assistant: {_clip(step.text.strip(), text_chars)}")
        for call in step.tool_calls:
            lines.append(f"  call: {format_call(call)}")
        if step.parse_error:
            lines.append(f"  parse error: {step.parse_error}")
        for obs in step.observations:
            lines.append(f"  -> {_clip(_observation_text(obs), obs_chars)}")
    if traj.info:
        info = json.dumps(traj.info, sort_keys=True, default=str)
        lines.append(f"Verifier report: {_clip(info, info_chars)}")
    return "\n".join(lines)


@dataclasses.dataclass
class RenderedPrompt:
    text: str
    estimated_tokens: int
    observation_chars: int  # the per-observation budget that was finally used
    over_budget: bool  # true when even call-only rendering exceeds the budget


def render_annotation_prompt(group: SiblingGroup, config: PromptConfig = PromptConfig(),
                             count_tokens: Callable[[str], int] = estimate_tokens) -> RenderedPrompt:
    """Render the prompt, halving observation then assistant-text budgets until it fits."""
    head_msgs = task_messages(group.trajectories[0])
    task_lines = []
    for msg in head_msgs:
        limit = config.max_system_chars if msg.get("role") == "system" else 10 ** 9
        task_lines.append(f"[{msg.get('role')}] {_clip(str(msg.get('content', '')), limit)}")
    head = f"{_INSTRUCTIONS}\n\n## Task {group.task_id}\n" + "\n".join(task_lines)

    obs_chars, text_chars = config.max_observation_chars, config.max_assistant_text_chars
    while True:
        body = "\n\n".join(
            render_sibling(t, ok, obs_chars, text_chars, config.max_verifier_info_chars)
            for t, ok in zip(group.trajectories, group.successes))
        text = f"{head}\n\n## Siblings\n{body}\n"
        tokens = count_tokens(text)
        if tokens <= config.max_prompt_tokens:
            return RenderedPrompt(text, tokens, obs_chars, over_budget=False)
        if obs_chars > config.min_observation_chars:
            obs_chars = max(config.min_observation_chars, obs_chars // 2 if obs_chars > 16 else 0)
        elif text_chars > 0:
            text_chars = text_chars // 2 if text_chars > 16 else 0
        else:
            return RenderedPrompt(text, tokens, obs_chars, over_budget=True)


def canonical_group_input(group: SiblingGroup) -> dict[str, Any]:
    """Everything an annotator may look at, as plain JSON types, in a fixed order: the cache key."""
    first = group.trajectories[0]
    return {
        "task_id": group.task_id,
        "task_messages": json.loads(json.dumps(task_messages(first), sort_keys=True, default=str)),
        "siblings": [{
            "sample_index": t.sample_index,
            "success": ok,
            "reward": round(float(t.reward), 6),
            "termination": t.termination,
            "info": json.loads(json.dumps(t.info, sort_keys=True, default=str)),
            "steps": [{"text": s.text, "parse_error": s.parse_error,
                       "calls": [[c.name, c.arguments] for c in s.tool_calls],
                       "observations": s.observations} for s in t.steps],
        } for t, ok in zip(group.trajectories, group.successes)],
    }
