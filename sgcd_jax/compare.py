"""``python -m sgcd_jax.compare [--methods grpo grpo_kl sdpo sgcd] [--seeds 0 1 2] [--out runs/compare]
[--config.key=value …]`` — the same budget for each method × seed (each run a subprocess of
``sgcd_jax.train``), then one report with mean ± min/max curves per method: success rate and the
rate of successful state-changing tool calls. Every method of a seed starts RL from the same post-SFT
policy: the warm-up runs once per seed and is restored from ``<out>/sft_cache`` (``sft.cache_dir``)
by the other methods.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Sequence

from sgcd_jax.config_files import configs_dir
from sgcd_jax.metrics_log import read_metrics
from sgcd_jax.report import build_report


def main(argv: Sequence[str] | None = None) -> None:
    methods = sorted(os.path.splitext(f)[0] for f in os.listdir(configs_dir()) if f.endswith(".py"))
    parser = argparse.ArgumentParser(prog="python -m sgcd_jax.compare", description=__doc__.split("\n\n")[0],
                                     epilog="any other --config.a.b=value is passed to every run")
    parser.add_argument("--methods", nargs="+", default=["grpo", "grpo_kl", "sdpo", "sgcd"], choices=methods,
                        metavar="METHOD", help=f"config names under configs/: {', '.join(methods)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="runs/compare")
    args, overrides = parser.parse_known_args(argv)
    if not any(o.startswith("--config.sft.cache_dir") for o in overrides):
        overrides.append(f"--config.sft.cache_dir={os.path.abspath(os.path.join(args.out, 'sft_cache'))}")
    groups: dict[str, list[str]] = {}
    timings = {}
    for method in args.methods:
        for seed in args.seeds:
            name = f"{method}_s{seed}"
            run_dir = os.path.join(args.out, name)
            command = [sys.executable, "-m", "sgcd_jax.train", f"--config={configs_dir()}/{method}.py",
                       f"--config.run.name={name}", f"--config.run.workdir={args.out}", f"--config.run.seed={seed}",
                       "--config.run.report=False", "--config.run.progress=False", *overrides]
            started = time.time()
            print(f"[compare] {name}: {' '.join(command[3:])}", flush=True)
            subprocess.run(command, check=True)
            timings[name] = time.time() - started
            groups.setdefault(method, []).append(run_dir)
    report = build_report([d for ds in groups.values() for d in ds], args.out, groups)
    finals, rl_wall = {}, {}
    for method, dirs in groups.items():
        records = {d: read_metrics(d) for d in dirs}
        evals = [[r for r in recs if r["phase"] == "eval"] for recs in records.values()]
        finals[method] = {"final_eval_success": [e[-1].get("success_rate") for e in evals if e],
                          "final_eval_state_change_success": [e[-1].get("state_change_success_rate") for e in evals if e]}
        for d, recs in records.items():  # from the run's own records: a finished run started again is a no-op
            if recs:
                rl_wall[os.path.basename(d)] = round(recs[-1]["time"] - recs[0]["time"], 1)
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump({"finals": finals, "rl_wall_s": rl_wall, "process_wall_s": timings}, f, indent=2)
    print(json.dumps(finals, indent=2))
    print(f"report: {os.path.abspath(report)}")


if __name__ == "__main__":
    main()
