"""Advantage estimators against hand-derived values (GRPO paper / verl core_algos formulas)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgcd_jax.losses import AdvantageBatch, AdvantageConfig, compute_advantages, get


def _batch(rewards, groups, valid=None):
    rewards = jnp.asarray(rewards, jnp.float32)
    valid = jnp.ones(rewards.shape, bool) if valid is None else jnp.asarray(valid)
    return AdvantageBatch(rewards=rewards, group_ids=jnp.asarray(groups, jnp.int32), valid=valid)


def test_grpo_golden_binary_group():
    out = compute_advantages(_batch([1, 0, 0, 1], [0, 0, 0, 0]), AdvantageConfig(eps=1e-6))
    # mean 0.5, unbiased std sqrt(1/3); 0.5 / (0.57735 + 1e-6)
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    np.testing.assert_allclose(out.advantages, [expected, -expected, -expected, expected], rtol=1e-6)
    assert abs(expected - 0.8660) < 1e-4


def test_grpo_groups_with_arbitrary_ids_and_padding():
    rewards = [1.0, 0.0, 3.0, 2.0, 0.5, 9.0, 7.0]
    groups = [1000, 1000, -7, 1000, -7, 42, 1000]  # 42 is a padded row
    valid = [True, True, True, True, True, False, True]
    out = compute_advantages(_batch(rewards, groups, valid), AdvantageConfig(eps=0.0))
    group_a = np.array([1.0, 0.0, 2.0, 7.0])
    a = (group_a - group_a.mean()) / group_a.std(ddof=1)
    group_b = np.array([3.0, 0.5])
    b = (group_b - group_b.mean()) / group_b.std(ddof=1)
    expected = [a[0], a[1], b[0], a[2], b[1], 0.0, a[3]]
    np.testing.assert_allclose(out.advantages, expected, rtol=1e-5, atol=1e-6)


def test_dr_grpo_only_centres():
    out = compute_advantages(_batch([1, 0, 0, 0], [3, 3, 3, 3]), AdvantageConfig(norm_by_std=False))
    np.testing.assert_allclose(out.advantages, [0.75, -0.25, -0.25, -0.25], rtol=1e-6)


def test_batch_std_scope_uses_std_of_all_valid_rewards():
    rewards, groups = [1.0, 0.0, 4.0, 2.0], [0, 0, 1, 1]
    out = compute_advantages(_batch(rewards, groups), AdvantageConfig(std_scope="batch", eps=0.0))
    std = np.std(rewards, ddof=1)
    np.testing.assert_allclose(out.advantages, np.array([0.5, -0.5, 1.0, -1.0]) / std, rtol=1e-5)


def test_rloo_is_leave_one_out_baseline():
    rewards = np.array([1.0, 0.0, 0.0, 2.0])
    out = compute_advantages(_batch(rewards, [5] * 4),
                             AdvantageConfig(norm_by_std=False), "rloo")
    expected = [r - (rewards.sum() - r) / 3 for r in rewards]
    np.testing.assert_allclose(out.advantages, expected, rtol=1e-6)
    loop = compute_advantages(_batch(rewards, [5] * 4),
                              AdvantageConfig(norm_by_std=False), "loop")
    np.testing.assert_array_equal(loop.advantages, out.advantages)


def test_singleton_group_gets_zero_and_warning_metric():
    out = compute_advantages(_batch([1.0, 0.3, 1.0, 0.0], [0, 1, 2, 2]), AdvantageConfig())
    assert out.advantages[0] == 0 and out.advantages[1] == 0
    assert np.all(np.isfinite(out.advantages))
    np.testing.assert_allclose(out.metrics["advantage/singleton_fraction"], 0.5)


def test_jit_matches_eager():
    batch = _batch([1, 0, 0, 1, 0.5, 0.2], [0, 0, 1, 1, 2, 2])
    cfg = AdvantageConfig()
    eager = compute_advantages(batch, cfg).advantages
    jitted = jax.jit(compute_advantages, static_argnums=1)(batch, cfg).advantages
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)


def test_unknown_estimator_lists_registered_names():
    with pytest.raises(KeyError, match="advantage/grpo"):
        compute_advantages(_batch([1.0, 0.0], [0, 0]), AdvantageConfig(), "ppo_gae")
    with pytest.raises(KeyError, match="rloo"):
        get("advantage/nope")


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_exactly_equal_rewards_get_exactly_zero_advantage_and_count_as_zero_std(estimator):
    # issue 17 row 16: 2.9 summed 7 times in float32, / 7, is one rounding step off 2.9; the old
    # mean-then-deviation path turned that into same-sign advantages up to 0.19.
    rewards = [2.9] * 7 + [0.3] * 5 + [1.0, 0.0, 0.25]
    groups = [0] * 7 + [1] * 5 + [2] * 3
    out = compute_advantages(_batch(rewards, groups), AdvantageConfig(eps=1e-6), estimator)
    adv = np.asarray(out.advantages)
    assert np.all(adv[:12] == 0.0), adv[:12]
    assert float(out.metrics["advantage/zero_std_fraction"]) == pytest.approx(12 / 15)
    # the mixed group against a float64 reference (GRPO: (r-μ)/(σ+eps); RLOO: n/(n-1)·(r-μ)/(σ+eps))
    r = np.array([1.0, 0.0, 0.25], np.float64)
    ref = (r - r.mean()) / (r.std(ddof=1) + 1e-6) * (1.5 if estimator == "rloo" else 1.0)
    np.testing.assert_allclose(adv[12:], ref, rtol=1e-6)  # float32 spread measured ~1e-7
