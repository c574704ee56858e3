"""One process of a local multi-process ``sgcd_jax.train.train`` run (tests/test_train_multihost.py).

    python tests/helpers/train_worker.py --workdir W --name N --process_id 0 --num_processes 2 \
        --port 12345 [--heartbeat_s 5] [--override key=json_value ...]

Joins the job with short timeouts (explicit coordinator 127.0.0.1:port), runs the real training loop
on the tiny config of tests/test_train_e2e.py plus the overrides, and prints one JSON line
``{"event": "done", ...}`` with the run summary. ``--num_processes 1`` runs without jax.distributed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))
from helpers.tiny_train import TINY_WORLD  # noqa: E402

# The tiny end-to-end config (as tests/test_train_e2e.py), on a data=2 x fsdp=4 mesh.
TINY = {**TINY_WORLD, "run.num_iterations": 2, "run.eval_every": 0, "run.checkpoint_every": 1, "run.report": False,
        "rollout.tasks_per_iteration": 4, "optim.micro_batch_size": 4, "sft.enabled": False, "eval.num_tasks": 2,
        "eval.at_start": False, "mesh.data": 2, "mesh.fsdp": 4, "mesh.tp": 1}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--process_id", type=int, default=0)
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--heartbeat_s", type=int, default=10)
    parser.add_argument("--override", action="append", default=[], help="key=json value")
    parser.add_argument("--mixed_rewards", action="store_true",
                        help="verifier passes every odd sibling of the tasks in even job-wide slots (a random tiny "
                             "policy never succeeds): those groups are mixed, so advantages, annotation, teacher and "
                             "credit are non-trivial; with 2 processes, process 1 (odd slots) has no credit "
                             "reference at all and must still join the teacher scoring pass")
    args = parser.parse_args()

    import jax

    from sgcd_jax.parallel import distributed
    from sgcd_jax.config_files import configs_dir, load_config_file
    from sgcd_jax.train import train

    if args.num_processes > 1:
        distributed.initialize(distributed.DistributedConfig(
            cluster="explicit", coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.num_processes,
            process_id=args.process_id, initialization_timeout_s=60, heartbeat_timeout_s=args.heartbeat_s,
            shutdown_timeout_s=10))
    if args.mixed_rewards:
        from sgcd_jax import integration

        rollout = integration.rollout

        def rollout_with_mixed_rewards(model, chat, env_factory, tasks, group_size, *a, **k):
            trajectories = rollout(model, chat, env_factory, tasks, group_size, *a, **k)
            slots = k.get("task_slots") or range(len(tasks))
            for i, traj in enumerate(trajectories):
                traj.reward = float(traj.sample_index % 2) if slots[i // group_size] % 2 == 0 else 0.0
            return trajectories

        integration.rollout = rollout_with_mixed_rewards
    overrides = dict(TINY, **{"run.workdir": args.workdir, "run.name": args.name})
    for item in args.override:
        key, value = item.split("=", 1)
        overrides[key] = json.loads(value)
    config = load_config_file(os.path.join(configs_dir(), "sgcd.py"), overrides)
    print(json.dumps({"event": "ready", "process": jax.process_index(), "devices": jax.device_count()}), flush=True)
    summary = train(config)
    print(json.dumps({"event": "done", "process": jax.process_index(), "iteration": summary["iteration"],
                      "eval": summary.get("eval", {})}), flush=True)


if __name__ == "__main__":
    main()
