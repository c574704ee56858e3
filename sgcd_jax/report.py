"""Run report: ``report.html`` + PNGs from one or more run dirs.

- learning curves (train success, eval success, successful state-changing tool calls, credit-weight
  stats, loss) across runs, for comparison;
- token-credit heatmaps of one mixed group, a success and a failure side by side: each assistant
  token coloured by its credit weight (blue < 1 < red), the credit reference that produced it and
  the verifier's decisive step (underlined) beside it.

The trainer writes ``metrics.jsonl`` and ``samples.json`` (see ``write_samples``); this module only
reads them, so ``python -m sgcd_jax.report runs/a runs/b --out cmp/`` works on finished runs.
"""

from __future__ import annotations

import argparse
import html
import json
import os
from collections import defaultdict
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sgcd_jax import stats  # noqa: E402
from sgcd_jax.metrics_log import read_metrics  # noqa: E402

SAMPLES_FILE = "samples.json"
CURVES = (  # (metric key, phase, title)
    ("success_rate", "train", "train success rate"),
    ("success_rate", "eval", "eval success rate (bare student)"),
    ("state_change_success_rate", "train", "successful state-changing tool calls / episode"),
    ("state_change_success_rate", "eval", "eval: successful state-changing tool calls / episode"),
    ("reward_mean", "train", "train reward"),  # dropped when it equals train success (binary rewards)
    ("credit/weight_mean", "train", "credit weight mean (mixed groups only)"),
    ("credit/localization_auroc", "train", "credit localization AUROC vs decisive steps (0.5 = chance)"),
    ("credit/weight_decisive", "train", "mean credit weight on decisive-step tokens"),
    ("credit/weight_other", "train", "mean credit weight on other tokens"),
    ("credit/frac_at_upper", "train", "credit weights at the upper bound (fraction)"),
    ("credit/frac_at_lower", "train", "credit weights at the lower bound (fraction)"),
    ("loss", "train", "policy loss"),
    ("time/iteration_s", "train", "iteration seconds"),
    ("memory/peak_rss_gb", "train", "peak host memory per process (GB, VmHWM)"),
)


def write_samples(run_dir: str, samples: list[dict[str, Any]]) -> str:
    """``samples``: dicts with ``title``, ``tokens`` (list[str]), ``loss_mask``, ``weights``
    (per-token credit weight, 1 where none), ``advantage``, ``reward``, ``reference`` (text)."""
    path = os.path.join(run_dir, SAMPLES_FILE)
    with open(path, "w") as f:
        json.dump(samples, f)
    return path


def _series(records: list[dict], key: str, phase: str) -> tuple[np.ndarray, np.ndarray]:
    points = [(r["step"], r[key]) for r in records
              if r.get("phase") == phase and isinstance(r.get(key), (int, float))]
    if not points:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*points)
    return np.asarray(steps), np.asarray(values, dtype=float)


def _label(run_dir: str) -> str:
    return os.path.basename(os.path.normpath(run_dir))


def plot_curves(run_dirs: Sequence[str], out_dir: str, groups: dict[str, list[str]] | None = None) -> list[str]:
    """One PNG per curve. ``groups`` (label → run dirs, e.g. seeds) plots the mean per label, shaded ± its
    95% t-interval."""
    groups = groups or {_label(d): [d] for d in run_dirs}
    records = {d: read_metrics(d) for ds in groups.values() for d in ds}
    paths = []
    drawn_series: set = set()  # a curve identical to one already drawn (e.g. reward == success) is skipped
    for key, phase, title in CURVES:
        signature = tuple((label, tuple(s[0].tolist()), tuple(np.round(s[1], 9).tolist()))
                          for label, dirs in groups.items() for s in (_series(records[d], key, phase) for d in dirs))
        if any(len(steps) for _, steps, _ in signature) and signature in drawn_series:
            continue
        drawn_series.add(signature)
        fig, ax = plt.subplots(figsize=(5.2, 3.2), dpi=110)
        drawn = False
        for label, dirs in groups.items():
            series = [_series(records[d], key, phase) for d in dirs]
            series = [s for s in series if len(s[0])]
            if not series:
                continue
            common = sorted(set.intersection(*(set(s[0].tolist()) for s in series)))
            if not common:
                continue
            stacked = np.stack([[dict(zip(s[0].tolist(), s[1]))[c] for c in common] for s in series])
            mean = stacked.mean(0)
            ax.plot(common, mean, marker="o", ms=3, label=f"{label} (n={len(series)})")
            if len(series) > 1:  # 95% t-interval of the mean over the runs (sgcd_jax/stats.py)
                half = stats.t975(len(series) - 1) * stacked.std(0, ddof=1) / np.sqrt(len(series))
                ax.fill_between(common, mean - half, mean + half, alpha=0.2)
            drawn = True
        plt.close(fig) if not drawn else None
        if not drawn:
            continue
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"{phase}_{key.replace('/', '_')}.png"
        fig.savefig(os.path.join(out_dir, name))
        plt.close(fig)
        paths.append(name)
    return paths


def _colour(weight: float, scale: float) -> str:
    """Blue for w<1, white at 1, red for w>1; saturates at 1±scale."""
    x = float(np.clip((weight - 1.0) / max(scale, 1e-6), -1.0, 1.0))
    if x >= 0:
        return f"rgb(255,{int(255 * (1 - x))},{int(255 * (1 - x))})"
    return f"rgb({int(255 * (1 + x))},{int(255 * (1 + x))},255)"


def heatmap_html(sample: dict[str, Any]) -> str:
    weights = [w for w, m in zip(sample["weights"], sample["loss_mask"]) if m]
    scale = max(0.05, max((abs(w - 1) for w in weights), default=0.0))
    spans = []
    decisive = sample.get("decisive") or [0] * len(sample["tokens"])
    for token, mask, weight, marked in zip(sample["tokens"], sample["loss_mask"], sample["weights"], decisive):
        text = html.escape(token).replace("\n", "↵<br>")
        if mask:
            spans.append(f'<span class="tok{" dec" if marked else ""}" style="background:{_colour(weight, scale)}" '
                         f'title="w={weight:.3f}">{text}</span>')
        else:
            spans.append(f'<span class="ctx">{text}</span>')
    outcome = "success" if sample.get("reward", 0) > 0 else "failure"
    when = f"iteration {sample['iteration']} · " if sample.get("iteration") is not None else ""
    header = (f"<h3>{when}{outcome} — {html.escape(sample.get('title', ''))}</h3>"
              f"<p>reward={sample.get('reward', 0):.2f} "
              f"advantage={sample.get('advantage', 0):+.3f} · weight range "
              f"[{min(weights, default=1):.3f}, {max(weights, default=1):.3f}] · colour saturates at 1±{scale:.3f}</p>")
    reference = html.escape(sample.get("reference") or "(no credit reference: plain GRPO weights)")
    truth = html.escape(sample.get("truth") or "(the env reported no decisive step)")
    return (f'<div class="sample">{header}<div class="pair"><div class="traj">{"".join(spans)}</div>'
            f'<div class="ref"><b>credit reference</b><pre>{reference}</pre>'
            f'<b>ground truth (verifier): decisive step, underlined in the tokens</b><pre>{truth}</pre>'
            f'</div></div></div>')


LEGEND = ("<p class='legend'>Token colour = credit weight w of each generated token (the factor on its "
          "trajectory's advantage): <span style='background:rgb(255,120,120)'>&nbsp;red: w &gt; 1&nbsp;</span> "
          "more credit — more blame on a failure, more endorsement on a success; "
          "<span style='background:rgb(120,120,255)'>&nbsp;blue: w &lt; 1&nbsp;</span> less; white: w = 1; "
          "<span class='ctx'>grey text</span>: context (tool results, user, template), not trained. "
          "<span class='tok dec'>Underlined</span>: tokens of the step the env's verifier marks as decisive "
          "(failure: where it went wrong; success: the step that delivered the outcome). Good credit puts red "
          "on the underlined tokens.</p>")


def heatmap_pair_html(samples: Sequence[dict[str, Any]]) -> str:
    """Samples side by side (a success and a failure of one mixed group) under the colour legend."""
    cells = "".join(f'<div class="cell">{heatmap_html(s)}</div>' for s in samples)
    return f'{LEGEND}<div class="side">{cells}</div>'



def heatmap_png(sample: dict[str, Any], path: str) -> None:
    weights = np.asarray([w for w, m in zip(sample["weights"], sample["loss_mask"]) if m], dtype=float)
    if weights.size == 0:
        return
    width = 64
    rows = int(np.ceil(weights.size / width))
    grid = np.full(rows * width, np.nan)
    grid[:weights.size] = weights
    scale = max(0.05, float(np.nanmax(np.abs(weights - 1))))
    fig, ax = plt.subplots(figsize=(7, 1.0 + 0.25 * rows), dpi=110)
    image = ax.imshow(grid.reshape(rows, width), cmap="bwr", vmin=1 - scale, vmax=1 + scale, aspect="auto")
    ax.set_yticks([])
    decisive = [d for d, m in zip(sample.get("decisive") or [], sample["loss_mask"]) if m]
    for index in np.flatnonzero(np.asarray(decisive, bool)):  # ground-truth decisive tokens: boxed
        ax.add_patch(plt.Rectangle((index % width - 0.5, index // width - 0.5), 1, 1, fill=False, lw=0.8))
    outcome = "success" if sample.get("reward", 0) > 0 else "failure"
    when = f"iteration {sample['iteration']}, " if sample.get("iteration") is not None else ""
    ax.set_title(f"{when}{outcome} — {sample.get('title', '')}\ncredit weight per assistant token: red w>1, "
                 "blue w<1; boxed = the verifier's decisive step", fontsize=7)
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


STYLE = """body{font-family:sans-serif;margin:20px;max-width:1400px}
img{margin:4px;border:1px solid #ddd}.pair{display:flex;gap:12px}
.traj{flex:3;font-family:monospace;font-size:12px;line-height:1.6;border:1px solid #ccc;padding:6px;
max-height:420px;overflow:auto}.ref{flex:2;font-size:12px}.ref pre{white-space:pre-wrap;
background:#f6f6f6;padding:6px;max-height:400px;overflow:auto}.ctx{color:#888}.tok{color:#000}
.side{display:flex;gap:16px}.side .cell{flex:1;min-width:0}
.dec{border-bottom:3px solid #000}.legend{font-size:12px}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;font-size:12px}"""


def _mean_spread(values: list[float]) -> str:
    """"mean ± 95% t-interval (n runs)"; a single run is just its value (no "± 0.000")."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{stats.fmt_ci(values)} (n={len(values)})"


def _summary_table(groups: dict[str, list[str]]) -> str:
    rows = []
    for label, dirs in groups.items():
        finals = defaultdict(list)
        for d in dirs:
            records = read_metrics(d)
            for key, phase in (("success_rate", "eval"), ("success_rate", "train"),
                               ("state_change_success_rate", "eval"), ("state_change_success_rate", "train")):
                _, values = _series(records, key, phase)
                if len(values):
                    finals[f"{phase} {key} (final)"].append(values[-1])
        cells = " ".join(f"<td>{_mean_spread(v)}</td>" for v in finals.values())
        rows.append((label, list(finals), cells))
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0][1])
    body = "".join(f"<tr><td>{html.escape(label)}</td>{cells}</tr>" for label, _, cells in rows)
    return f"<table><tr><th>run</th>{head}</tr>{body}</table>"


def build_report(run_dirs: Sequence[str], out_dir: str | None = None,
                 groups: dict[str, list[str]] | None = None) -> str:
    """Write report.html (+ PNGs) into ``out_dir`` (default: the first run dir); return its path."""
    out_dir = out_dir or run_dirs[0]
    os.makedirs(out_dir, exist_ok=True)
    groups = groups or {_label(d): [d] for d in run_dirs}
    curves = plot_curves(run_dirs, out_dir, groups)
    parts = [f"<html><head><meta charset='utf-8'><title>sgcd_jax report</title><style>{STYLE}</style>"
             "</head><body><h1>sgcd_jax run report</h1>",
             f"<p>runs: {html.escape(', '.join(groups))}</p>", _summary_table(groups),
             "<h2>Learning curves</h2>", "".join(f'<img src="{p}" width="480">' for p in curves)]
    for d in run_dirs:
        path = os.path.join(d, SAMPLES_FILE)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            samples = json.load(f)
        parts.append(f"<h2>Token credit heatmaps — {html.escape(_label(d))}</h2>")
        parts.append(heatmap_pair_html(samples))
        for i, sample in enumerate(samples):
            png = f"heatmap_{_label(d)}_{i}.png"
            heatmap_png(sample, os.path.join(out_dir, png))
            if os.path.exists(os.path.join(out_dir, png)):
                parts.append(f'<img src="{png}" width="640">')
    parts.append("</body></html>")
    report_path = os.path.join(out_dir, "report.html")
    with open(report_path, "w") as f:
        f.write("\n".join(parts))
    return report_path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sgcd_jax.report", description="Render report.html from run dirs")
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    print(build_report(args.run_dirs, args.out))


if __name__ == "__main__":
    main()
