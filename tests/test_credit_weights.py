"""SGCD credit weights: bounds, mean-1 renormalisation, λ=0 ≡ GRPO, detachment, direction, presets."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sgcd_jax.losses import (CreditBatch, CreditConfig, PolicyLossConfig, SGCDBatch, SGCDLossConfig,
                             get, lam_at)

B, T = 4, 6
sgcd_credit = jax.jit(get("credit/sgcd"), static_argnums=1)

CONFIGS = [
    CreditConfig.preset("sgcd"),
    CreditConfig.preset("sgcd", renormalize=False, granularity="step", entropy_gate="soft"),
    CreditConfig.preset("sgcd", beta_pos=3.0, beta_neg=0.5, eps_low_pos=0.1, eps_high_pos=0.3,
                        eps_low_neg=0.9, eps_high_neg=4.0, eta=1.0, entropy_gate="hard",
                        granularity="step"),
    CreditConfig.preset("sgcd", granularity="action", eta=0.3),
    CreditConfig.preset("rlsd"),
]


def _batch(seed, advantages=None, mask=None):
    rng = np.random.default_rng(seed)
    adv = rng.choice([-1.2, -0.5, 0.0, 0.7, 1.5], size=B) if advantages is None else advantages
    if mask is None:
        mask = rng.random((B, T)) < 0.7
        mask[:, 0] = True
    step_ids = np.where(mask, np.repeat(np.arange(T)[None] // 2, B, 0), -1)
    return CreditBatch(
        advantages=jnp.asarray(adv, jnp.float32),
        student_logprobs=jnp.asarray(-rng.exponential(2.0, (B, T)), jnp.float32),
        teacher_logprobs=jnp.asarray(-rng.exponential(2.0, (B, T)), jnp.float32),
        loss_mask=jnp.asarray(mask, jnp.int32), step_ids=jnp.asarray(step_ids, jnp.int32),
        reverse_kl=jnp.asarray(rng.exponential(1.0, (B, T)), jnp.float32),
        entropy=jnp.asarray(rng.exponential(1.0, (B, T)), jnp.float32))


def _bounds(cfg, adv):
    positive = np.asarray(adv)[:, None] > 0
    low = np.where(positive, 1 - cfg.eps_low_pos, 1 - cfg.eps_low_neg)
    high = np.where(positive, 1 + cfg.eps_high_pos, 1 + cfg.eps_high_neg)
    return low, high


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), config_index=st.integers(0, len(CONFIGS) - 1))
def test_weights_stay_within_bounds_and_mean_one_holds_where_enabled(seed, config_index):
    cfg = CONFIGS[config_index]
    batch = _batch(seed)
    out = sgcd_credit(batch, cfg)
    w = np.asarray(out.weights)
    mask = np.asarray(batch.loss_mask) > 0
    low, high = _bounds(cfg, batch.advantages)
    counted = mask & (np.asarray(batch.advantages)[:, None] != 0)
    assert np.all(np.isfinite(w))
    assert np.all(np.where(counted, w >= low * (1 - 1e-6), True))
    assert np.all(np.where(counted, w <= high * (1 + 1e-6), True))
    assert np.all(np.where(~counted, w == 1.0, True))
    if cfg.renormalize:
        for row in range(B):
            if counted[row].any():
                np.testing.assert_allclose(w[row][counted[row]].mean(), 1.0, rtol=1e-5)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_lambda_zero_reproduces_grpo_exactly(seed):
    batch = _batch(seed)
    grpo = np.where(np.asarray(batch.loss_mask) > 0, np.asarray(batch.advantages)[:, None], 0.0)
    for cfg in (CreditConfig.preset("none"), CreditConfig.preset("sgcd", lam=0.0)):
        np.testing.assert_array_equal(sgcd_credit(batch, cfg).token_advantages, grpo)
    np.testing.assert_array_equal(get("credit/none")(batch, CreditConfig()).token_advantages, grpo)


def test_gradient_of_sgcd_policy_loss_wrt_teacher_is_exactly_zero():
    credit = _batch(7)
    rng = np.random.default_rng(7)
    logprobs = credit.student_logprobs + jnp.asarray(rng.normal(0, 0.1, (B, T)), jnp.float32)
    cfg = SGCDLossConfig(policy=PolicyLossConfig(), credit=CreditConfig.preset(
        "sgcd", entropy_gate="soft", granularity="step"))
    loss_fn = get("policy_loss/sgcd")

    def loss(logprobs, teacher_logprobs, student_logprobs, reverse_kl):
        batch = SGCDBatch(logprobs=logprobs, old_logprobs=credit.student_logprobs,
                          advantages=credit.advantages, student_logprobs=student_logprobs,
                          teacher_logprobs=teacher_logprobs, loss_mask=credit.loss_mask,
                          step_ids=credit.step_ids, reverse_kl=reverse_kl,
                          student_entropy=credit.entropy)
        return loss_fn(batch, cfg).value

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(
        logprobs, credit.teacher_logprobs, credit.student_logprobs, credit.reverse_kl)
    assert float(jnp.abs(grads[0]).max()) > 0  # the actor does learn
    for grad in grads[1:]:
        np.testing.assert_array_equal(grad, np.zeros((B, T)))


@pytest.mark.parametrize("preset", ["sgcd", "rlsd"])
def test_endorsed_token_outweighs_rejected_for_positive_advantage_and_reverse_for_negative(preset):
    # two rows (A>0, A<0), three tokens: teacher endorses, neutral, rejects the sampled token
    delta = jnp.array([[1.0, 0.0, -1.0], [1.0, 0.0, -1.0]])
    batch = CreditBatch(advantages=jnp.array([1.0, -1.0]), student_logprobs=jnp.full((2, 3), -2.0),
                        teacher_logprobs=-2.0 + delta, loss_mask=jnp.ones((2, 3), jnp.int32),
                        reverse_kl=jnp.full((2, 3), 0.3))
    w = np.asarray(get("credit/sgcd")(batch, CreditConfig.preset(preset)).weights)
    assert w[0, 0] > w[0, 1] > w[0, 2]
    assert w[1, 0] < w[1, 1] < w[1, 2]


def test_reverse_kl_term_lowers_positive_and_raises_negative_weights():
    def weights(kl):
        batch = CreditBatch(advantages=jnp.array([1.0, -1.0]), student_logprobs=jnp.zeros((2, 1)),
                            teacher_logprobs=jnp.zeros((2, 1)), loss_mask=jnp.ones((2, 1)),
                            reverse_kl=jnp.full((2, 1), kl))
        return np.asarray(get("credit/sgcd")(batch, CreditConfig(eta=0.5, renormalize=False)).weights)

    np.testing.assert_allclose(weights(1.0)[:, 0], [math.exp(-0.5), math.exp(0.5)], rtol=1e-6)


def test_rlsd_preset_golden_values():
    delta = np.array([[0.1, -0.1, 0.5, -0.5]])
    batch = CreditBatch(advantages=jnp.array([-2.0]), student_logprobs=jnp.zeros((1, 4)),
                        teacher_logprobs=jnp.asarray(delta, jnp.float32),
                        loss_mask=jnp.ones((1, 4)))
    out = get("credit/sgcd")(batch, CreditConfig.preset("rlsd", lam=0.5))
    w = np.clip(np.exp(-delta), 0.8, 1.2)
    np.testing.assert_allclose(out.weights, w, rtol=1e-6)
    np.testing.assert_allclose(out.token_advantages, -2.0 * (0.5 + 0.5 * w), rtol=1e-6)
    moved = np.abs(-2.0 * (0.5 + 0.5 * w) + 2.0).mean() / 2.0
    np.testing.assert_allclose(out.metrics["credit/credit_moved"], moved, rtol=1e-5)
    np.testing.assert_allclose(out.metrics["credit/frac_at_lower"], 0.25)
    np.testing.assert_allclose(out.metrics["credit/frac_at_upper"], 0.25)


def test_step_granularity_averages_weights_within_each_turn():
    batch = _batch(11, advantages=np.array([1.0, -1.0, 0.5, -0.3]))
    token = sgcd_credit(batch, CreditConfig(renormalize=False, eta=0.0))
    step = sgcd_credit(batch, CreditConfig(renormalize=False, eta=0.0, granularity="step"))
    mask, ids = np.asarray(batch.loss_mask) > 0, np.asarray(batch.step_ids)
    for row in range(B):
        for turn in set(ids[row][mask[row]]):
            sel = mask[row] & (ids[row] == turn)
            np.testing.assert_allclose(step.weights[row][sel], np.asarray(token.weights)[row][sel].mean(),
                                       rtol=1e-6)


def test_action_granularity_weights_each_turn_by_its_summed_log_ratio():
    """w of every token of a turn = clip(exp(β·σ·Σ_turn (δ − η·D))): the action's log-ratio as one unit."""
    batch = _batch(11, advantages=np.array([1.0, -1.0, 0.5, -0.3]))
    cfg = CreditConfig(renormalize=False, eta=0.2, beta_pos=0.7, beta_neg=1.3, granularity="action")
    w = np.asarray(sgcd_credit(batch, cfg).weights)
    mask, ids, adv = np.asarray(batch.loss_mask) > 0, np.asarray(batch.step_ids), np.asarray(batch.advantages)
    s = (np.asarray(batch.teacher_logprobs) - np.asarray(batch.student_logprobs)
         - 0.2 * np.asarray(batch.reverse_kl)) * np.sign(adv)[:, None]
    for row in range(B):
        beta, (low, high) = (0.7, (0.5, 2.0)) if adv[row] > 0 else (1.3, (0.5, 2.0))
        for turn in set(ids[row][mask[row]]):
            sel = mask[row] & (ids[row] == turn)
            np.testing.assert_allclose(w[row][sel], np.clip(np.exp(beta * s[row][sel].sum()), low, high), rtol=1e-5)
    assert np.all(w[~mask] == 1.0)


def test_action_granularity_moves_a_whole_turn_for_one_decisive_token():
    """One token of a failed turn at −8 nats (the teacher would not end the chat there): token granularity
    raises that token alone, step granularity dilutes it below a turn of small disagreements, action granularity
    gives the whole turn the most blame."""
    student = np.full((1, 10), -0.5, np.float32)
    teacher = student.copy()
    teacher[0, 1] -= 8.0  # turn 0 (tokens 0-7): one decisive token
    teacher[0, 8:] -= 0.3  # turn 1 (tokens 8-9): a small disagreement on both tokens
    batch = CreditBatch(advantages=jnp.asarray([-1.0]), student_logprobs=jnp.asarray(student),
                        teacher_logprobs=jnp.asarray(teacher), loss_mask=jnp.ones((1, 10), jnp.int32),
                        step_ids=jnp.asarray([[0] * 8 + [1] * 2], jnp.int32))
    weights = {g: np.asarray(sgcd_credit(batch, CreditConfig(renormalize=False, eta=0.0, granularity=g)).weights[0])
               for g in ("token", "step", "action")}
    assert weights["token"][0] == weights["token"][2] == 1.0 < weights["token"][8]  # the decisive turn's other tokens
    assert weights["step"][0] < weights["step"][8]  # (2 + 7·1)/8 = 1.125 < e^0.3 = 1.35: diluted
    np.testing.assert_allclose(weights["action"][:8], 2.0)  # clip(e^8) = 1 + eps_high for the whole turn
    np.testing.assert_allclose(weights["action"][8:], math.exp(0.6), rtol=1e-5)


def test_hard_entropy_gate_keeps_confident_tokens_at_one():
    batch = _batch(5, advantages=np.array([1.0, -1.0, 2.0, -0.5]))
    cfg = CreditConfig(renormalize=False, entropy_gate="hard", entropy_threshold=1.0)
    w = np.asarray(sgcd_credit(batch, cfg).weights)
    confident = np.asarray(batch.entropy) < 1.0
    assert np.all(w[confident] == 1.0)
    assert np.any(w[~confident & (np.asarray(batch.loss_mask) > 0)] != 1.0)


def test_lambda_schedules():
    linear = CreditConfig(lam=1.0, lam_final=0.2, lam_schedule="linear", lam_decay_steps=100)
    cosine = CreditConfig(lam=1.0, lam_final=0.2, lam_schedule="cosine", lam_decay_steps=100)
    np.testing.assert_allclose([lam_at(s, linear) for s in (0, 25, 50, 100, 500)],
                               [1.0, 0.8, 0.6, 0.2, 0.2], rtol=1e-6)
    expected = [0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * s / 100)) for s in (0, 25, 50, 100)]
    np.testing.assert_allclose([lam_at(s, cosine) for s in (0, 25, 50, 100)], expected, rtol=1e-6)
    assert float(lam_at(10_000, CreditConfig(lam=0.7))) == pytest.approx(0.7)


def test_unknown_preset_and_bad_bounds_are_explained():
    with pytest.raises(KeyError, match="rlsd"):
        CreditConfig.preset("sdpo")
    with pytest.raises(ValueError, match="eps_low_pos"):
        CreditConfig(eps_low_pos=1.0)
    with pytest.raises(ValueError, match="reverse_kl"):
        get("credit/sgcd")(_batch(0).replace(reverse_kl=None), CreditConfig(eta=0.1))


def test_metrics_are_nan_not_zero_when_no_token_is_counted():
    # a batch whose groups all share one reward: every advantage 0, no weight matters
    shape = (3, 5)
    batch = CreditBatch(advantages=jnp.zeros(3), student_logprobs=jnp.full(shape, -1.0),
                        teacher_logprobs=jnp.full(shape, -0.5), loss_mask=jnp.ones(shape),
                        reverse_kl=jnp.zeros(shape))
    metrics = sgcd_credit(batch, CreditConfig()).metrics
    for key in ("credit/weight_mean", "credit/weight_min", "credit/frac_at_upper", "credit/credit_moved"):
        assert np.isnan(float(metrics[key])), key
    counted = batch.replace(advantages=jnp.array([1.0, 0.0, -1.0]))
    assert abs(float(sgcd_credit(counted, CreditConfig()).metrics["credit/weight_mean"]) - 1.0) < 1e-4
