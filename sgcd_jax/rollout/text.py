"""Human-readable rendering of a Trajectory (annotator prompts, reports, debugging)."""

from __future__ import annotations

import json

from sgcd_jax.rollout.trajectory import Trajectory


def _clip(text: str, limit: int) -> str:
    return text if limit <= 0 or len(text) <= limit else text[:limit] + f" …[{len(text) - limit} chars cut]"


def trajectory_to_text(traj: Trajectory, *, include_system: bool = False, max_chars_per_message: int = 2000) -> str:
    """One block per message; assistant turns are numbered with their step index (the same index as
    `traj.step_ids`), tool calls shown as name(arguments JSON), parse errors flagged."""
    lines = [f"# task {traj.task_id} · sample {traj.sample_index} · reward {traj.reward:g} · "
             f"termination {traj.termination or '?'} · {traj.num_steps} steps"]
    step_index = 0
    for message in traj.messages:
        role, content = message.get("role", "?"), str(message.get("content") or "")
        if role == "system" and not include_system:
            continue
        if role == "assistant" and step_index < len(traj.steps):
            step = traj.steps[step_index]
            lines.append(f"[assistant · step {step.index}]")
            visible = content.split("<tool_call>")[0].strip()
            if visible:
                lines.append(_clip(visible, max_chars_per_message))
            for call in step.tool_calls:
                lines.append(f"  → {call.name}({json.dumps(call.arguments, ensure_ascii=False)})")
            if step.parse_error:
                lines.append(f"  ! rejected tool call: {_clip(step.parse_error, 300)}")
            step_index += 1
        else:
            label = f"tool {message['name']}" if role == "tool" and message.get("name") else role
            lines.append(f"[{label}]")
            lines.append(_clip(content, max_chars_per_message))
    return "\n".join(lines)
