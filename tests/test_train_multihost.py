"""The real training loop (``sgcd_jax.train.train``: SFT warm-up → rollout → selection → annotation →
score → credit → update → eval → checkpoint) on 2 local processes × 4 simulated CPU devices reaches
the parameters of 1 process × 8 devices, both on a (data=2, fsdp=4) mesh; killing a process makes
its peer exit with an error instead of hanging.

Workers: tests/helpers/train_worker.py (tiny config, every odd sibling rewarded so advantages,
annotation, teacher scoring and credit are non-trivial).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import multiproc  # noqa: E402

WORKER = str(Path(__file__).resolve().parent / "helpers" / "train_worker.py")
OVERRIDES = ["sft.enabled=true", "sft.steps=2", "sft.batch_size=2", "sft.num_demos=8",
             "optim.learning_rate=0.001"]


def worker_args(workdir: Path, name: str, heartbeat_s: int = 10, extra: tuple[str, ...] = ()) -> list[str]:
    args = [WORKER, "--workdir", str(workdir), "--name", name, "--mixed_rewards", "--heartbeat_s", str(heartbeat_s)]
    for item in (*OVERRIDES, *extra):
        args += ["--override", item]
    return args


def load_params(run_dir: Path, step: int) -> dict[str, np.ndarray]:
    """The params of checkpoint ``step`` as numpy, restored on this (8-device, 1-process) host."""
    import jax
    import orbax.checkpoint as ocp

    from sgcd_jax.sharding import path_to_str

    path = run_dir / "checkpoints" / str(step) / "state"
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path)
        tree = getattr(metadata, "item_metadata", metadata)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
        state = checkpointer.restore(path, target)
    return {path_to_str(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state["params"])}


def stored_rollouts(run_dir: Path) -> dict[tuple, dict[str, np.ndarray]]:
    """(iteration, task, sibling) → its stored tokens and credit weights, over every process's store."""
    from sgcd_jax.store import iter_segments

    out = {}
    for segment in iter_segments(run_dir / "rollouts", fields=("token_ids", "credit_weights")):
        for i, task in enumerate(segment.task_ids):
            n = int(segment.lengths[i])
            key = (segment.iteration, task, int(segment.trajectories["sample_index"][i]))
            out[key] = {"token_ids": segment.tokens["token_ids"][i, :n],
                        "credit_weights": segment.tokens["credit_weights"][i, :n]}
    return out


def train_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl") if '"train"' in line]


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory) -> Path:
    """The reference: 1 process × 8 devices; its trained domain tokenizer is reused by the other runs."""
    workdir = tmp_path_factory.mktemp("single")
    multiproc.run(worker_args(workdir, "run"), 1, 8, workdir, "single", timeout_s=240)
    return workdir / "run"


def seeded_run_dir(workdir: Path, reference: Path) -> Path:
    run_dir = workdir / "run"
    run_dir.mkdir(parents=True)
    shutil.copytree(reference / "tokenizer", run_dir / "tokenizer")  # skip re-training the same BPE
    return run_dir


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_processes_train_to_the_same_params_as_one(single_process_run, tmp_path):
    run_dir = seeded_run_dir(tmp_path, single_process_run)
    outputs = multiproc.run(worker_args(tmp_path, "run"), 2, 4, tmp_path, "pair", timeout_s=300)
    assert all('"event": "done"' in out and '"iteration": 2' in out for out in outputs)

    # Rollouts: every episode sampled the same tokens on whichever process ran it (per-episode keys).
    single, multi = stored_rollouts(single_process_run), stored_rollouts(run_dir)
    assert len(single) == 16 and sorted(single) == sorted(multi)  # 2 iterations x 4 tasks x 2 siblings
    for key in single:
        np.testing.assert_array_equal(multi[key]["token_ids"], single[key]["token_ids"], err_msg=str(key))
        np.testing.assert_allclose(multi[key]["credit_weights"], single[key]["credit_weights"], rtol=1e-5,
                                   atol=1e-6, err_msg=str(key))
    assert len(list((run_dir / "rollouts").glob("process_*"))) == 2  # one sub-store per process

    # Params after SFT + 2 RL updates: equal within fp32 reduction-order noise (Adam divides each
    # entry by its own magnitude, so near-zero gradient entries carry ~1e-6 differences).
    final_single, final_multi = load_params(single_process_run, 2), load_params(run_dir, 2)
    before = load_params(single_process_run, 1)
    assert sorted(final_single) == sorted(final_multi)
    diff = max(np.abs(final_single[k] - final_multi[k]).max() for k in final_single)
    moved = max(np.abs(final_single[k] - before[k]).max() for k in final_single)
    print(f"param max |1 process - 2 processes| = {diff:.3g}; last update moved params by {moved:.3g}")
    assert moved > 1e-4, "the RL update did not change the params"
    assert diff < 1e-5 and diff < moved / 20

    # Job-wide metrics (reduced across processes, logged by process 0) match the one-process run.
    for a, b in zip(train_records(single_process_run), train_records(run_dir), strict=True):
        for key in ("reward_mean", "grad_norm", "entropy", "credit/weight_mean", "count/episodes"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, err_msg=key)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killing_a_training_process_makes_its_peer_exit_with_an_error(single_process_run, tmp_path):
    heartbeat_s = 4
    run_dir = seeded_run_dir(tmp_path, single_process_run)
    for attempt in range(3):
        procs, logs = multiproc.spawn(worker_args(tmp_path, "run", heartbeat_s, ("run.num_iterations=50",)),
                                      2, 4, tmp_path, f"kill{attempt}")
        deadline = time.monotonic() + 200
        while (time.monotonic() < deadline and not (run_dir / "checkpoints" / "1").is_dir()
               and all(p.poll() is None for p in procs)):
            time.sleep(0.2)
        if (run_dir / "checkpoints" / "1").is_dir():
            break
        multiproc.stop(procs)
        text = "\n".join(log.read_text() for log in logs)
        if not any(m in text.lower() for m in multiproc.PORT_TAKEN) or attempt == 2:
            pytest.fail(f"the pair never finished its first iteration:\n{text[-4000:]}")
    try:
        procs[1].kill()  # mid-training: process 0 is in the loop with collectives ahead
        killed_at = time.monotonic()
        bound_s = heartbeat_s * 4 + 30
        try:
            procs[0].wait(timeout=bound_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"process 0 still running {bound_s}s after process 1 was killed")
        elapsed = time.monotonic() - killed_at
    finally:
        multiproc.stop(procs)
    survivor = logs[0].read_text()
    assert procs[0].returncode != 0, survivor[-3000:]
    assert elapsed < bound_s
    lowered = survivor.lower()
    assert ("heartbeat timeout" in lowered or "another task died" in lowered or "connection closed by peer" in lowered
            or "timed out" in lowered), survivor[-3000:]
