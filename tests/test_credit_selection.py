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


def test_fill_mixed_groups_draws_rounds_until_target_and_caps_the_batch():
    from sgcd_jax.credit.selection import fill_mixed_groups

    rounds_drawn = []
    plans = {1: {"r1a": [0, 0], "r1b": [1, 0]}, 2: {"r2a": [1, 1], "r2b": [0, 1], "r2c": [1, 0]}}

    def draw(round_index):
        rounds_drawn.append(round_index)
        return batch(plans[round_index])

    config = SelectionConfig(non_mixed="grpo")
    first = select_groups(batch({"a": [0, 0], "b": [1, 0], "c": [1, 1]}), config)  # 1 mixed of 3
    groups, trajectories, metrics = fill_mixed_groups(first, 3, 5, draw, config)
    assert rounds_drawn == [1, 2]  # stops as soon as 3 mixed groups are in (b, r1b, r2b)
    assert [g.group_id for g in groups] == ["b", "r1b", "r2b"]  # extra mixed (r2c) and non-mixed left out
    assert len(trajectories) == 2 * (3 + 2 + 3) and metrics["oversampling/filled"] == 1.0
    assert metrics["oversampling/extra_rounds"] == 2.0 and metrics["oversampling/mixed"] == 4.0

    rounds_drawn.clear()
    groups, _, metrics = fill_mixed_groups(first, 3, 1, draw, config)  # round cap: 1 extra round
    assert rounds_drawn == [1] and metrics["oversampling/filled"] == 0.0
    assert [g.group_id for g in groups] == ["b", "r1b", "a"]  # non-mixed groups only fill the free slots
    groups, _, _ = fill_mixed_groups(select_groups(batch({"a": [0, 0]}), SelectionConfig(non_mixed="drop")), 2, 0,
                                     draw, SelectionConfig(non_mixed="drop"))
    assert groups == []


def test_trainer_rollout_phase_oversamples_with_fresh_tasks_slots_and_group_ids(monkeypatch):
    """annotation.max_oversample_rounds > 0: rollout_phase draws more tasks from the stream (same size each
    round, new sampling slots, group ids that stay distinct) until every slot holds a mixed group."""
    import jax

    from sgcd_jax import config as config_lib
    from sgcd_jax.trainer import phases as train_parts
    from sgcd_jax.data.tasks import TaskStream
    from sgcd_jax.envs.base import Task

    calls = []

    def fake_rollout(model, chat, env_factory, tasks, group_size, rng, config, *, task_slots=None, mesh=None, **_):
        calls.append(([t.task_id for t in tasks], list(task_slots)))
        out = []
        for t in tasks:  # tasks whose id ends in an odd digit get one success and one failure
            rewards = [1.0, 0.0] if int(t.task_id[-1]) % 2 else [0.0, 0.0]
            out += [make_trajectory(f"{t.task_id}/run0", i, r, [[]], task_id=t.task_id) for i, r in enumerate(rewards)]
        return out

    class FakeLearner:
        mesh = None

        def local_model(self):
            return None

    monkeypatch.setattr(train_parts.integration, "rollout", fake_rollout)
    config = config_lib.from_config_dict({"rollout": {"tasks_per_iteration": 2, "group_size": 2},
                                          "annotation": {"max_oversample_rounds": 3, "name": "none"}})
    stream = TaskStream([Task(f"t{i}", "airline_lite") for i in range(10)], seed=0)
    counters = train_parts.Counters()
    rolled = train_parts.rollout_phase(0, FakeLearner(), stream, None, None, None, jax.random.key(0), config, counters)
    drawn = [ids for ids, _ in calls]
    assert len(drawn) >= 2 and all(len(ids) == 2 for ids in drawn)  # one batch size every round
    assert len({i for ids in drawn for i in ids}) == 2 * len(drawn)  # fresh tasks every round
    assert [slots for _, slots in calls][:2] == [[0, 1], [2, 3]]
    assert len(rolled.groups) == 2 and all(g.is_mixed for g in rolled.groups)
    assert len({t.group_id for t in rolled.kept}) == 2 and rolled.metrics["oversampling/filled"] == 1.0
    assert counters.episodes == 2 * 2 * len(drawn)
