"""pass^k / pass@k / TGC / SGC against hand-computed values, and the eval runner."""

from __future__ import annotations

import pytest

from sgcd_jax.envs import make_factory
from sgcd_jax.envs.airline_lite import oracle_actions
from sgcd_jax.envs.metrics import (evaluate, save_eval, mean_over_tasks, pass_at_k, pass_hat_k,
                                   scenario_goal_completion, task_goal_completion, appworld_scenario)


@pytest.mark.parametrize("c,n,k,hat,at", [
    (3, 5, 2, 3 / 10, 1 - 1 / 10),      # C(3,2)/C(5,2); 1 - C(2,2)/C(5,2)
    (3, 5, 1, 3 / 5, 3 / 5),            # k=1: both are c/n
    (0, 4, 2, 0.0, 0.0),
    (4, 4, 3, 1.0, 1.0),
    (2, 6, 3, 0.0, 1 - 4 / 20),         # k > c → pass^k = 0; C(4,3)/C(6,3) = 4/20
    (5, 8, 4, 5 / 70, 1.0),             # C(5,4)/C(8,4) = 5/70; n-c=3 < k → pass@k = 1
])
def test_pass_hat_k_and_pass_at_k_hand_values(c, n, k, hat, at):
    assert pass_hat_k(c, n, k) == pytest.approx(hat)
    assert pass_at_k(c, n, k) == pytest.approx(at)


def test_mean_over_tasks():
    assert mean_over_tasks(pass_hat_k, [(3, 5), (5, 5)], 2) == pytest.approx((0.3 + 1.0) / 2)


@pytest.mark.parametrize("c,n,k", [(6, 5, 1), (1, 5, 0), (1, 5, 6), (-1, 5, 1)])
def test_invalid_counts_raise(c, n, k):
    with pytest.raises(ValueError):
        pass_hat_k(c, n, k)


def test_tgc_and_sgc():
    success = {"a_1": True, "a_2": False, "b_1": True, "b_2": True, "c_1": False}
    assert task_goal_completion(success) == pytest.approx(3 / 5)
    assert scenario_goal_completion(success, appworld_scenario) == pytest.approx(1 / 3)


def _oracle_policy(env, task):
    env.reset(task)
    for action in oracle_actions(task):
        if env.step(action).done:
            return


def test_evaluate_oracle_on_airline_lite_is_perfect():
    factory = make_factory("airline_lite", difficulty="mixed", num_tasks=14, seed=0)
    rows, summary = evaluate(_oracle_policy, factory, "test", n_trials=2)
    assert len(rows) == 14 and all(r["successes"] == 2 for r in rows)
    assert summary["pass_hat_k"] == {1: 1.0, 2: 1.0} and summary["mean_reward"] == 1.0
    assert summary["write_call_success_rate"] == 1.0


def test_evaluate_counts_successes_per_trial_and_survives_crashes():
    factory = make_factory("airline_lite", difficulty="easy", num_tasks=2, seed=0)
    trial = {"n": 0}

    def flaky(env, task):  # trials: ok, crash, ok, ok, crash, ok → per task (2 ok of 3)
        trial["n"] += 1
        if trial["n"] % 3 == 2:
            raise RuntimeError("sampler exploded")
        _oracle_policy(env, task)

    rows, summary = evaluate(flaky, factory, "train", n_trials=3)
    assert [r["successes"] for r in rows] == [2, 2]
    assert summary["pass_hat_k"][2] == pytest.approx(1 / 3)  # C(2,2)/C(3,2)
    assert summary["pass_at_k"][2] == pytest.approx(1.0)
    assert summary["episode_errors"] == 2 and "sampler exploded" in rows[0]["errors"][0]


def test_save_eval_writes_jsonl_rows_and_summary(tmp_path):
    import json
    factory = make_factory("airline_lite", difficulty="easy", num_tasks=3, seed=0)
    rows, summary = evaluate(_oracle_policy, factory, "test", n_trials=1)
    rows_path, summary_path = save_eval(rows, summary, tmp_path / "eval")
    lines = rows_path.read_text().splitlines()
    assert [json.loads(line)["task_id"] for line in lines] == [r["task_id"] for r in rows]
    assert json.loads(summary_path.read_text())["pass_hat_k"] == {"1": 1.0}
