"""Chunked vocabulary math straight from hidden states and the LM head — never a [B, T, V] fp32 tensor.

Alignment: ``hidden[b, t]`` is the state whose next-token distribution scores ``targets[b, t]``
(callers shift: ``hidden[:, :-1]`` with ``tokens[:, 1:]``). For student/teacher divergences the two
hidden arrays are aligned on the same response positions (the teacher saw a different prompt but
the same response tokens), so both have shape [B, T, D] and share ``targets``.

Tokens are flattened to [B·T], padded to a multiple of ``chunk_size`` and processed by ``lax.scan``
one [chunk, V] fp32 logits block at a time; each chunk body is ``jax.checkpoint``-ed so the backward
pass recomputes its logits instead of storing them. Peak extra memory is a few [chunk, V] fp32 blocks.

Per position, with p = softmax(student logits / τ), q = softmax(teacher logits / τ):
- ``student_logprobs`` log p(y), ``teacher_logprobs`` log q(y), ``student_entropy`` H(p)
- ``reverse_kl`` KL(p‖q) = Σ p(log p − log q);  ``forward_kl`` KL(q‖p)
- ``jsd`` generalised JSD_β = β·KL(q‖m) + (1−β)·KL(p‖m), m = β·q + (1−β)·p (GKD, Agarwal et al. 2024;
  same convention as TRL's ``generalized_jsd_loss``)
With ``top_k`` set, divergences use the student's top-k tokens plus one tail bucket holding the
remaining mass of each distribution (k = V−1 reproduces the full-vocabulary value exactly).
Gradients flow to the student hidden states and the kernel; the teacher side is ``stop_gradient``-ed.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

STUDENT_FEATURES = ("student_logprobs", "student_entropy")
PAIR_FEATURES = ("teacher_logprobs", "reverse_kl", "forward_kl", "jsd")
ALL_FEATURES = STUDENT_FEATURES + PAIR_FEATURES


@dataclasses.dataclass(frozen=True, kw_only=True)
class VocabConfig:
    chunk_size: int = 256  # tokens per chunk; extra memory ≈ 2–4 × chunk_size × V × 4 bytes
    temperature: float = 1.0  # logits are divided by this (match the sampler's temperature)
    jsd_beta: float = 0.5  # β of the generalised JSD, strictly inside (0, 1)
    top_k: int | None = None  # None = full vocabulary divergences; k = top-k + tail bucket

    def __post_init__(self):
        if self.chunk_size <= 0:
            raise ValueError(f"VocabConfig.chunk_size must be positive, got {self.chunk_size}")
        if self.temperature <= 0:
            raise ValueError(f"VocabConfig.temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.jsd_beta < 1.0:
            raise ValueError(f"VocabConfig.jsd_beta must be in (0, 1), got {self.jsd_beta}")
        if self.top_k is not None and self.top_k <= 0:
            raise ValueError(f"VocabConfig.top_k must be positive or None, got {self.top_k}")


def _logits(hidden_chunk: jax.Array, kernel: jax.Array, temperature: float) -> jax.Array:
    """[C, D] × [D, V] → [C, V] fp32 logits (temperature-scaled)."""
    logits = jnp.dot(hidden_chunk.astype(kernel.dtype), kernel, preferred_element_type=jnp.float32)
    if temperature != 1.0:
        logits = logits / temperature
    return logits


def _xlogx_ratio(log_a: jax.Array, log_b: jax.Array) -> jax.Array:
    """Σ a (log a − log b) over the last axis for log-distributions (top-k buckets, JSD)."""
    return jnp.sum(jnp.exp(log_a) * (log_a - log_b), axis=-1)


def _topk_buckets(log_p: jax.Array, log_q: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Collapse [C, V] log-distributions to [C, k+1]: student's top-k tokens plus a tail bucket."""
    if k >= log_p.shape[-1]:
        return log_p, log_q
    top_log_p, index = jax.lax.top_k(log_p, k)  # [C, k]
    top_log_q = jnp.take_along_axis(log_q, index, axis=-1)
    rows = jnp.arange(log_p.shape[0])[:, None]
    in_top = jnp.zeros(log_p.shape, bool).at[rows, index].set(True)  # [C, V]
    # Tail mass as a log-sum-exp over the excluded tokens (exact; 1 − Σ_topk would cancel).
    tail_p = jax.nn.logsumexp(jnp.where(in_top, -jnp.inf, log_p), axis=-1, keepdims=True)
    tail_q = jax.nn.logsumexp(jnp.where(in_top, -jnp.inf, log_q), axis=-1, keepdims=True)
    return (jnp.concatenate([top_log_p, tail_p], axis=-1),
            jnp.concatenate([top_log_q, tail_q], axis=-1))


def _chunk_features(s, t, targets, features: Sequence[str], cfg: VocabConfig):
    """Features of one chunk from student logits ``s`` and teacher logits ``t`` (or None), [C, V].

    Log-probabilities ``s − lse(s)`` are written inline so XLA fuses them into each reduction
    (one exp pass per divergence, no materialised [C, V] log-softmax), and high-probability
    tokens — the ones that dominate KL and entropy — keep full fp32 precision.
    """
    out = {}
    lse_s = jax.nn.logsumexp(s, axis=-1, keepdims=True)  # [C, 1]
    if "student_logprobs" in features:
        out["student_logprobs"] = (jnp.take_along_axis(s, targets[:, None], axis=-1) - lse_s)[:, 0]
    if "student_entropy" in features:
        out["student_entropy"] = -_xlogx_ratio(s - lse_s, 0.0)
    if t is None:
        return out
    lse_t = jax.nn.logsumexp(t, axis=-1, keepdims=True)
    if "teacher_logprobs" in features:
        out["teacher_logprobs"] = (jnp.take_along_axis(t, targets[:, None], axis=-1) - lse_t)[:, 0]
    divergences = {"reverse_kl", "forward_kl", "jsd"} & set(features)
    if not divergences:
        return out
    log_p, log_q = s - lse_s, t - lse_t  # [C, V] each, fused into the reductions below
    if cfg.top_k is not None:
        log_p, log_q = _topk_buckets(log_p, log_q, cfg.top_k)
    if "reverse_kl" in features:
        out["reverse_kl"] = _xlogx_ratio(log_p, log_q)
    if "forward_kl" in features:
        out["forward_kl"] = _xlogx_ratio(log_q, log_p)
    if "jsd" in features:
        beta = cfg.jsd_beta
        log_m = jnp.logaddexp(jnp.log(beta) + log_q, jnp.log1p(-beta) + log_p)
        out["jsd"] = beta * _xlogx_ratio(log_q, log_m) + (1 - beta) * _xlogx_ratio(log_p, log_m)
    return out


def _chunked(flat_inputs: dict, kernel: jax.Array, features: tuple[str, ...], cfg: VocabConfig,
             num_tokens: int) -> dict[str, jax.Array]:
    """Scan over [num_chunks, C, ...] inputs; returns flat [num_tokens] float32 features."""
    chunk = cfg.chunk_size
    num_chunks = -(-num_tokens // chunk)
    pad = num_chunks * chunk - num_tokens

    def to_chunks(x):
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape((num_chunks, chunk) + x.shape[1:])

    xs = {name: to_chunks(value) for name, value in flat_inputs.items()}

    @jax.checkpoint
    def body(kernel, x):
        student_logits = _logits(x["student"], kernel, cfg.temperature)  # [C, V] fp32
        teacher_logits = None
        if "teacher" in x:
            teacher_logits = jax.lax.stop_gradient(_logits(x["teacher"], kernel, cfg.temperature))
        return _chunk_features(student_logits, teacher_logits, x["targets"], features, cfg)

    _, stacked = jax.lax.scan(lambda carry, x: (carry, body(kernel, x)), None, xs)
    return {name: value.reshape(-1)[:num_tokens] for name, value in stacked.items()}


def _check_shapes(hidden, kernel, targets, name="hidden"):
    if hidden.ndim != 3 or targets.shape != hidden.shape[:2]:
        raise ValueError(f"{name} must be [B, T, D] with targets [B, T]; got {hidden.shape} and "
                         f"{targets.shape}")
    if kernel.ndim != 2 or kernel.shape[0] != hidden.shape[-1]:
        raise ValueError(f"kernel must be [D, V] with D={hidden.shape[-1]}; got {kernel.shape}")


def token_stats(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, cfg: VocabConfig,
                mask: jax.Array | None = None,
                features: Sequence[str] = STUDENT_FEATURES) -> dict[str, jax.Array]:
    """Student-only features ([B, T] float32 each) from hidden [B, T, D] and kernel [D, V].

    ``features`` ⊆ {"student_logprobs", "student_entropy"}; positions where ``mask`` is 0 are 0.
    """
    _check_shapes(hidden, kernel, targets)
    features = tuple(features)
    unknown = set(features) - set(STUDENT_FEATURES)
    if unknown:
        raise ValueError(f"token_stats computes {STUDENT_FEATURES}; got {sorted(unknown)} — use "
                         f"pair_stats for teacher features")
    batch, length, dim = hidden.shape
    flat = {"student": hidden.reshape(batch * length, dim), "targets": targets.reshape(-1)}
    out = _chunked(flat, kernel, features, cfg, batch * length)
    return _reshape_and_mask(out, batch, length, mask)


def pair_stats(student_hidden: jax.Array, teacher_hidden: jax.Array, kernel: jax.Array,
               targets: jax.Array, cfg: VocabConfig, mask: jax.Array | None = None,
               features: Sequence[str] = ALL_FEATURES) -> dict[str, jax.Array]:
    """Student and teacher features ([B, T] float32 each) in one chunked pass over the vocabulary."""
    _check_shapes(student_hidden, kernel, targets, "student_hidden")
    if teacher_hidden.shape != student_hidden.shape:
        raise ValueError(f"teacher_hidden {teacher_hidden.shape} must match student_hidden "
                         f"{student_hidden.shape}: align the teacher on the response positions")
    features = tuple(features)
    unknown = set(features) - set(ALL_FEATURES)
    if unknown:
        raise ValueError(f"unknown features {sorted(unknown)}; available: {ALL_FEATURES}")
    batch, length, dim = student_hidden.shape
    flat = {"student": student_hidden.reshape(batch * length, dim),
            "teacher": teacher_hidden.reshape(batch * length, dim),
            "targets": targets.reshape(-1)}
    out = _chunked(flat, kernel, features, cfg, batch * length)
    return _reshape_and_mask(out, batch, length, mask)


def _reshape_and_mask(out, batch, length, mask):
    out = {name: value.reshape(batch, length) for name, value in out.items()}
    if mask is not None:
        out = {name: jnp.where(mask > 0, value, 0.0) for name, value in out.items()}
    return out


def naive_pair_stats(student_hidden, teacher_hidden, kernel, targets, cfg: VocabConfig,
                     mask=None, features: Sequence[str] = ALL_FEATURES) -> dict[str, jax.Array]:
    """Reference implementation materialising full [B, T, V] fp32 logits (tests and benchmarks only)."""
    batch, length, dim = student_hidden.shape
    student_logits = _logits(student_hidden.reshape(-1, dim), kernel, cfg.temperature)  # [B·T, V]
    teacher_logits = None
    if teacher_hidden is not None:
        teacher_logits = jax.lax.stop_gradient(_logits(teacher_hidden.reshape(-1, dim), kernel,
                                                       cfg.temperature))
    out = _chunk_features(student_logits, teacher_logits, targets.reshape(-1), tuple(features), cfg)
    return _reshape_and_mask(out, batch, length, mask)
