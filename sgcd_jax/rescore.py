"""Credit ablations without new rollouts: recompute credit weights on a run's stored rollouts.

    python -m sgcd_jax.rescore --run_dir runs/sgcd_tau --credit.beta_pos=2.0 --credit.renormalize=False

For every stored (process, iteration) segment the stored features (student/teacher logprobs,
reverse KL, entropy, step ids, advantages) are fed to the registered credit function the run used
(``losses.get(attrs["credit_fn"])``) twice: with the run's own ``CreditConfig`` — which must give
back the stored weights (checked; bitwise when the run computed them with the same jitted function
on the same padded shape) — and with the overridden config. Writes
``<run_dir>/rescore/<tag>/comparison.json`` and ``comparison.png`` (weight histograms, old-vs-new
scatter, per-iteration change), which ``sgcd_jax.report`` can link next to the run's own figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from collections.abc import Sequence
from typing import Any

import numpy as np

from sgcd_jax.data import store as rollout_store


@dataclasses.dataclass
class SegmentResult:
    process_index: int
    iteration: int
    stored_weights: np.ndarray  # [N, T]
    reproduced_weights: np.ndarray  # [N, T] original config, recomputed
    new_weights: np.ndarray  # [N, T] overridden config
    stored_token_advantages: np.ndarray  # [N, T] recomputed with the original config
    new_token_advantages: np.ndarray  # [N, T]
    counted: np.ndarray  # [N, T] bool: loss tokens of trajectories with A != 0


def parse_overrides(args: Sequence[str], config_cls: type) -> dict[str, Any]:
    """``["--credit.beta_pos=2", "--credit.renormalize=false"]`` → typed field overrides."""
    hints = typing.get_type_hints(config_cls)
    overrides: dict[str, Any] = {}
    for arg in args:
        if not arg.startswith("--credit.") or "=" not in arg:
            raise ValueError(f"unrecognised argument {arg!r}; credit overrides look like "
                             "--credit.<field>=<value>")
        key, raw = arg[len("--credit."):].split("=", 1)
        if key not in hints:
            raise ValueError(f"--credit.{key}: CreditConfig has no field {key!r}; fields: "
                             f"{sorted(hints)}")
        kind = hints[key]
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--credit.{key}={raw!r} must be true/false")
            overrides[key] = raw.lower() in ("true", "1")
        elif kind in (int, float, str):
            overrides[key] = kind(raw)
        else:
            overrides[key] = raw
    return overrides


def _credit_batch(rows: rollout_store.IterationRows):
    """The stored segment as the CreditBatch the run built: same [rows, T] shape (padding rows the
    run had are re-added as all-masked rows, so XLA sees the shapes it saw in training)."""
    import jax.numpy as jnp

    from sgcd_jax.losses import CreditBatch

    missing = [f for f in ("student_logprobs", "teacher_logprobs", "credit_weights")
               if f not in rows.attrs.get("fields", [])]
    if missing:
        raise ValueError(f"iteration {rows.iteration} (process {rows.process_index}) has no stored "
                         f"{missing}: the run did not record what rescoring needs")
    extra_rows = max(int(rows.attrs.get("padded_rows", 0)) - rows.num_trajectories, 0)

    def pad(array: np.ndarray) -> np.ndarray:
        return np.concatenate([array, np.zeros((extra_rows, *array.shape[1:]), array.dtype)])

    def field(name: str):
        if name not in rows.attrs.get("fields", []):
            return None
        return jnp.asarray(pad(np.nan_to_num(rows.tokens[name], nan=0.0)))  # padding was 0

    step_ids = rows.tokens["step_ids"]
    return CreditBatch(advantages=jnp.asarray(pad(rows.trajectories["advantage"].astype(np.float32))),
                       student_logprobs=field("student_logprobs"),
                       teacher_logprobs=field("teacher_logprobs"),
                       loss_mask=jnp.asarray(pad(rows.tokens["loss_mask"].astype(np.int32))),
                       step_ids=jnp.asarray(np.concatenate(
                           [step_ids, np.full((extra_rows, step_ids.shape[1]), -1, step_ids.dtype)])),
                       reverse_kl=field("reverse_kl"), entropy=field("entropy"))


def credit_config_of(rows: rollout_store.IterationRows):
    from sgcd_jax.losses import CreditConfig

    stored = rows.attrs.get("credit_config")
    if stored is None:
        raise ValueError(f"iteration {rows.iteration} has no 'credit_config' attribute; the trainer "
                         "must pass attrs={'credit_config': ..., 'credit_fn': ..., 'step': ...}")
    return CreditConfig(**stored)


def compute_weights(rows: rollout_store.IterationRows, cfg) -> tuple[np.ndarray, np.ndarray]:
    """(weights, token_advantages) [N, T] for one stored segment under credit config ``cfg``."""
    import jax

    from sgcd_jax import losses

    fn = losses.get(rows.attrs.get("credit_fn", "credit/sgcd"))
    out = jax.jit(fn, static_argnums=1)(_credit_batch(rows), cfg, rows.attrs.get("step", 0))
    n = rows.num_trajectories
    return np.asarray(out.weights)[:n], np.asarray(out.token_advantages)[:n]


def rescore(run_dir: str, overrides: dict[str, Any]) -> list[SegmentResult]:
    results = []
    for rows in rollout_store.iter_segments(os.path.join(run_dir, "rollouts")):
        original = credit_config_of(rows)
        changed = dataclasses.replace(original, **overrides)
        reproduced, old_adv = compute_weights(rows, original)
        new, new_adv = compute_weights(rows, changed)
        mask = rows.tokens["loss_mask"] > 0
        counted = mask & (rows.trajectories["advantage"][:, None] != 0)
        stored = np.where(mask, rows.tokens["credit_weights"], 1.0)
        results.append(SegmentResult(rows.process_index, rows.iteration, stored,
                                     np.where(mask, reproduced, 1.0), new, old_adv, new_adv, counted))
    if not results:
        raise ValueError(f"{run_dir}/rollouts holds no iterations yet")
    return results


def summarize(results: list[SegmentResult], overrides: dict[str, Any]) -> dict[str, Any]:
    counted = np.concatenate([r.counted.ravel() for r in results])
    stored = np.concatenate([r.stored_weights.ravel() for r in results])[counted]
    reproduced = np.concatenate([r.reproduced_weights.ravel() for r in results])[counted]
    new = np.concatenate([r.new_weights.ravel() for r in results])[counted]
    diff = np.abs(new - stored)
    per_iteration = [{
        "process": r.process_index, "iteration": r.iteration,
        "reproduction_max_abs_diff": float(np.abs(r.reproduced_weights - r.stored_weights)[r.counted].max(initial=0)),
        "mean_abs_weight_change": float(np.abs(r.new_weights - r.stored_weights)[r.counted].mean())
        if r.counted.any() else 0.0,
        "mean_abs_token_advantage_change": float(
            np.abs(r.new_token_advantages - r.stored_token_advantages)[r.counted].mean())
        if r.counted.any() else 0.0,
    } for r in results]
    stats = lambda w: {"mean": float(w.mean()), "std": float(w.std()), "min": float(w.min()),  # noqa: E731
                       "max": float(w.max())} if len(w) else {}
    return {
        "overrides": overrides,
        "num_segments": len(results),
        "num_counted_tokens": int(counted.sum()),
        "reproduction_exact": bool(np.array_equal(stored, reproduced)),
        "reproduction_max_abs_diff": float(np.abs(stored - reproduced).max(initial=0)),
        "stored_weights": stats(stored),
        "new_weights": stats(new),
        "mean_abs_weight_change": float(diff.mean()) if len(diff) else 0.0,
        "frac_tokens_changed": float((diff > 1e-6).mean()) if len(diff) else 0.0,
        "per_iteration": per_iteration,
    }


def plot(results: list[SegmentResult], summary: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counted = np.concatenate([r.counted.ravel() for r in results])
    stored = np.concatenate([r.stored_weights.ravel() for r in results])[counted]
    new = np.concatenate([r.new_weights.ravel() for r in results])[counted]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    bins = np.linspace(min(stored.min(initial=1), new.min(initial=1)),
                       max(stored.max(initial=1), new.max(initial=1)) + 1e-6, 40)
    axes[0].hist(stored, bins=bins, alpha=0.6, label="stored (run config)")
    axes[0].hist(new, bins=bins, alpha=0.6, label="rescored")
    axes[0].set(title="credit weights on loss tokens", xlabel="w", ylabel="tokens")
    axes[0].legend()
    pick = np.random.default_rng(0).permutation(len(stored))[:5000]
    axes[1].scatter(stored[pick], new[pick], s=3, alpha=0.4)
    axes[1].plot(bins, bins, "k--", lw=0.8)
    axes[1].set(title="per token", xlabel="stored w", ylabel="rescored w")
    its = [f"{p['process']}:{p['iteration']}" for p in summary["per_iteration"]]
    axes[2].plot(its, [p["mean_abs_weight_change"] for p in summary["per_iteration"]], marker="o")
    axes[2].set(title="mean |Δw| per iteration", xlabel="process:iteration")
    fig.suptitle("rescore " + ", ".join(f"{k}={v}" for k, v in summary["overrides"].items()))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from sgcd_jax.losses import CreditConfig

    parser = argparse.ArgumentParser(
        prog="python -m sgcd_jax.rescore", description=__doc__.split("\n\n")[0],
        epilog="credit overrides: --credit.<field>=<value> for any CreditConfig field: "
               + ", ".join(f.name for f in dataclasses.fields(CreditConfig)))
    parser.add_argument("--run_dir", required=True)
    parser.add_argument("--tag", default="", help="output folder name under <run_dir>/rescore/")
    parser.add_argument("--require_exact", action="store_true",
                        help="exit non-zero unless the run's config reproduces the stored weights")
    args, rest = parser.parse_known_args(argv)
    overrides = parse_overrides(rest, CreditConfig)
    results = rescore(args.run_dir, overrides)
    summary = summarize(results, overrides)
    tag = args.tag or ("_".join(f"{k}={v}" for k, v in sorted(overrides.items())) or "original")
    out_dir = os.path.join(args.run_dir, "rescore", tag)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "comparison.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot(results, summary, os.path.join(out_dir, "comparison.png"))
    np.savez_compressed(os.path.join(out_dir, "weights.npz"), **{
        f"p{r.process_index}_it{r.iteration}": r.new_weights for r in results})
    print(json.dumps({k: summary[k] for k in ("overrides", "reproduction_exact",
                                               "reproduction_max_abs_diff", "mean_abs_weight_change",
                                               "frac_tokens_changed")}))
    if args.require_exact and not summary["reproduction_exact"]:
        raise SystemExit(f"stored weights not reproduced (max |diff| "
                         f"{summary['reproduction_max_abs_diff']:.3g}); see {out_dir}")
    return summary


if __name__ == "__main__":
    main()
