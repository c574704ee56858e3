"""What an iteration reports about its episodes: rollout metrics and the report's token-credit samples."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from sgcd_jax.credit.localization import decisive_sample_fields, pick_mixed_pair
from sgcd_jax.credit.teacher import render_credit_text
from sgcd_jax.report import write_samples as _write_samples
from sgcd_jax.rollout.toolparse import PARSE_ERROR_KINDS
from sgcd_jax.rollout.trajectory import Trajectory


def episode_metrics(trajectories: Sequence[Trajectory], threshold: float) -> dict[str, float]:
    """Means over the episodes (NaN when there are none: an empty mean is not 0). Error counts read
    the keys the rollout engine writes: parse_errors = tool calls rejected before the env
    (toolparse.PARSE_ERROR_KINDS), tool_errors = calls the env rejected (env_tool_errors)."""
    mean = lambda values: float(np.mean(values)) if len(values) else float("nan")  # noqa: E731
    rewards = np.asarray([t.reward for t in trajectories], np.float32)
    return {"reward_mean": mean(rewards),
            "success_rate": mean(rewards >= threshold),
            "state_change_success_rate": mean([float(t.info.get("write_calls_ok", 0)) for t in trajectories]),
            "turns_mean": mean([t.num_steps for t in trajectories]),
            "response_tokens_mean": mean([t.loss_mask.sum() for t in trajectories]),
            "parse_errors": float(sum(t.metrics.get(kind, 0) for t in trajectories for kind in PARSE_ERROR_KINDS)),
            "tool_errors": float(sum(t.metrics.get("env_tool_errors", 0) for t in trajectories)),
            "user_fallbacks": float(sum(t.info.get("user_fallbacks", 0) for t in trajectories)),
            # episodes the token budget cut (rollout.max_total_tokens): reward is what the env gave so far
            "budget_cut_episodes": float(sum(t.termination == "max_tokens" for t in trajectories))}


def report_samples(trajectories: list[Trajectory], host: dict, references: dict, chat, limit: int = 2,
                   iteration: int | None = None) -> list[dict]:
    """A successful and a failed sibling of one mixed group (an annotated one first), with per-token
    weights and the env's decisive steps; [] when no group is mixed (the last mixed group stays shown)."""
    picked = pick_mixed_pair(trajectories, host["advantages"], [g for g, r in references.items() if r is not None])
    samples = []
    for row in picked[:limit]:
        traj = trajectories[row]
        ids = traj.token_ids.tolist()
        weights = np.ones(len(ids), np.float32)
        weights[1:] = host["weights"][row, :len(ids) - 1]
        reference = references.get(traj.group_id)
        start = max(traj.prompt_len - 1, 0)
        samples.append({"title": f"{traj.task_id} sibling {traj.sample_index}", "reward": float(traj.reward),
                        "advantage": float(host["advantages"][row]), "iteration": iteration,
                        "tokens": chat.token_strings(ids[start:]), "loss_mask": traj.loss_mask[start:].tolist(),
                        "weights": weights[start:].tolist(),
                        "reference": render_credit_text(reference, traj) if reference is not None else "",
                        **decisive_sample_fields(traj, start)})
    return samples


def write_samples(run_dir: str, samples: list[dict]) -> None:
    _write_samples(run_dir, samples)
