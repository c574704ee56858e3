"""Measure the 1-process vs 2-process parameter difference of
tests/test_train_multihost.py::test_two_processes_train_to_the_same_params_as_one under XLA CPU codegen
variations (the spread its tolerance must cover on other x86 CPUs).

    python tests/helpers/multihost_spread.py "" "--xla_cpu_max_isa=SSE4_2" "--xla_cpu_prefer_vector_width=128"

Each argument is extra XLA_FLAGS for every worker of one variant (1×8 reference and 2×4 stop/resume);
prints one JSON line per variant with the max |Δparam| at checkpoints 2 and 3 and the update size.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo: sgcd_jax
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import multiproc  # noqa: E402
from test_train_multihost import load_params, seeded_run_dir, worker_args  # noqa: E402

_base_env = multiproc.worker_env


def run_variant(flags: str) -> dict:
    multiproc.worker_env = lambda devices: {**_base_env(devices),
                                            "XLA_FLAGS": f"{_base_env(devices)['XLA_FLAGS']} {flags}".strip()}
    root = Path(tempfile.mkdtemp(prefix="spread_"))
    single_dir, pair_dir = root / "single", root / "pair"
    single_dir.mkdir()
    pair_dir.mkdir()
    multiproc.run(worker_args(single_dir, "run"), 1, 8, single_dir, "single", timeout_s=900)
    single = single_dir / "run"
    run_dir = seeded_run_dir(pair_dir, single)
    multiproc.run(worker_args(pair_dir, "run", extra=("run.stop_after_iterations=2",)), 2, 4, pair_dir, "pair",
                  timeout_s=900)
    multiproc.run(worker_args(pair_dir, "run"), 2, 4, pair_dir, "resumed", timeout_s=900)
    out = {"flags": flags}
    for step in (2, 3):
        a, b, before = load_params(single, step), load_params(run_dir, step), load_params(single, step - 1)
        out[f"diff_{step}"] = float(max(np.abs(a[k] - b[k]).max() for k in a))
        out[f"moved_{step}"] = float(max(np.abs(a[k] - before[k]).max() for k in a))
    return out


if __name__ == "__main__":
    for flags in sys.argv[1:] or [""]:
        print(json.dumps(run_variant(flags)), flush=True)
