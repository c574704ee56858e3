"""SDPO-style self-distillation loss: sampled-token surrogate and full-distribution mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgcd_jax.losses import DistillBatch, DistillConfig, VocabConfig, get, naive_pair_stats, pair_stats

sdpo = get("aux_loss/sdpo")


def _sampled(ratio, delta):
    ratio, delta = jnp.asarray(ratio, jnp.float32), jnp.asarray(delta, jnp.float32)
    old = jnp.full(ratio.shape, -1.5)
    return DistillBatch(loss_mask=jnp.ones(ratio.shape), logprobs=old + jnp.log(ratio),
                        old_logprobs=old, teacher_logprobs=old + delta)


def test_sampled_mode_golden_values_and_coef():
    # δ>0 ratio 1.5 → clipped at 1.2; δ<0 ratio 0.5 → clipped at 0.8; δ>0 ratio 1 → −δ
    batch = _sampled([[1.5, 0.5, 1.0]], [[0.4, -0.6, 0.2]])
    out = sdpo(batch, DistillConfig(mode="sampled", ratio_clip=0.2, coef=0.5))
    expected = 0.5 * (-0.4 * 1.2 + 0.6 * 0.8 - 0.2) / 3
    np.testing.assert_allclose(out.value, expected, rtol=1e-6)
    np.testing.assert_allclose(out.metrics["distill/clip_fraction"], 2 / 3, rtol=1e-6)


def test_sampled_mode_gradient_is_minus_teacher_log_ratio_at_ratio_one():
    delta = jnp.array([[0.4, -0.6, 0.0, 1.0]])
    batch = _sampled(jnp.ones((1, 4)), delta)
    grad = jax.jit(jax.grad(lambda lp: sdpo(batch.replace(logprobs=lp), DistillConfig()).value))(
        batch.logprobs)
    np.testing.assert_allclose(grad, -delta / 4, rtol=1e-6)
    teacher_grad = jax.jit(jax.grad(
        lambda t: sdpo(batch.replace(teacher_logprobs=t), DistillConfig()).value))
    assert float(jnp.abs(teacher_grad(batch.teacher_logprobs)).max()) == 0.0


def test_full_mode_minimises_chunked_reverse_kl_with_gradient_to_student():
    rng = np.random.default_rng(0)
    student = jnp.asarray(rng.normal(size=(2, 5, 4)), jnp.float32)
    teacher = jnp.asarray(rng.normal(size=(2, 5, 4)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(4, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (2, 5)), jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.float32)
    cfg = DistillConfig(mode="full", coef=2.0, agg_mode="seq-mean-token-mean")

    def loss(stats_fn, hidden):
        stats = stats_fn(hidden, teacher, kernel, targets, VocabConfig(chunk_size=3), mask,
                         ("reverse_kl",))
        return sdpo(DistillBatch(loss_mask=mask, divergence=stats["reverse_kl"]), cfg).value

    kl = naive_pair_stats(student, teacher, kernel, targets, VocabConfig(), mask)["reverse_kl"]
    expected = 2.0 * (kl[0, :3].mean() + kl[1].mean()) / 2
    chunked = jax.jit(jax.value_and_grad(lambda h: loss(pair_stats, h)))
    naive = jax.jit(jax.grad(lambda h: loss(naive_pair_stats, h)))
    value, grad = chunked(student)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    np.testing.assert_allclose(grad, naive(student), rtol=1e-5, atol=1e-7)


def test_missing_inputs_are_named():
    with pytest.raises(ValueError, match="divergence"):
        sdpo(DistillBatch(loss_mask=jnp.ones((1, 2))), DistillConfig(mode="full"))
    with pytest.raises(ValueError, match="teacher_logprobs"):
        sdpo(DistillBatch(loss_mask=jnp.ones((1, 2)), logprobs=jnp.zeros((1, 2)),
                          old_logprobs=jnp.zeros((1, 2))), DistillConfig())
