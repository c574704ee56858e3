"""Training metrics read what the rollout engine writes (a rejected tool call is a parse error, an
env-rejected call a tool error) and an empty mean is NaN, never a silent 0."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from sgcd_jax.envs.base import EnvStep, Task
from sgcd_jax.losses import get
from sgcd_jax.losses.credit import CreditBatch, CreditConfig
from sgcd_jax.rollout.engine import RolloutConfig, RolloutEngine
from sgcd_jax.trainer.episode_summary import episode_metrics
from tests.test_rollout import Factory, ScriptedPolicy, WeatherEnv, renderer, scripted_turns  # noqa: F401


class RejectingEnv(WeatherEnv):
    """The env rejects every tool call it receives (as an unknown flight would be)."""

    def step(self, action):
        if action.tool_calls:
            self.steps += 1
            return EnvStep([{"role": "tool", "name": c.name, "content": "Error: no such city"}
                            for c in action.tool_calls], tool_errors=len(action.tool_calls))
        return super().step(action)


class RejectingFactory(Factory):
    def make(self):
        return RejectingEnv()


def test_parse_and_tool_errors_count_what_the_engine_writes(renderer):  # noqa: F811
    # turn 1: a valid call (the env rejects it), turn 2: arguments of the wrong type (rejected by the
    # parser before the env), turn 3: the answer.
    engine = RolloutEngine(ScriptedPolicy(scripted_turns(renderer)), renderer, RolloutConfig(max_turns=5))
    trajectories = engine.run([Task("t0", "weather"), Task("t1", "weather")], RejectingFactory(), group_size=1,
                              rng=jax.random.key(0))
    assert all(t.steps[1].parse_error for t in trajectories)
    metrics = episode_metrics(trajectories, threshold=1.0)
    assert metrics["parse_errors"] == 2.0 and metrics["tool_errors"] == 2.0
    clean = engine.run([Task("t0", "weather")], Factory(), group_size=1, rng=jax.random.key(0))
    assert episode_metrics(clean, threshold=1.0)["tool_errors"] == 0.0


def test_empty_means_are_nan_not_zero():
    metrics = episode_metrics([], threshold=1.0)
    assert math.isnan(metrics["reward_mean"]) and math.isnan(metrics["success_rate"])
    assert metrics["parse_errors"] == 0.0  # a count of nothing is 0
    zero = CreditBatch(advantages=jnp.zeros(2), student_logprobs=jnp.zeros((2, 4)),
                       teacher_logprobs=jnp.full((2, 4), -0.3), loss_mask=jnp.ones((2, 4)))
    for name in ("credit/sgcd", "credit/none"):
        out = get(name)(zero, CreditConfig(eta=0.0))
        for key in ("credit/weight_mean", "credit/weight_min", "credit/frac_at_upper", "credit/credit_moved"):
            assert np.isnan(float(out.metrics[key])), (name, key)
    some = CreditBatch(advantages=jnp.asarray([1.0, 0.0]), student_logprobs=zero.student_logprobs,
                    teacher_logprobs=zero.teacher_logprobs, loss_mask=zero.loss_mask)
    out = get("credit/none")(some, CreditConfig(eta=0.0))
    assert float(out.metrics["credit/weight_mean"]) == 1.0
