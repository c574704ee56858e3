"""Chunked vocabulary math vs full-logits references (torch float64 formulas and the naive JAX path)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sgcd_jax.losses import VocabConfig, naive_pair_stats, pair_stats, token_stats

B, T, D, V = 2, 7, 8, 33


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    student = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    teacher = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(D, V)) * 0.7, jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, size=(B, T)), jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1]], jnp.float32)  # ragged
    return student, teacher, kernel, targets, mask


def _torch_reference(student, teacher, kernel, targets, beta, temperature=1.0):
    k = torch.tensor(np.asarray(kernel), dtype=torch.float64)
    log_p = F.log_softmax(torch.tensor(np.asarray(student), dtype=torch.float64) @ k / temperature, -1)
    log_q = F.log_softmax(torch.tensor(np.asarray(teacher), dtype=torch.float64) @ k / temperature, -1)
    idx = torch.tensor(np.asarray(targets), dtype=torch.int64)[..., None]
    # TRL generalized_jsd_loss convention: m = (1−β)·student + β·teacher
    log_m = torch.logsumexp(torch.stack([log_p + np.log(1 - beta), log_q + np.log(beta)]), 0)
    kl = lambda log_a, log_b: F.kl_div(log_b, log_a, reduction="none", log_target=True).sum(-1)
    return {
        "student_logprobs": log_p.gather(-1, idx)[..., 0],
        "teacher_logprobs": log_q.gather(-1, idx)[..., 0],
        "student_entropy": -(log_p.exp() * log_p).sum(-1),
        "reverse_kl": kl(log_p, log_q),
        "forward_kl": kl(log_q, log_p),
        "jsd": beta * kl(log_q, log_m) + (1 - beta) * kl(log_p, log_m),
    }


@pytest.mark.parametrize("chunk_size", [3, 5, 64])
def test_pair_stats_match_float64_reference_with_ragged_mask(chunk_size):
    student, teacher, kernel, targets, mask = _inputs()
    cfg = VocabConfig(chunk_size=chunk_size, jsd_beta=0.3, temperature=0.8)
    got = jax.jit(pair_stats, static_argnums=4)(student, teacher, kernel, targets, cfg, mask)
    ref = _torch_reference(student, teacher, kernel, targets, beta=0.3, temperature=0.8)
    for name, expected in ref.items():
        expected = np.where(np.asarray(mask) > 0, expected.numpy(), 0.0)
        np.testing.assert_allclose(got[name], expected, rtol=2e-5, atol=2e-6, err_msg=name)


def test_token_stats_equal_pair_stats_student_side():
    student, teacher, kernel, targets, mask = _inputs(1)
    cfg = VocabConfig(chunk_size=4)
    alone = token_stats(student, kernel, targets, cfg, mask)
    pair = pair_stats(student, teacher, kernel, targets, cfg, mask)
    for name in ("student_logprobs", "student_entropy"):
        np.testing.assert_allclose(alone[name], pair[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("chunk_size", [4, 6])
def test_gradients_match_naive_full_logits(chunk_size):
    student, teacher, kernel, targets, mask = _inputs(2)
    cfg = VocabConfig(chunk_size=chunk_size)
    weights = {"student_logprobs": 1.0, "student_entropy": 0.3, "reverse_kl": 0.7, "jsd": 0.5,
               "forward_kl": 0.2}

    def objective(fn, student, kernel):
        feats = fn(student, teacher, kernel, targets, cfg, mask, tuple(weights))
        return sum(w * feats[name].sum() for name, w in weights.items())

    chunked = jax.jit(jax.grad(lambda s, k: objective(pair_stats, s, k), argnums=(0, 1)))
    naive = jax.grad(lambda s, k: objective(naive_pair_stats, s, k), argnums=(0, 1))
    for got, want in zip(chunked(student, kernel), naive(student, kernel)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # masked positions get exactly zero gradient
    grad_student = chunked(student, kernel)[0]
    assert float(jnp.abs(grad_student[0, 5:]).max()) == 0.0


def test_teacher_side_is_detached():
    student, teacher, kernel, targets, mask = _inputs(3)
    cfg = VocabConfig(chunk_size=5)
    grad = jax.grad(lambda t: pair_stats(student, t, kernel, targets, cfg, mask)["reverse_kl"].sum())
    assert float(jnp.abs(grad(teacher)).max()) == 0.0


def test_topk_with_v_minus_one_equals_full_vocabulary():
    student, teacher, kernel, targets, mask = _inputs(4)
    full = pair_stats(student, teacher, kernel, targets, VocabConfig(chunk_size=4), mask)
    topk = pair_stats(student, teacher, kernel, targets, VocabConfig(chunk_size=4, top_k=V - 1), mask)
    for name in ("reverse_kl", "forward_kl", "jsd"):
        np.testing.assert_allclose(topk[name], full[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_topk_tail_bucket_matches_hand_bucketing():
    student, teacher, kernel, targets, _ = _inputs(5)
    k = 4
    got = pair_stats(student, teacher, kernel, targets, VocabConfig(chunk_size=8, top_k=k))
    log_p = F.log_softmax(torch.tensor(np.asarray(student @ kernel), dtype=torch.float64), -1)
    log_q = F.log_softmax(torch.tensor(np.asarray(teacher @ kernel), dtype=torch.float64), -1)
    top = log_p.topk(k, -1).indices
    p_top, q_top = log_p.exp().gather(-1, top), log_q.exp().gather(-1, top)
    p = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
    q = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    np.testing.assert_allclose(got["reverse_kl"], (p * (p / q).log()).sum(-1).numpy(), rtol=1e-4,
                               atol=1e-6)


def test_chunked_never_allocates_full_fp32_logits():
    """Compiled temp memory of the chunked path (with backward) stays far below B·T·V·4 bytes."""
    b, t, d, v, chunk = 2, 1024, 32, 4096, 32
    student = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
    kernel = jax.ShapeDtypeStruct((d, v), jnp.float32)
    targets = jax.ShapeDtypeStruct((b, t), jnp.int32)
    cfg = VocabConfig(chunk_size=chunk)

    def loss(s, k, tgt):
        return pair_stats(s, s * 0.5, k, tgt, cfg, None, ("student_logprobs", "reverse_kl"))[
            "reverse_kl"].sum()

    def temp_bytes(fn):
        return fn.lower(student, kernel, targets).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = b * t * v * 4
    # a [chunk, V] block is logits_bytes / 64 here; forward keeps ~2, backward ~4 plus the kernel grad
    assert temp_bytes(jax.jit(jax.grad(loss, argnums=(0, 1)))) < logits_bytes / 8
    assert temp_bytes(jax.jit(loss)) < logits_bytes / 16


def test_bad_shapes_and_config_are_explained():
    student, teacher, kernel, targets, mask = _inputs()
    with pytest.raises(ValueError, match="align the teacher"):
        pair_stats(student, teacher[:, :3], kernel, targets, VocabConfig())
    with pytest.raises(ValueError, match="kernel must be"):
        token_stats(student, kernel.T, targets, VocabConfig())
    with pytest.raises(ValueError, match="jsd_beta"):
        VocabConfig(jsd_beta=1.0)
