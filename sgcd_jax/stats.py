"""Statistics over seeds for method comparisons (``compare``, ``report``): a claim about learning is a mean
with its 95% confidence interval over independent runs, never one run's curve.

The interval is Student's t: mean ± t(0.975, n-1) · s / √n with the sample standard deviation s; with one run
it is undefined (NaN, printed as the bare value). The area under the eval curve (sample efficiency) is the
trapezoid area of success vs iteration divided by the iteration span: the curve's mean height, in [0, 1].
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

# t quantiles at 0.975 for 1..30 degrees of freedom (standard tables); beyond, the Cornish-Fisher expansion
# around the normal quantile z = 1.95996 (error < 1e-4 for df > 30)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    if df < 1:
        raise ValueError(f"a t interval needs at least 2 runs (df >= 1), got df={df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half width of the 95% t interval); half width NaN for fewer than 2 finite values."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
    if len(x) == 0:
        return float("nan"), float("nan")
    if len(x) == 1:
        return float(x[0]), float("nan")
    return float(x.mean()), float(t975(len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def fmt_ci(values: Sequence[float], digits: int = 3) -> str:
    """"0.412 ± 0.051" (95% t interval, n runs); one run: its bare value; none: "–"."""
    mean, half = mean_ci(values)
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def curve_auc(steps: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid area under ``values`` over ``steps`` divided by the step span (the curve's mean height);
    a single point is its value."""
    steps, values = np.asarray(steps, np.float64), np.asarray(values, np.float64)
    if len(steps) == 0:
        return float("nan")
    if len(steps) == 1 or steps[-1] == steps[0]:
        return float(values[0])
    area = float(np.sum((values[1:] + values[:-1]) * np.diff(steps)) / 2.0)
    return area / float(steps[-1] - steps[0])


def series(records: Sequence[dict[str, Any]], key: str, phase: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` in the records of ``phase`` that hold a finite number for it."""
    points = [(r["step"], float(r[key])) for r in records if r.get("phase") == phase
              and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


LOCALIZATION_KEYS = ("credit/localization_auroc", "credit/localization_auroc_step", "credit/weight_decisive",
                     "credit/weight_other", "teacher/log_ratio_decisive", "teacher/log_ratio_other")


def stored_localization(run_dir: str) -> dict[str, float]:
    """Run means of the localization metrics recomputed from the run's rollout store (the weights every
    iteration trained with and the env's decisive steps), so every method is scored the same way —
    GRPO's weights are all 1 and score exactly ½. {} without a store or ground truth."""
    import os

    from sgcd_jax.credit.localization import localization_metrics
    from sgcd_jax.data.store import iter_segments

    if not os.path.isdir(os.path.join(run_dir, "rollouts")):
        return {}
    per_iteration = []
    fields = ("loss_mask", "step_ids", "credit_weights", "student_logprobs", "teacher_logprobs")
    for seg in iter_segments(os.path.join(run_dir, "rollouts"), fields):
        lists = seg.attrs.get("decisive_steps")
        if lists is None:
            continue
        tokens = seg.tokens
        weights = np.nan_to_num(tokens["credit_weights"], nan=1.0)  # no credit step (GRPO): weight 1
        log_ratio = tokens["teacher_logprobs"] - tokens["student_logprobs"]
        log_ratio = None if np.isnan(log_ratio[tokens["loss_mask"] > 0]).all() else log_ratio
        per_iteration.append(localization_metrics(weights, tokens["loss_mask"], tokens["step_ids"],
                                                  seg.trajectories["advantage"],
                                                  [None if d is None else set(d) for d in lists], log_ratio))
    return {key: float(np.mean(values)) for key in LOCALIZATION_KEYS
            if (values := [m[key] for m in per_iteration if key in m])}


def run_summary(records: Sequence[dict[str, Any]], run_dir: str | None = None) -> dict[str, Any]:
    """One run's numbers for a comparison: eval success per step, its AUC, and the run means of the credit
    localization metrics — from its rollout store when ``run_dir`` has one, else from the train records."""
    steps, success = series(records, "success_rate", "eval")
    out: dict[str, Any] = {"eval_success": dict(zip(steps, success)), "eval_auc": curve_auc(steps, success)}
    stored = stored_localization(run_dir) if run_dir else {}
    for key in LOCALIZATION_KEYS:
        _, values = series(records, key, "train")
        out[key] = stored.get(key, float(np.mean(values)) if values else float("nan"))
    return out


def comparison_table(summaries: dict[str, list[dict[str, Any]]]) -> tuple[list[str], list[list[str]]]:
    """Markdown-ready (header, rows): per method, eval success at each eval step, the eval AUC and the
    localization AUROC, each as mean ± 95% CI over its runs."""
    steps = sorted({s for runs in summaries.values() for run in runs for s in run["eval_success"]})
    header = (["method", "runs"] + [f"eval @{s}" for s in steps]
              + ["eval AUC", "localization AUROC (token)", "(step)", "teacher log-ratio decisive / other"])
    rows = []
    for method, runs in summaries.items():
        ratio = [fmt_ci([r[f"teacher/log_ratio_{k}"] for r in runs], 2) for k in ("decisive", "other")]
        rows.append([method, str(len(runs))]
                    + [fmt_ci([r["eval_success"].get(s, float("nan")) for r in runs]) for s in steps]
                    + [fmt_ci([r["eval_auc"] for r in runs]), fmt_ci([r["credit/localization_auroc"] for r in runs]),
                       fmt_ci([r["credit/localization_auroc_step"] for r in runs]),
                       "–" if ratio == ["–", "–"] else " / ".join(ratio)])
    return header, rows


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
