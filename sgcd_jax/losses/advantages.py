"""Sequence-level advantage estimators over sibling groups (GRPO, Dr.GRPO, RLOO/LOOP).

Input is a flat batch of N trajectories with a reward and an integer group id each (ids may be
arbitrary, e.g. hashes; they are remapped with a static-size ``jnp.unique``) and a ``valid`` mask
for padded rows. Padded rows and singleton groups get advantage 0; the fraction of valid rows in
singleton groups is reported as ``advantage/singleton_fraction`` (a warning metric: such rows
carry no learning signal).

Formulas (group g with n valid members, mean μ_g, unbiased std σ_g with ddof=1):
- GRPO:      A_i = (r_i − μ_g) / (σ + eps)          σ = σ_g, or the batch reward std (``std_scope="batch"``)
- Dr.GRPO:   A_i = r_i − μ_g                         (``norm_by_std=False``)
- RLOO/LOOP: A_i = r_i − mean_{j≠i} r_j = n/(n−1)·(r_i − μ_g), optionally / (σ + eps) when
             ``norm_by_std`` (LOOP as published uses ``norm_by_std=False``)
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from sgcd_jax.losses.registry import get, register

STD_SCOPES = ("group", "batch")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdvantageConfig:
    eps: float = 1e-6  # added to the std before dividing
    norm_by_std: bool = True  # False = Dr.GRPO (mean-centred only)
    std_scope: str = "group"  # "group": per-group std; "batch": std of all valid rewards

    def __post_init__(self):
        if self.eps < 0:
            raise ValueError(f"AdvantageConfig.eps must be >= 0, got {self.eps}")
        if self.std_scope not in STD_SCOPES:
            raise ValueError(f"AdvantageConfig.std_scope={self.std_scope!r}; use one of {STD_SCOPES}")


@flax.struct.dataclass
class AdvantageBatch:
    rewards: jax.Array  # [N] float
    group_ids: jax.Array  # [N] int, any values; equal id = same sibling group
    valid: jax.Array  # [N] bool, False on padded rows


@flax.struct.dataclass
class AdvantageOutput:
    advantages: jax.Array  # [N] float32, 0 on invalid rows and singleton groups
    metrics: dict


def _group_stats(batch: AdvantageBatch):
    """Per-row group count, reward minus group mean (0 on invalid rows) and unbiased std over valid rows."""
    n = batch.rewards.shape[0]
    valid = batch.valid.astype(jnp.float32)
    rewards = jnp.where(batch.valid, batch.rewards.astype(jnp.float32), 0.0)
    # Remap arbitrary ids to 0..n-1 with a static size; padded rows share id space harmlessly
    # because they contribute zero weight.
    _, segment = jnp.unique(batch.group_ids, size=n, fill_value=batch.group_ids.max(),
                            return_inverse=True)
    segment = segment.reshape(n)
    count = jax.ops.segment_sum(valid, segment, num_segments=n)[segment]  # [N]
    # Sums run over r - min_g (each group's smallest valid reward), so a group whose rewards are all
    # exactly equal has deviations of exactly 0: its mean and std carry no rounding step (summing
    # 2.9 seven times in float32 and dividing by 7 is off by one ulp, which the std then amplifies
    # into same-sign advantages up to ~0.2) and it is counted as zero-std.
    low = jax.ops.segment_min(jnp.where(batch.valid, rewards, jnp.inf), segment, num_segments=n)[segment]
    shifted = jnp.where(batch.valid, rewards - jnp.where(jnp.isfinite(low), low, 0.0), 0.0)
    total = jax.ops.segment_sum(shifted, segment, num_segments=n)[segment]
    offset = total / jnp.maximum(count, 1.0)
    centred = jnp.where(batch.valid, shifted - offset, 0.0)
    sum_sq = jax.ops.segment_sum(centred ** 2, segment, num_segments=n)[segment]
    std = jnp.sqrt(sum_sq / jnp.maximum(count - 1.0, 1.0))
    return rewards, count, centred, std


def _batch_std(batch: AdvantageBatch) -> jax.Array:
    valid = batch.valid.astype(jnp.float32)
    rewards = jnp.where(batch.valid, batch.rewards.astype(jnp.float32), 0.0)
    n = valid.sum()
    mean = rewards.sum() / jnp.maximum(n, 1.0)
    var = (jnp.where(batch.valid, (rewards - mean) ** 2, 0.0)).sum() / jnp.maximum(n - 1.0, 1.0)
    return jnp.sqrt(var)


def _finish(centred, batch, count, group_std, cfg: AdvantageConfig) -> AdvantageOutput:
    if cfg.norm_by_std:
        std = group_std if cfg.std_scope == "group" else _batch_std(batch)
        centred = jnp.where(centred == 0, 0.0, centred / (std + cfg.eps))  # eps=0 on a zero-std group: 0, not 0/0
    usable = batch.valid & (count > 1)
    advantages = jnp.where(usable, centred, 0.0)
    num_valid = jnp.maximum(batch.valid.sum(), 1)
    singleton = (batch.valid & (count <= 1)).sum() / num_valid
    metrics = {
        "advantage/mean": jnp.where(batch.valid, advantages, 0.0).sum() / num_valid,
        "advantage/abs_mean": jnp.abs(advantages).sum() / num_valid,
        "advantage/singleton_fraction": singleton,
        "advantage/zero_std_fraction": (usable & (group_std == 0)).sum() / num_valid,
    }
    return AdvantageOutput(advantages=advantages, metrics=metrics)


@register("advantage/grpo")
def grpo_advantages(batch: AdvantageBatch, cfg: AdvantageConfig) -> AdvantageOutput:
    """GRPO / Dr.GRPO group-normalised advantage (Shao et al. 2024; Liu et al. 2025)."""
    _, count, centred, std = _group_stats(batch)
    return _finish(centred, batch, count, std, cfg)


@register("advantage/rloo")
def rloo_advantages(batch: AdvantageBatch, cfg: AdvantageConfig) -> AdvantageOutput:
    """Leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024; LOOP, Chen et al. 2025)."""
    _, count, centred, std = _group_stats(batch)
    centred = centred * count / jnp.maximum(count - 1.0, 1.0)
    return _finish(centred, batch, count, std, cfg)


register("advantage/loop")(rloo_advantages)


def compute_advantages(batch: AdvantageBatch, cfg: AdvantageConfig, estimator: str = "grpo") -> AdvantageOutput:
    """Dispatch to the estimator registered as ``advantage/<estimator>`` (config key ``loss.advantage``)."""
    return get(f"advantage/{estimator}")(batch, cfg)
