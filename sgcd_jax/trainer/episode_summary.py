"""What an iteration reports about its episodes: rollout metrics and the report's token-credit samples."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from sgcd_jax.credit.teacher import render_credit_text
from sgcd_jax.report import write_samples as _write_samples
from sgcd_jax.rollout.trajectory import Trajectory


def episode_metrics(trajectories: Sequence[Trajectory], threshold: float) -> dict[str, float]:
    rewards = np.asarray([t.reward for t in trajectories], np.float32)
    state_changes = [float(t.info.get("write_calls_ok", 0)) for t in trajectories]  # successful state-changing calls
    return {"reward_mean": float(rewards.mean()) if len(rewards) else 0.0,
            "success_rate": float((rewards >= threshold).mean()) if len(rewards) else 0.0,
            "state_change_success_rate": float(np.mean(state_changes)) if state_changes else 0.0,
            "turns_mean": float(np.mean([t.num_steps for t in trajectories])) if trajectories else 0.0,
            "response_tokens_mean": float(np.mean([t.loss_mask.sum() for t in trajectories])) if trajectories else 0.0,
            "parse_errors": float(sum(t.metrics.get("parse_errors", 0) for t in trajectories)),
            "tool_errors": float(sum(t.metrics.get("tool_errors", 0) for t in trajectories))}


def report_samples(trajectories: list[Trajectory], host: dict, references: dict, chat, limit: int = 2) -> list[dict]:
    """A failed and a successful sibling of one annotated group, with per-token weights."""
    picked = []
    for group_id, reference in references.items():
        if reference is None:
            continue
        rows = [i for i, t in enumerate(trajectories) if t.group_id == group_id]
        picked = rows[:limit]
        break
    if not picked:
        picked = list(range(min(limit, len(trajectories))))
    samples = []
    for row in picked:
        traj = trajectories[row]
        ids = traj.token_ids.tolist()
        weights = np.ones(len(ids), np.float32)
        weights[1:] = host["weights"][row, :len(ids) - 1]
        reference = references.get(traj.group_id)
        start = max(traj.prompt_len - 1, 0)
        samples.append({"title": f"{traj.task_id} sibling {traj.sample_index}", "reward": float(traj.reward),
                        "advantage": float(host["advantages"][row]),
                        "tokens": chat.token_strings(ids[start:]), "loss_mask": traj.loss_mask[start:].tolist(),
                        "weights": weights[start:].tolist(),
                        "reference": render_credit_text(reference, traj) if reference is not None else ""})
    return samples


def write_samples(run_dir: str, samples: list[dict]) -> None:
    _write_samples(run_dir, samples)
