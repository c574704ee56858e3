"""PPO-clip policy loss: hand-derived per-token values, KL estimators and every aggregation mode."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgcd_jax.losses import (LossOutput, PolicyBatch, PolicyLossConfig, aggregate, get, kl_penalty,
                             ppo_token_losses)

CFG = PolicyLossConfig(clip_low=0.2, clip_high=0.28, dual_clip=3.0)

# (advantage, ratio, expected per-token loss, which clip is active)
PAIRS = [
    (1.0, 1.5, -1.28, "clip_high"),   # ratio above 1+0.28 → flat at −A(1.28)
    (1.0, 0.5, -0.5, None),           # positive A, low ratio: unclipped branch is larger
    (-1.0, 0.5, 0.8, "clip_low"),     # negative A, ratio below 1−0.2 → −A(0.8)
    (-1.0, 5.0, 3.0, "clip_dual"),    # negative A, huge ratio → capped at −A·3
    (-1.0, 2.0, 2.0, None),           # below the dual cap
    (2.0, 1.1, -2.2, None),
]


def test_clip_higher_and_dual_clip_golden_per_token():
    adv = jnp.array([[a for a, _, _, _ in PAIRS]])
    ratio = jnp.array([[r for _, r, _, _ in PAIRS]])
    loss, flags = ppo_token_losses(jnp.log(ratio), jnp.zeros_like(ratio), adv, CFG)
    np.testing.assert_allclose(loss[0], [e for _, _, e, _ in PAIRS], rtol=1e-6)
    for name in ("clip_high", "clip_low", "clip_dual"):
        np.testing.assert_array_equal(flags[name][0], [c == name for _, _, _, c in PAIRS])


def test_dual_clip_off_leaves_large_negative_losses():
    cfg = PolicyLossConfig(clip_low=0.2, clip_high=0.28, dual_clip=None)
    loss, flags = ppo_token_losses(jnp.log(jnp.array([5.0])), jnp.zeros(1), jnp.array([-1.0]), cfg)
    np.testing.assert_allclose(loss, [5.0], rtol=1e-6)
    assert "clip_dual" not in flags


def test_kl_estimators_golden():
    logp, ref = jnp.log(jnp.array([0.5])), jnp.log(jnp.array([0.25]))
    d = math.log(2.0)
    np.testing.assert_allclose(kl_penalty(logp, ref, "k1"), [d], rtol=1e-6)
    np.testing.assert_allclose(kl_penalty(logp, ref, "k2"), [0.5 * d * d], rtol=1e-6)
    np.testing.assert_allclose(kl_penalty(logp, ref, "k3"), [0.5 - 1 + d], rtol=1e-5)
    # k3 of the reverse direction: ref/π = 2 → 2 − 1 − log 2
    np.testing.assert_allclose(kl_penalty(ref, logp, "k3"), [1 - d], rtol=1e-5)


def test_k3_is_clamped():
    value = kl_penalty(jnp.array([-30.0]), jnp.array([0.0]), "k3", kl_clamp=10.0)
    assert float(value[0]) == 10.0


LOSS = jnp.array([[1.0, 2.0, 3.0, 7.0], [4.0, 9.0, 9.0, 9.0], [5.0, 5.0, 5.0, 5.0]])
MASK = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize("mode, expected", [
    ("token-mean", (1 + 2 + 3 + 4) / 4),
    ("seq-mean-token-mean", ((1 + 2 + 3) / 3 + 4 / 1) / 2),
    ("seq-mean-token-sum", (6 + 4) / 2),
    ("seq-mean-token-sum-norm", (6 + 4) / (2 * 4)),
])
def test_aggregation_modes_by_hand(mode, expected):
    total, denominator = aggregate(LOSS, MASK, mode)
    np.testing.assert_allclose(total / denominator, expected, rtol=1e-6)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                  "seq-mean-token-sum-norm"])
def test_micro_batch_accumulation_is_exact(mode):
    rng = np.random.default_rng(0)
    loss = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    mask = jnp.asarray(rng.random((6, 5)) < 0.6)
    full = aggregate(loss, mask, mode, norm_length=5)
    parts = [aggregate(loss[i:i + 2], mask[i:i + 2], mode, norm_length=5) for i in (0, 2, 4)]
    accumulated = sum(p[0] for p in parts) / sum(p[1] for p in parts)
    np.testing.assert_allclose(accumulated, full[0] / full[1], rtol=1e-5)


def _batch(ratio, adv, mask=None, **extra):
    ratio = jnp.asarray(ratio, jnp.float32)
    return PolicyBatch(logprobs=jnp.log(ratio) - 1.0, old_logprobs=jnp.full(ratio.shape, -1.0),
                       advantages=jnp.asarray(adv, jnp.float32),
                       loss_mask=jnp.ones(ratio.shape) if mask is None else jnp.asarray(mask),
                       **extra)


def test_policy_loss_total_with_kl_and_entropy_bonus():
    cfg = PolicyLossConfig(kl_coef=0.1, entropy_coef=0.01, agg_mode="token-mean")
    batch = _batch([[1.5, 1.0]], [[1.0, -1.0]], ref_logprobs=jnp.array([[-1.0, -1.0]]),
                   entropy=jnp.array([[2.0, 3.0]]))
    out = get("policy_loss/ppo")(batch, cfg)
    d = math.log(1.5)
    k3 = math.exp(-d) - 1 + d
    expected = ((-1.28 + 0.1 * k3 - 0.01 * 2.0) + (1.0 + 0.0 - 0.01 * 3.0)) / 2
    np.testing.assert_allclose(out.value, expected, rtol=1e-5)
    np.testing.assert_allclose(out.metrics["policy/clip_high_fraction"], 0.5)
    assert isinstance(out, LossOutput)


def test_gradient_is_zero_on_clipped_tokens_and_minus_a_ratio_elsewhere():
    cfg = PolicyLossConfig(clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    adv = jnp.array([[1.0, 1.0, -1.0, -1.0]])
    ratio = jnp.array([[1.5, 1.1, 0.5, 5.0]])
    batch = _batch(ratio, adv)

    def loss_of(logprobs):
        return get("policy_loss/ppo")(batch.replace(logprobs=logprobs), cfg).value

    grad = jax.grad(loss_of)(batch.logprobs)
    # d(−A·r)/d log π = −A·r; token-mean divides by 4
    np.testing.assert_allclose(grad, [[0.0, -1.1 / 4, 0.0, 0.0]], rtol=1e-5, atol=1e-8)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="dual_clip"):
        PolicyLossConfig(dual_clip=0.5)
    with pytest.raises(ValueError, match="agg_mode"):
        PolicyLossConfig(agg_mode="sum")
    with pytest.raises(ValueError, match="ref_logprobs"):
        get("policy_loss/ppo")(_batch([[1.0]], [[1.0]]), PolicyLossConfig(kl_coef=0.1))
