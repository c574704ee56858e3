"""Credit-localization metric: AUROC of credit weights against the env's decisive steps."""

from __future__ import annotations

import numpy as np

from sgcd_jax.credit.localization import auroc, decisive_steps, localization_metrics
from sgcd_jax.envs.base import ToolCall
from sgcd_jax.rollout.trajectory import Step


def _pairwise_auroc(scores, labels):  # independent reference: count ordered pairs
    pos, neg = scores[labels], scores[~labels]
    return (np.sum(pos[:, None] > neg[None, :]) + 0.5 * np.sum(pos[:, None] == neg[None, :])) / (len(pos) * len(neg))


def test_auroc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 5, 40).astype(float)  # many ties
        labels = rng.random(40) < 0.3
        if labels.all() or not labels.any():
            continue
        assert abs(auroc(scores, labels) - _pairwise_auroc(scores, labels)) < 1e-12


def _batch(rows=64, length=30, steps=3, seed=0):
    rng = np.random.default_rng(seed)
    step_ids = np.repeat(np.arange(steps), length // steps)[None].repeat(rows, 0)
    loss_mask = np.ones((rows, length), np.int32)
    loss_mask[:, ::4] = 0  # observation tokens between turns
    step_ids = np.where(loss_mask > 0, step_ids, -1)
    decisive = [{int(rng.integers(steps))} for _ in range(rows)]
    advantages = np.where(np.arange(rows) % 2 == 0, 1.0, -1.0)
    return loss_mask, step_ids, advantages, decisive


def test_constant_weights_score_exactly_one_half():
    loss_mask, step_ids, advantages, decisive = _batch()
    out = localization_metrics(np.ones(loss_mask.shape), loss_mask, step_ids, advantages, decisive)
    assert out["credit/localization_auroc"] == 0.5
    assert out["credit/weight_decisive"] == out["credit/weight_other"] == 1.0


def test_random_weights_score_one_half():
    loss_mask, step_ids, advantages, decisive = _batch(rows=400)
    weights = np.random.default_rng(1).uniform(0.5, 2.0, loss_mask.shape)
    out = localization_metrics(weights, loss_mask, step_ids, advantages, decisive)
    # 400 rows × 22 loss tokens: the mean of per-row AUROCs has std ≈ 0.3/sqrt(400) = 0.015; measured
    # over weight seeds 0-9: 0.493-0.515. 0.04 is > 2.5 std.
    assert abs(out["credit/localization_auroc"] - 0.5) < 0.04


def test_perfect_weights_score_one_and_inverted_score_zero():
    loss_mask, step_ids, advantages, decisive = _batch()
    on = np.stack([np.isin(step_ids[r], list(d)) for r, d in enumerate(decisive)])
    perfect = np.where(on, 1.8, 0.7)
    out = localization_metrics(perfect, loss_mask, step_ids, advantages, decisive)
    assert out["credit/localization_auroc"] == 1.0
    assert abs(out["credit/weight_decisive"] - 1.8) < 1e-12 and abs(out["credit/weight_other"] - 0.7) < 1e-12
    assert localization_metrics(2.5 - perfect, loss_mask, step_ids, advantages, decisive)[
        "credit/localization_auroc"] == 0.0


def test_step_auroc_credits_a_decisive_step_moved_only_at_its_choice_token():
    """A teacher that moves only the token where the attempt chose (the first of the decisive step): the
    token AUROC is ½ + ½·(1 / decisive tokens); the step AUROC (steps scored by mean weight) is 1."""
    loss_mask, step_ids, advantages, decisive = _batch()
    weights = np.ones(loss_mask.shape)
    for row, steps in enumerate(decisive):
        first = np.flatnonzero(np.isin(step_ids[row], list(steps)))[0]
        weights[row, first] = 1.9
    out = localization_metrics(weights, loss_mask, step_ids, advantages, decisive)
    per_row = [0.5 + 0.5 / np.isin(step_ids[r], list(d)).sum() for r, d in enumerate(decisive)]
    assert abs(out["credit/localization_auroc"] - np.mean(per_row)) < 1e-12 and out["credit/localization_auroc"] < 0.6
    assert out["credit/localization_auroc_step"] == 1.0
    constant = localization_metrics(np.ones(loss_mask.shape), loss_mask, step_ids, advantages, decisive)
    assert constant["credit/localization_auroc_step"] == 0.5


def test_rows_without_truth_or_advantage_or_padding_are_skipped():
    loss_mask, step_ids, advantages, decisive = _batch(rows=4)
    weights = np.ones(loss_mask.shape)
    advantages = np.array([0.0, 1.0, -1.0, 1.0])  # row 0: non-mixed group
    decisive = [decisive[0], None, set(), decisive[3]]  # rows 1, 2: no ground truth
    weights[3] = np.where(np.isin(step_ids[3], list(decisive[3])), 2.0, 0.5)
    out = localization_metrics(weights, loss_mask, step_ids, advantages, decisive)
    assert out["credit/localization_rows"] == 1.0 and out["credit/localization_auroc"] == 1.0
    assert localization_metrics(weights, loss_mask, step_ids, np.zeros(4), decisive) == {}  # nothing mixed


def test_log_ratio_means_split_by_decisive_tokens():
    loss_mask, step_ids, advantages, decisive = _batch(rows=8)
    on = np.stack([np.isin(step_ids[r], list(d)) for r, d in enumerate(decisive)])
    out = localization_metrics(np.ones(loss_mask.shape), loss_mask, step_ids, advantages, decisive,
                               log_ratio=np.where(on, -3.0, 0.25))
    assert out["teacher/log_ratio_decisive"] == -3.0 and out["teacher/log_ratio_other"] == 0.25


def test_env_turns_map_to_steps_skipping_turns_that_never_reached_the_env():
    call = ToolCall("get_user_details", {"user_id": "u1"})
    steps = [Step(0, "bad", [], [], parse_error="unparsable tool call"),  # never sent to the env
             Step(1, "", [call], []), Step(2, "done", [], [])]
    info = {"credit_truth": {"decisive": [{"turn": 1, "kind": "reply_missing_info", "detail": ""}], "num_turns": 2}}
    assert decisive_steps(info, steps) == {2}
    cut = {"credit_truth": {"decisive": [{"turn": 1, "kind": "missing_call", "detail": ""}], "num_turns": 1}}
    assert decisive_steps(cut, steps[:2] + [Step(2, "trunc", [], [], parse_error="cut")]) == {2}
    assert decisive_steps({}, steps) is None


def test_report_pair_is_a_success_and_a_failure_of_one_mixed_group_preferring_annotated():
    from types import SimpleNamespace

    from sgcd_jax.credit.localization import pick_mixed_pair

    rows = [SimpleNamespace(group_id=g) for g in ("a", "a", "b", "b", "b", "c", "c")]
    advantages = np.array([0.0, 0.0, -1.0, 1.0, -1.0, 1.0, -1.0])  # group a is not mixed
    assert pick_mixed_pair(rows, advantages) == [3, 2]
    assert pick_mixed_pair(rows, advantages, preferred_groups=["c"]) == [5, 6]
    assert pick_mixed_pair(rows[:2], advantages[:2]) == []
