"""Credit localization: do the credit weights single out the steps that decided the outcome?

Ground truth comes from the env's verifier (``info["credit_truth"]``, ``sgcd_jax.envs.credit_truth``):
for a failed episode the steps that made it fail, for a successful one the step that delivered the
outcome. The score of a loss token is its credit weight w: w multiplies the signed sequence
advantage, so w > 1 is more blame on a failed sibling and more endorsement on a successful one, and
in both cases a good credit assignment puts high w on the decisive step.

Per trajectory with a nonzero advantage (a mixed group) whose loss tokens include decisive and other
ones: AUROC(w, token is decisive) = P(w_decisive > w_other) + ½ P(tie) (Mann–Whitney U / n₊n₋).
Logged: its mean over those trajectories, and the mean weight over all their decisive / other tokens
(optionally the teacher/student log-ratio likewise). A constant weighting scores exactly 0.5.
``credit/localization_auroc_step`` scores each step by its mean weight instead: a token-level teacher
moves the one token where the attempt chose (``###STOP###`` instead of the answer), not the end-of-turn
token it implies, so the token AUROC of a perfectly read reference stays near ½ + ½·(choice tokens /
decisive tokens), while the step AUROC asks whether the decisive step as a whole got the most weight.
Host-side numpy on the credit step's outputs: nothing here is traced.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def decisive_steps(info: dict[str, Any], steps: Sequence[Any]) -> set[int] | None:
    """Assistant step indices (``Trajectory.step_ids`` values) of the decisive turns, or None when the
    env reports no ground truth. ``steps``: the trajectory's ``Step`` list. The env counts only the
    turns it received; a turn whose tool call failed to parse (and had no valid call) never reached
    it, so env turn k is the k-th step that did."""
    truth = info.get("credit_truth")
    if not truth:
        return None
    sent = [s.index for s in steps if s.tool_calls or not s.parse_error]
    out = set()
    for item in truth.get("decisive", []):
        turn = int(item["turn"])
        if turn < len(sent):
            out.add(sent[turn])
        elif sent and sent[-1] + 1 < len(steps):  # the turn after the env's last one: cut before it acted
            out.add(sent[-1] + 1)
        elif not sent and steps:
            out.add(steps[0].index)
    return out


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC of ``scores`` for binary ``labels`` with ties counted ½ (midrank Mann–Whitney U);
    NaN when either class is empty."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels, bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)  # 1-based rank of each distinct value's last member
    midranks = (upper - (counts - 1) / 2.0)[inverse]
    u = midranks[labels].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def localization_metrics(weights: np.ndarray, loss_mask: np.ndarray, step_ids: np.ndarray,
                         advantages: np.ndarray, decisive: Sequence[set[int] | None],
                         log_ratio: np.ndarray | None = None) -> dict[str, float]:
    """``credit/localization_auroc``, ``credit/weight_decisive``, ``credit/weight_other`` (and
    ``teacher/log_ratio_decisive`` / ``_other`` with ``log_ratio``) over the rows of ``decisive``.

    Arrays are [rows, T] aligned with each other (rows past ``len(decisive)`` are padding and
    ignored); ``advantages`` [rows]. Empty dict when no row qualifies, so iterations without a mixed
    group log nothing rather than a fake value."""
    aurocs, step_aurocs, on, off, ratio_on, ratio_off = [], [], [], [], [], []
    for row, steps in enumerate(decisive):
        if not steps or advantages[row] == 0:
            continue
        mask = loss_mask[row] > 0
        label = np.isin(step_ids[row], list(steps)) & mask
        if not label.any() or not (mask & ~label).any():
            continue
        aurocs.append(auroc(weights[row][mask], label[mask]))
        # step level: each step's mean weight as the score (a step's choice token and the tokens it
        # determines count once, as the step), for steps with loss tokens
        present = np.unique(step_ids[row][mask])
        step_means = np.array([weights[row][mask & (step_ids[row] == s)].mean() for s in present])
        step_aurocs.append(auroc(step_means, np.isin(present, list(steps))))
        on.append(weights[row][label])
        off.append(weights[row][mask & ~label])
        if log_ratio is not None:
            ratio_on.append(log_ratio[row][label])
            ratio_off.append(log_ratio[row][mask & ~label])
    if not aurocs:
        return {}
    out = {"credit/localization_auroc": float(np.mean(aurocs)),
           "credit/localization_auroc_step": float(np.mean(step_aurocs)),
           "credit/weight_decisive": float(np.concatenate(on).mean()),
           "credit/weight_other": float(np.concatenate(off).mean()),
           "credit/localization_rows": float(len(aurocs))}
    if log_ratio is not None:
        out["teacher/log_ratio_decisive"] = float(np.concatenate(ratio_on).mean())
        out["teacher/log_ratio_other"] = float(np.concatenate(ratio_off).mean())
    return out


def decisive_step_lists(trajectories: Sequence[Any]) -> list[list[int] | None]:
    """Per trajectory, its decisive steps as a sorted list (JSON for the rollout store's attrs)."""
    return [None if (s := decisive_steps(t.info, t.steps)) is None else sorted(s) for t in trajectories]


def stored_localization(weights: np.ndarray, loss_mask: np.ndarray, step_ids: np.ndarray, advantages: np.ndarray,
                        attrs: dict[str, Any]) -> dict[str, float]:
    """``localization_metrics`` for one rollout-store segment (``rescore``); {} for a run stored
    before the trainer recorded ``decisive_steps``."""
    lists = attrs.get("decisive_steps")
    if lists is None:
        return {}
    return localization_metrics(weights, loss_mask, step_ids, advantages,
                                [None if s is None else set(s) for s in lists])


def pick_mixed_pair(trajectories: Sequence[Any], advantages: np.ndarray,
                    preferred_groups: Sequence[str] = ()) -> list[int]:
    """Rows [success, failure] of one group with a positive and a negative advantage, trying the
    ``preferred_groups`` (e.g. annotated ones) first; [] when no group is mixed (report heatmaps)."""
    by_group: dict[str, list[int]] = {}
    for row, traj in enumerate(trajectories):
        by_group.setdefault(traj.group_id, []).append(row)
    order = [g for g in preferred_groups if g in by_group] + [g for g in by_group if g not in preferred_groups]
    for group in order:
        rows = by_group[group]
        success = next((r for r in rows if advantages[r] > 0), None)
        failure = next((r for r in rows if advantages[r] < 0), None)
        if success is not None and failure is not None:
            return [success, failure]
    return []


def decisive_sample_fields(traj: Any, start: int = 0) -> dict[str, Any]:
    """Report-sample fields: per-token 0/1 ``decisive`` from token ``start`` on and a one-line ``truth``."""
    steps = decisive_steps(traj.info, traj.steps)
    if steps is None:
        return {}
    truth = (traj.info.get("credit_truth") or {}).get("decisive", [])
    flags = np.isin(np.asarray(traj.step_ids)[start:], sorted(steps)).astype(int).tolist()
    return {"decisive": flags, "truth": "; ".join(f"env turn {d['turn']}: {d['kind']} ({d['detail']})" for d in truth)}


def trajectory_localization(trajectories: Sequence[Any], host: dict[str, np.ndarray]) -> dict[str, float]:
    """``localization_metrics`` for the trainer's scored rows (``score_and_update``'s host arrays)."""
    decisive = [decisive_steps(t.info, t.steps) for t in trajectories]
    return localization_metrics(host["weights"], host["target_mask"], host["step_ids"], host["advantages"],
                                decisive, host.get("log_ratio"))
