"""Sibling selection (mixed / all-success / all-fail), non-mixed policy and oversampling."""

import pytest

from helpers.credit_fixtures import make_trajectory
from sgcd_jax.credit.selection import (OversamplingConfig, OversamplingPolicy, SelectionConfig,
                                       group_siblings, select_groups)


def batch(rewards_by_group):
    return [make_trajectory(gid, i, r, [[]]) for gid, rewards in rewards_by_group.items()
            for i, r in enumerate(rewards)]


def test_counts_mixed_all_success_all_fail_and_drops_non_mixed():
    result = select_groups(batch({"a": [1, 0, 1], "b": [1, 1, 1], "c": [0, 0, 0], "d": [0, 1, 0]}),
                           SelectionConfig())
    assert [g.group_id for g in result.mixed] == ["a", "d"]
    assert (result.stats.num_all_success, result.stats.num_all_fail) == (1, 1)
    assert result.grpo == [] and {g.group_id for g in result.dropped} == {"b", "c"}
    assert result.stats.as_metrics()["selection/mixed_fraction"] == 0.5


def test_keep_as_grpo_policy_keeps_non_mixed_groups():
    result = select_groups(batch({"a": [1, 0], "b": [1, 1]}), SelectionConfig(non_mixed="grpo"))
    assert [g.group_id for g in result.grpo] == ["b"] and result.dropped == []


def test_threshold_handles_partial_rewards():
    trajs = batch({"a": [0.75, 0.5, 0.25]})
    assert not select_groups(trajs, SelectionConfig()).mixed  # nothing reaches 1.0
    mixed = select_groups(trajs, SelectionConfig(success_threshold=0.5)).mixed
    assert mixed[0].successes == [True, True, False]


def test_siblings_sorted_by_sample_index_and_invalid_groups_rejected():
    trajs = batch({"a": [1, 0, 0]})
    (group,) = group_siblings(trajs[::-1], 1.0)
    assert [t.sample_index for t in group.trajectories] == [0, 1, 2]
    other_task = make_trajectory("a", 3, 1.0, [[]], task_id="another")
    with pytest.raises(ValueError, match="mixes tasks"):
        group_siblings(trajs + [other_task], 1.0)
    with pytest.raises(ValueError, match="duplicate sample_index"):
        group_siblings(trajs + trajs[:1], 1.0)
    with pytest.raises(ValueError, match="non_mixed"):
        SelectionConfig(non_mixed="keep")


def test_oversampling_draws_more_until_target_sized_by_observed_rate():
    policy = OversamplingPolicy(OversamplingConfig(target_mixed_groups=4, max_total_tasks=40))
    assert policy.tasks_to_draw() == 4
    policy.add(select_groups(batch({"a": [1, 0], "b": [1, 1], "c": [0, 0], "d": [0, 0]}),
                             SelectionConfig()))
    assert policy.num_mixed == 1
    assert policy.tasks_to_draw() == 12  # 3 missing at an observed mixed rate of 1/4
    round2 = {f"r{i}": ([1, 0] if i < 3 else [0, 0]) for i in range(12)}
    policy.add(select_groups(batch(round2), SelectionConfig()))
    assert not policy.need_more() and policy.tasks_to_draw() == 0
    mixed, grpo = policy.batch()
    assert [g.group_id for g in mixed] == ["a", "r0", "r1", "r2"] and grpo == []
    assert policy.as_metrics()["oversampling/tasks_drawn"] == 16


def test_oversampling_respects_task_cap_and_rate_floor():
    cfg = OversamplingConfig(target_mixed_groups=2, max_total_tasks=10, min_mixed_rate=0.25)
    policy = OversamplingPolicy(cfg)
    policy.add(select_groups(batch({"a": [0, 0], "b": [0, 0]}), SelectionConfig()))
    assert policy.tasks_to_draw() == 8  # rate 0 floored to 0.25 → 8, within the 8 remaining
    policy.add(select_groups(batch({f"x{i}": [0, 0] for i in range(8)}), SelectionConfig()))
    assert policy.tasks_to_draw() == 0 and policy.as_metrics()["oversampling/filled"] == 0.0
    policy.reset()
    assert policy.tasks_to_draw() == 2


def test_oversampling_round_cap_and_config_validation():
    policy = OversamplingPolicy(OversamplingConfig(target_mixed_groups=1, max_total_tasks=99,
                                                   max_rounds=1))
    policy.add(select_groups(batch({"a": [0, 0]}), SelectionConfig()))
    assert policy.tasks_to_draw() == 0
    with pytest.raises(ValueError, match="could never fill"):
        OversamplingConfig(target_mixed_groups=5, max_total_tasks=4)
