"""``python -m sgcd_jax.compare [--methods grpo grpo_kl rlsd sdpo sgcd] [--seeds 0 1 2 3 4] [--jobs 2]
[--out runs/compare] [--config.key=value …]`` — the same budget for each method × seed (each run a
subprocess of ``sgcd_jax.train``), then ``compare.md``: per method, held-out success at each eval step,
the area under the eval curve and the credit localization AUROC as mean ± 95% t-interval over seeds
(``sgcd_jax/stats.py``), and a report whose curves shade the same intervals. Every method of a seed
starts RL from the same post-SFT policy: the warm-up runs once per seed and is restored from
``<out>/sft_cache`` (``sft.cache_dir``) by the other methods.

``--merge earlier/compare.json …`` adds the run summaries of an earlier comparison (e.g. seeds 0-3 measured
before, seed 4 run now) to the table, the JSON and ``compare_eval_success.png`` (mean ± 95% interval per
eval step, drawn from the summaries, so merged runs need no run dir); a run measured now replaces a merged
one of the same name.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Sequence

from sgcd_jax import stats
from sgcd_jax.config_files import configs_dir
from sgcd_jax.metrics_log import read_metrics
from sgcd_jax.report import build_report


def _run_all(commands: dict[str, list[str]], first: set[str], jobs: int) -> dict[str, float]:
    """Run every command (``jobs`` at a time); the ``first`` ones (one per seed: they compute the seed's SFT
    warm-up into the shared cache) all finish before the others start, so no warm-up is computed twice."""
    timings: dict[str, float] = {}
    for wave in ([n for n in commands if n in first], [n for n in commands if n not in first]):
        running: dict[str, tuple[subprocess.Popen, float]] = {}
        queue = list(wave)
        while queue or running:
            while queue and len(running) < jobs:
                name = queue.pop(0)
                print(f"[compare] {name}: {' '.join(commands[name][3:])}", flush=True)
                running[name] = (subprocess.Popen(commands[name]), time.time())
            time.sleep(0.5)
            for name, (proc, started) in list(running.items()):
                if proc.poll() is not None:
                    del running[name]
                    timings[name] = time.time() - started
                    if proc.returncode != 0:
                        for other, _ in running.values():
                            other.terminate()
                        raise SystemExit(f"[compare] {name} failed with exit code {proc.returncode}")
    return timings


def main(argv: Sequence[str] | None = None) -> None:
    methods = sorted(os.path.splitext(f)[0] for f in os.listdir(configs_dir()) if f.endswith(".py"))
    parser = argparse.ArgumentParser(prog="python -m sgcd_jax.compare", description=__doc__.split("\n\n")[0],
                                     epilog="any other --config.a.b=value is passed to every run")
    parser.add_argument("--methods", nargs="+", default=["grpo", "grpo_kl", "rlsd", "sdpo", "sgcd"], choices=methods,
                        metavar="METHOD", help=f"config names under configs/: {', '.join(methods)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each is a separate process)")
    parser.add_argument("--table_only", action="store_true",
                        help="run nothing: tabulate and report the run dirs already under --out")
    parser.add_argument("--merge", nargs="+", default=[], metavar="COMPARE_JSON",
                        help="compare.json files of earlier comparisons whose runs join the table")
    args, overrides = parser.parse_known_args(argv)
    if not any(o.startswith("--config.sft.cache_dir") for o in overrides):
        overrides.append(f"--config.sft.cache_dir={os.path.abspath(os.path.join(args.out, 'sft_cache'))}")
    groups: dict[str, list[str]] = {}
    commands = {}
    for method in args.methods:
        for seed in args.seeds:
            name = f"{method}_s{seed}"
            commands[name] = [sys.executable, "-m", "sgcd_jax.train", f"--config={configs_dir()}/{method}.py",
                              f"--config.run.name={name}", f"--config.run.workdir={args.out}",
                              f"--config.run.seed={seed}", "--config.run.report=False", "--config.run.progress=False",
                              *overrides]
            groups.setdefault(method, []).append(os.path.join(args.out, name))
    if args.table_only:
        missing = [d for ds in groups.values() for d in ds if not read_metrics(d)]
        if missing:
            raise SystemExit(f"[compare] --table_only: no metrics in {missing}; run them first")
        timings = {}
    else:
        timings = _run_all(commands, {f"{args.methods[0]}_s{seed}" for seed in args.seeds}, max(1, args.jobs))
    report = build_report([d for ds in groups.values() for d in ds], args.out, groups)
    runs, rl_wall = merged_runs(args.merge, args.methods), {}
    for method, dirs in groups.items():
        for d in dirs:
            recs = read_metrics(d)
            runs.setdefault(method, {})[os.path.basename(d)] = stats.run_summary(recs, d)
            if recs:  # from the run's own records: a finished run started again is a no-op
                rl_wall[os.path.basename(d)] = round(recs[-1]["time"] - recs[0]["time"], 1)
    summaries = {m: [by_name[n] for n in sorted(by_name)] for m, by_name in runs.items()}
    header, rows = stats.comparison_table(summaries)
    table = stats.markdown(header, rows)
    seeds = sorted({int(n.rsplit("_s", 1)[1]) for by_name in runs.values() for n in by_name
                    if n.rsplit("_s", 1)[-1].isdigit()})
    with open(os.path.join(args.out, "compare.md"), "w") as f:
        f.write(f"Held-out success (greedy), mean ± 95% t-interval over seeds {seeds}\n\n{table}\n")
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump({"runs": runs, "rl_wall_s": rl_wall, "process_wall_s": timings,
                   "merged_from": [os.path.abspath(m) for m in args.merge]}, f, indent=2)
    plot_summaries(summaries, os.path.join(args.out, "compare_eval_success.png"))
    print(table)
    print(f"report: {os.path.abspath(report)}")


def merged_runs(paths: Sequence[str], methods: Sequence[str]) -> dict[str, dict[str, dict]]:
    """method → run name → summary, from earlier ``compare.json`` files (the methods asked for only)."""
    runs: dict[str, dict[str, dict]] = {}
    for path in paths:
        with open(path) as f:
            earlier = json.load(f).get("runs")
        if not isinstance(earlier, dict):
            raise SystemExit(f"[compare] --merge {path}: not a compare.json (no 'runs')")
        for method in methods:
            for name, summary in earlier.get(method, {}).items():  # JSON keys are strings: eval steps back to int
                summary = {**summary, "eval_success": {int(k): v for k, v in summary["eval_success"].items()}}
                runs.setdefault(method, {})[name] = summary
    return runs


def plot_summaries(summaries: dict[str, list[dict]], path: str) -> None:
    """Held-out success per eval step: each method's mean over its runs, shaded by the 95% t-interval."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, runs in summaries.items():
        steps = sorted({s for r in runs for s in r["eval_success"]})
        cis = [stats.mean_ci([r["eval_success"][s] for r in runs if s in r["eval_success"]]) for s in steps]
        mean = [m for m, _ in cis]
        half = [0.0 if h != h else h for _, h in cis]  # one run: no interval
        line, = ax.plot(steps, mean, marker="o", label=f"{method} (n={len(runs)})")
        ax.fill_between(steps, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)],
                        color=line.get_color(), alpha=0.15)
    ax.set_xlabel("RL iteration")
    ax.set_ylabel("held-out success (greedy)")
    ax.set_title("mean ± 95% t-interval over seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
