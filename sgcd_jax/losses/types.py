"""Shared loss types: ``LossOutput`` and token aggregation with exact (sum, denominator) pairs."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@flax.struct.dataclass
class LossOutput:
    """An unreduced loss: ``sum / denominator`` is the loss of this (micro-)batch.

    Summing ``sum`` and ``denominator`` separately over micro-batches / hosts and dividing once gives
    the exact full-batch loss for every aggregation mode. ``metrics`` are scalar diagnostics
    (masked means over this micro-batch).
    """

    sum: jax.Array  # [] float32
    denominator: jax.Array  # [] float32
    metrics: dict[str, Any]

    @property
    def value(self) -> jax.Array:
        return self.sum / jnp.maximum(self.denominator, 1e-8)


def validate_agg_mode(agg_mode: str) -> None:
    if agg_mode not in AGG_MODES:
        raise ValueError(f"agg_mode={agg_mode!r} is not one of {AGG_MODES}")


def aggregate(token_values: jax.Array, mask: jax.Array, agg_mode: str,
              norm_length: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Reduce per-token values [B, T] under ``mask`` [B, T] to (sum, denominator).

    - ``token-mean``: Σ_tokens v / #tokens (every token weighs the same; DAPO).
    - ``seq-mean-token-mean``: Σ_seq (Σ_t v / #tokens_seq) / #seqs (original GRPO).
    - ``seq-mean-token-sum``: Σ_seq Σ_t v / #seqs.
    - ``seq-mean-token-sum-norm``: Σ_tokens v / (#seqs · L), L = ``norm_length`` or T (Dr.GRPO's
      constant normaliser; fix ``norm_length`` to the generation budget for exact accumulation
      across micro-batches of different padded lengths).
    Sequences without any masked-in token are not counted.
    """
    validate_agg_mode(agg_mode)
    mask = mask.astype(jnp.float32)
    token_values = jnp.where(mask > 0, token_values.astype(jnp.float32), 0.0)
    tokens_per_seq = mask.sum(axis=-1)  # [B]
    live_seqs = (tokens_per_seq > 0).astype(jnp.float32)  # [B]
    seq_sums = token_values.sum(axis=-1)  # [B]
    if agg_mode == "token-mean":
        return seq_sums.sum(), tokens_per_seq.sum()
    if agg_mode == "seq-mean-token-mean":
        seq_means = seq_sums / jnp.maximum(tokens_per_seq, 1.0)
        return (seq_means * live_seqs).sum(), live_seqs.sum()
    if agg_mode == "seq-mean-token-sum":
        return seq_sums.sum(), live_seqs.sum()
    length = float(norm_length if norm_length is not None else mask.shape[-1])
    return seq_sums.sum(), live_seqs.sum() * length


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    mask = mask.astype(jnp.float32)
    return jnp.where(mask > 0, values, 0.0).sum() / jnp.maximum(mask.sum(), 1.0)
