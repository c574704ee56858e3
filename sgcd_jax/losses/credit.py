"""SGCD credit weights: bounded, detached per-token reweighting of GRPO advantages.

Per loss token t of trajectory i with sequence advantage A_i (σ = sign(A_i)):
    δ_t = log q_T(y_t) − log p_S(y_t)                  teacher vs student on the sampled token
    s_t = σ · (δ_t − η · D_t) · g_t                    D_t = KL(p_S‖q_T) (full vocabulary), g_t gate
    u_t = exp(β_σ · s_t)                                β_+ for A>0, β_− for A<0 ("decoupled")
    w_t = clip(u_t, 1 − ε_lo,σ, 1 + ε_hi,σ)
    [step]   w_t ← mean of w over the loss tokens of t's assistant turn (step_ids)
    [action] s_t ← Σ of s over the loss tokens of t's turn before u and the clip: the turn's action as one unit,
             log q_T(a_k) − log p_S(a_k) (a single decisive token, e.g. ``###STOP###`` where an answer was
             due, moves its whole turn instead of being averaged away over the turn's other tokens)
    [renorm] w_t ← clip(c_i · w_t, bounds) with c_i solved (bisection) so the trajectory's mean
             over loss tokens is exactly 1: credit is redistributed within a trajectory, not created
    Ã_{i,t} = A_i · ((1 − λ) + λ · w_t)               λ = lam_schedule(step); all under stop_gradient
Sign convention for D_t: it is extra evidence that the teacher disagrees with the student at t, so
it lowers the weight of tokens in successful trajectories (A>0) and raises the blame on tokens of
failed ones (A<0). The entropy gate g_t (``entropy_gate``) keeps w=1 at confident student
positions: "hard" g = 1[H_t ≥ h0]; "soft" g = sigmoid((H_t − h0)/τ_H) (with renormalisation on,
gated tokens are rescaled together with the rest of the trajectory).

Defaults (preset "sgcd", the values documented in the README):
    beta_pos=1.0, beta_neg=1.0, eps_low_pos=eps_low_neg=0.5, eps_high_pos=eps_high_neg=1.0
    (w ∈ [0.5, 2]), eta=0.1, entropy_gate="none", granularity="token", renormalize=True,
    lam=1.0, lam_schedule="constant".
Preset "rlsd": w = clip(exp(σ·δ), 1 ± 0.2), no η, no renormalisation, λ = 1.0 (override freely).
Preset "none": λ = 0 ⇒ Ã = A exactly (plain GRPO).
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp

from sgcd_jax.losses.registry import register

ENTROPY_GATES = ("none", "hard", "soft")
GRANULARITIES = ("token", "step", "action")
LAM_SCHEDULES = ("constant", "linear", "cosine")
RENORM_BISECTION_ITERS = 40


@dataclasses.dataclass(frozen=True, kw_only=True)
class CreditConfig:
    beta_pos: float = 1.0  # temperature of u = exp(β s) for A > 0
    beta_neg: float = 1.0  # … for A < 0
    eps_low_pos: float = 0.5  # w ≥ 1 − eps_low_pos for A > 0
    eps_high_pos: float = 1.0  # w ≤ 1 + eps_high_pos for A > 0
    eps_low_neg: float = 0.5
    eps_high_neg: float = 1.0
    eta: float = 0.1  # coefficient of the reverse-KL disagreement term D_t (0 = off)
    entropy_gate: str = "none"  # none | hard | soft
    entropy_threshold: float = 0.5  # h0 in nats
    entropy_temperature: float = 0.1  # τ_H of the soft gate
    granularity: str = "token"  # token | step (mean of w within each assistant turn) | action (Σ of s within it)
    renormalize: bool = True  # mean-1 per trajectory over loss tokens, within bounds
    lam: float = 1.0  # λ at step 0 (or for the whole run if constant)
    lam_schedule: str = "constant"  # constant | linear | cosine (decay from lam to lam_final)
    lam_final: float = 0.0
    lam_decay_steps: int = 1000

    def __post_init__(self):
        if self.beta_pos < 0 or self.beta_neg < 0:
            raise ValueError("CreditConfig.beta_pos/beta_neg must be >= 0")
        for name in ("eps_low_pos", "eps_low_neg"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"CreditConfig.{name} must be in [0, 1) so the lower bound stays "
                                 f"positive; got {getattr(self, name)}")
        for name in ("eps_high_pos", "eps_high_neg", "eta", "entropy_threshold"):
            if getattr(self, name) < 0:
                raise ValueError(f"CreditConfig.{name} must be >= 0; got {getattr(self, name)}")
        if self.entropy_temperature <= 0:
            raise ValueError("CreditConfig.entropy_temperature must be > 0")
        if self.entropy_gate not in ENTROPY_GATES:
            raise ValueError(f"entropy_gate={self.entropy_gate!r}; use one of {ENTROPY_GATES}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity={self.granularity!r}; use one of {GRANULARITIES}")
        if self.lam_schedule not in LAM_SCHEDULES:
            raise ValueError(f"lam_schedule={self.lam_schedule!r}; use one of {LAM_SCHEDULES}")
        if not (0.0 <= self.lam <= 1.0 and 0.0 <= self.lam_final <= 1.0):
            raise ValueError(f"lam and lam_final must be in [0, 1]; got {self.lam}, {self.lam_final}")
        if self.lam_decay_steps <= 0:
            raise ValueError("CreditConfig.lam_decay_steps must be positive")

    @classmethod
    def preset(cls, name: str, **overrides) -> "CreditConfig":
        """``"sgcd"`` (documented defaults), ``"rlsd"`` or ``"none"`` (λ=0, plain GRPO)."""
        presets = {
            "sgcd": {},
            "rlsd": dict(eps_low_pos=0.2, eps_high_pos=0.2, eps_low_neg=0.2, eps_high_neg=0.2,
                         eta=0.0, renormalize=False),
            "none": dict(lam=0.0, lam_final=0.0, eta=0.0, renormalize=False),
        }
        if name not in presets:
            raise KeyError(f"unknown credit preset {name!r}; presets: {sorted(presets)}")
        return cls(**{**presets[name], **overrides})

    @property
    def needs_reverse_kl(self) -> bool:
        return self.eta > 0 and self.lam_max > 0

    @property
    def needs_entropy(self) -> bool:
        return self.entropy_gate != "none" and self.lam_max > 0

    @property
    def lam_max(self) -> float:
        return self.lam if self.lam_schedule == "constant" else max(self.lam, self.lam_final)


@flax.struct.dataclass
class CreditBatch:
    advantages: jax.Array  # [B] sequence advantages A_i
    student_logprobs: jax.Array  # [B, T] log p_S(y_t) from the score pass
    teacher_logprobs: jax.Array  # [B, T] log q_T(y_t), same response tokens
    loss_mask: jax.Array  # [B, T]
    step_ids: jax.Array | None = None  # [B, T] int assistant turn, -1 off-response; for "step"
    reverse_kl: jax.Array | None = None  # [B, T] KL(p_S‖q_T); needed when eta > 0
    entropy: jax.Array | None = None  # [B, T] H(p_S); needed with an entropy gate


@flax.struct.dataclass
class CreditOutput:
    token_advantages: jax.Array  # [B, T] Ã (0 off the loss mask), stop_gradient-ed
    weights: jax.Array  # [B, T] w (1 off the loss mask), stop_gradient-ed
    metrics: dict


def lam_at(step, cfg: CreditConfig) -> jax.Array:
    """λ as a pure function of the (possibly traced) training step."""
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / cfg.lam_decay_steps, 0.0, 1.0)
    if cfg.lam_schedule == "constant":
        return jnp.asarray(cfg.lam, jnp.float32)
    if cfg.lam_schedule == "linear":
        frac = progress
    else:
        frac = 0.5 * (1.0 - jnp.cos(math.pi * progress))
    return cfg.lam + (cfg.lam_final - cfg.lam) * frac


def _step_reduce(values, mask, step_ids, mean: bool = True):
    """Replace each loss token's value by the mean (or sum) over its (row, assistant turn)."""
    batch, length = values.shape
    in_step = (mask > 0) & (step_ids >= 0)
    segment = jnp.arange(batch)[:, None] * length + jnp.clip(step_ids, 0, length - 1)  # [B, T]
    segment = jnp.where(in_step, segment, batch * length).reshape(-1)  # dump slot for the rest
    num = batch * length + 1
    sums = jax.ops.segment_sum(jnp.where(in_step, values, 0.0).reshape(-1), segment, num)
    if mean:
        sums = sums / jnp.maximum(jax.ops.segment_sum(in_step.reshape(-1).astype(jnp.float32), segment, num), 1.0)
    return jnp.where(in_step, sums[segment].reshape(batch, length), values)


def _renormalize(weights, mask, low, high):
    """Per row, find c with mean_loss(clip(c·w, low, high)) = 1 by bisection in log c."""
    maskf = mask.astype(jnp.float32)
    count = jnp.maximum(maskf.sum(-1), 1.0)  # [B]
    masked_w = jnp.where(mask > 0, weights, 1.0)
    log_lo = jnp.log(low[:, 0]) - jnp.log(masked_w.max(-1))  # mean = low ≤ 1 here
    log_hi = jnp.log(high[:, 0]) - jnp.log(masked_w.min(-1))  # mean = high ≥ 1 here

    def mean_at(log_c):
        scaled = jnp.clip(jnp.exp(log_c)[:, None] * weights, low, high)
        return (scaled * maskf).sum(-1) / count

    def bisect(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        above = mean_at(mid) > 1.0
        return jnp.where(above, lo, mid), jnp.where(above, mid, hi)

    lo, hi = jax.lax.fori_loop(0, RENORM_BISECTION_ITERS, bisect, (log_lo, log_hi))
    log_c = 0.5 * (lo + hi)
    return jnp.clip(jnp.exp(log_c)[:, None] * weights, low, high)


@register("credit/sgcd")
def sgcd_credit(batch: CreditBatch, cfg: CreditConfig, step=0) -> CreditOutput:
    """The SGCD credit family (module docstring); returns Ã [B, T] and w [B, T], both detached."""
    mask = batch.loss_mask > 0
    advantages = jax.lax.stop_gradient(batch.advantages.astype(jnp.float32))[:, None]  # [B, 1]
    positive = advantages > 0
    sign = jnp.sign(advantages)
    disagreement = jax.lax.stop_gradient(batch.teacher_logprobs - batch.student_logprobs)  # δ
    if cfg.eta > 0:
        if batch.reverse_kl is None:
            raise ValueError("CreditConfig.eta > 0 needs CreditBatch.reverse_kl (pair_stats)")
        disagreement = disagreement - cfg.eta * jax.lax.stop_gradient(batch.reverse_kl)
    score = sign * disagreement  # [B, T]
    if cfg.entropy_gate != "none":
        if batch.entropy is None:
            raise ValueError("CreditConfig.entropy_gate needs CreditBatch.entropy")
        entropy = jax.lax.stop_gradient(batch.entropy)
        if cfg.entropy_gate == "hard":
            gate = (entropy >= cfg.entropy_threshold).astype(jnp.float32)
        else:
            gate = jax.nn.sigmoid((entropy - cfg.entropy_threshold) / cfg.entropy_temperature)
        score = score * gate
    if cfg.granularity in ("step", "action") and batch.step_ids is None:
        raise ValueError(f"CreditConfig.granularity={cfg.granularity!r} needs CreditBatch.step_ids")
    if cfg.granularity == "action":
        score = _step_reduce(score, mask, batch.step_ids, mean=False)
    beta = jnp.where(positive, cfg.beta_pos, cfg.beta_neg)
    low = jnp.where(positive, 1.0 - cfg.eps_low_pos, 1.0 - cfg.eps_low_neg)  # [B, 1]
    high = jnp.where(positive, 1.0 + cfg.eps_high_pos, 1.0 + cfg.eps_high_neg)
    # Clip the exponent first so exp never overflows; the clip to [low, high] follows.
    log_u = jnp.clip(beta * score, jnp.log(low), jnp.log(high))
    weights = jnp.clip(jnp.exp(log_u), low, high)
    if cfg.granularity == "step":
        weights = _step_reduce(weights, mask, batch.step_ids)
    if cfg.renormalize:
        weights = _renormalize(weights, mask, low, high)
    weights = jnp.where(mask & (advantages != 0), weights, 1.0)
    weights = jax.lax.stop_gradient(weights)
    lam = lam_at(step, cfg)
    token_advantages = advantages * ((1.0 - lam) + lam * weights)
    token_advantages = jax.lax.stop_gradient(jnp.where(mask, token_advantages, 0.0))
    return CreditOutput(token_advantages=token_advantages, weights=weights,
                        metrics=credit_metrics(weights, token_advantages, advantages, mask, low,
                                               high, lam))


@register("credit/none")
def no_credit(batch: CreditBatch, cfg: CreditConfig, step=0) -> CreditOutput:
    """Plain GRPO: every token carries its trajectory's advantage."""
    mask = batch.loss_mask > 0
    advantages = jax.lax.stop_gradient(batch.advantages.astype(jnp.float32))[:, None]
    token_advantages = jnp.where(mask, advantages, 0.0)
    weights = jnp.ones(mask.shape, jnp.float32)
    return CreditOutput(token_advantages=token_advantages, weights=weights,
                        metrics=credit_metrics(weights, token_advantages, advantages, mask,
                                               jnp.zeros_like(advantages),
                                               jnp.full_like(advantages, jnp.inf), 0.0))


def credit_metrics(weights, token_advantages, advantages, mask, low, high, lam) -> dict:
    counted = mask & (advantages != 0)  # tokens whose weight matters
    countf = counted.astype(jnp.float32)
    total = jnp.maximum(countf.sum(), 1.0)
    any_counted = countf.sum() > 0
    at_low = counted & (weights <= low * (1 + 1e-6))
    at_high = counted & (weights >= high * (1 - 1e-6))
    abs_a = jnp.abs(jnp.broadcast_to(advantages, mask.shape))
    moved = jnp.where(counted, jnp.abs(token_advantages - advantages), 0.0).sum()
    # No counted token (no group with a nonzero advantage): NaN, which the metrics log keeps apart
    # from a real value; a 0 here drew the weight-mean curve down to 0 on such iterations.
    stats = {
        "credit/weight_mean": jnp.where(counted, weights, 0.0).sum() / total,
        "credit/weight_min": jnp.where(counted, weights, jnp.inf).min(),
        "credit/weight_max": jnp.where(counted, weights, -jnp.inf).max(),
        "credit/frac_at_lower": at_low.sum() / total,
        "credit/frac_at_upper": at_high.sum() / total,
        "credit/credit_moved": moved / jnp.maximum(jnp.where(counted, abs_a, 0.0).sum(), 1e-8),
    }
    return {**{k: jnp.where(any_counted, v, jnp.nan) for k, v in stats.items()},
            "credit/lambda": jnp.asarray(lam, jnp.float32)}
