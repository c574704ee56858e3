"""python -m sgcd_jax.bench iteration — SGCD vs GRPO wall time per RL iteration on the quickstart setting.

Both methods start from the SAME post-SFT parameters (one SFT warm-up, copied into each method's
learner), the same seed and task stream, and run ``--iterations`` RL iterations each, driven by
the trainer's own ``sgcd_jax.trainer.Trainer`` (``roll`` / ``finish``, as ``sgcd_jax.train`` drives it; SGCD with
``annotation.asynchronous`` on, so iteration k's annotation runs while rollout k+1 does). The two
methods' iterations are interleaved (GRPO i, SGCD i, GRPO i+1, ...) so both see the same machine
load on a shared CPU. The first ``--skip`` iterations of each (jit compiles, incl. SGCD's first
teacher passes) are left out of the medians. ``--cache DIR`` keeps the tokenizer and the post-SFT
params, so a second run (e.g. of another version of the code) starts from the same params without
the SFT (~2-4 min of the first run on 2 cores).

An iteration's time is what ``train.py`` logs as ``time/iteration_s``: from the start of the
iteration's work to the end of its update (pipelined SGCD: rollout k+1 + annotation wait + teacher
context + score + update k; GRPO: rollout k + score + update k). Rollout time depends on how long the
sampled episodes are, which differs between the two policies once they diverge (and the sampler
compiles new shapes as they appear), so the JSON also gives the ratio of the update-phase medians
(annotation wait + teacher context + score + update: where the methods' code differs) and the
iteration ratio at GRPO's rollout time. Iterations with no mixed group have no teacher forward; the
JSON counts how many measured iterations had one.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

PHASES = {"rollout": "time/rollout_s", "annotation_wait": "time/annotation_wait_s",
          "teacher_context": "time/teacher_context_s", "score": "time/score_s", "update": "time/update_s",
          "update_phase": "time/update_phase_s", "iteration": "time/iteration_s",
          "rollout_phases_in_iteration": "bench/rollout_phases_in_iteration_s",
          "update_phase_in_iteration": "bench/update_phase_in_iteration_s"}


class MethodRun:
    """One method's RL loop from given post-SFT params, one iteration per ``step()``: the trainer's own
    ``Trainer.roll`` / ``Trainer.finish`` in train.py's order, timed from when this method resumes."""

    def __init__(self, config, model, env_factory, chat, train_tasks):
        from sgcd_jax.trainer import phases as parts
        from sgcd_jax.data.tasks import TaskStream
        from sgcd_jax.learner.train_step import Learner, make_optimizer
        from sgcd_jax.trainer.trainer import Trainer

        total_updates = config.run.num_iterations * config.optim.updates_per_iteration
        learner = Learner(parts.frozen_copy(model), make_optimizer(config.optim, total_updates),
                          parts.step_spec(config))
        annotator = (parts.build_annotation_queue(config.annotation, config.run_dir)
                     if config.loss.needs_teacher else None)
        self.trainer = Trainer(config, learner, env_factory, chat, TaskStream(train_tasks, seed=config.run.seed),
                               rng=jax.random.key(config.run.seed), annotator=annotator)
        self.pipelined = config.annotation.asynchronous and annotator is not None
        self.pending = None
        self.index = 0

    def step(self) -> dict[str, float]:
        resumed = time.perf_counter()  # the other method ran since our last step: not our time
        rolls_s = 0.0
        if self.pending is None:
            self.pending = self.trainer.roll(self.index)
            rolls_s += time.perf_counter() - resumed
        ahead = None
        if self.pipelined:  # annotated while `pending` is scored and updated
            start = time.perf_counter()
            ahead = self.trainer.roll(self.index + 1)
            rolls_s += time.perf_counter() - start
        rolled = self.pending
        start = time.perf_counter()
        metrics, _ = self.trainer.finish(rolled)
        now = time.perf_counter()
        metrics["time/iteration_s"] = now - max(resumed, rolled.started)
        metrics["bench/rollout_phases_in_iteration_s"] = rolls_s  # rollout_phase calls inside this iteration
        metrics["bench/update_phase_in_iteration_s"] = now - start
        self.pending, self.index = ahead, self.index + 1
        return metrics

    def close(self) -> None:
        self.trainer.close()


def load(method: str, workdir: str, args) -> "TrainConfig":  # noqa: F821
    from sgcd_jax import config_files

    overrides = {"run.workdir": workdir, "run.name": "bench", "run.seed": args.seed,
                 "run.num_iterations": args.iterations, "sft.steps": args.sft_steps,
                 "run.store_rollouts": False}
    if method == "sgcd":
        overrides["annotation.asynchronous"] = True
    return config_files.load_config_file(os.path.join(config_files.configs_dir(), f"{method}.py"), overrides)


def summarize(history: list[dict[str, float]], skip: int) -> dict:
    measured = history[skip:]
    out = {name: float(np.median([m.get(key, 0.0) for m in measured])) for name, key in PHASES.items()}
    out["mixed_groups_per_iteration"] = [int(m.get("selection/mixed", 0)) for m in history]
    out["measured_iterations_with_mixed_groups"] = sum(m.get("selection/mixed", 0) > 0 for m in measured)
    out["iteration_s"] = [round(m["time/iteration_s"], 3) for m in history]
    out["score_s"] = [round(m.get("time/score_s", 0.0), 3) for m in history]
    out["rollout_s"] = [round(m.get("time/rollout_s", 0.0), 3) for m in history]
    out["turns_mean"] = float(np.median([m.get("turns_mean", 0.0) for m in measured]))
    out["response_tokens_mean"] = float(np.median([m.get("response_tokens_mean", 0.0) for m in measured]))
    out["annotator_mean_latency_s"] = history[-1].get("annotator/mean_latency_s", 0.0)
    out["success_rate_mean"] = float(np.mean([m.get("success_rate", 0.0) for m in history]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sgcd_jax.bench iteration")
    parser.add_argument("--iterations", type=int, default=16, help="RL iterations per method")
    parser.add_argument("--skip", type=int, default=4, help="first iterations left out (compiles)")
    parser.add_argument("--sft-steps", type=int, default=1000, help="SFT warm-up steps (quickstart: 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="", help="directory keeping the tokenizer and post-SFT params between "
                        "runs (e.g. to compare two versions of the code from the same params); '' = a temp dir")
    args = parser.parse_args(argv)
    if args.iterations <= args.skip:
        parser.error(f"--iterations {args.iterations} must exceed --skip {args.skip}")

    from sgcd_jax.trainer import phases as parts
    from sgcd_jax.metrics_log import Progress
    from sgcd_jax.learner.train_step import Learner, make_optimizer

    workdir = args.cache or tempfile.mkdtemp(prefix="bench_iteration_")
    configs = {m: load(m, workdir, args) for m in ("grpo", "sgcd")}
    base = configs["grpo"]
    started = time.perf_counter()
    env_factory = parts.build_env(base.env)
    train_tasks = env_factory.tasks(base.env.train_split)
    model, tokenizer = parts.build_model(base.model, seed=base.run.seed, run_dir=base.run_dir,
                                         env_factory=env_factory, train_split=base.env.train_split)
    chat = parts.ChatAdapter(tokenizer)
    sft_learner = Learner(model, make_optimizer(base.optim, 1), parts.step_spec(base))
    cached = os.path.join(workdir, f"post_sft_steps{args.sft_steps}_seed{args.seed}.npz")
    sft: dict = {}
    if args.cache and os.path.exists(cached):
        leaves, treedef = jax.tree.flatten(sft_learner.params)
        with np.load(cached) as saved:
            sft_learner.params = jax.tree.unflatten(treedef, [jnp.asarray(saved[f"p{i}"]) for i in range(len(leaves))])
        sft = {"sft/loaded_from": cached}
    elif args.sft_steps:
        sft = parts.run_sft(sft_learner, env_factory, chat, base, Progress(False))
        if args.cache:
            np.savez(cached, **{f"p{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(sft_learner.params))})
    sft_s = time.perf_counter() - started
    post_sft = sft_learner.model()

    runs = {m: MethodRun(c, post_sft, env_factory, chat, train_tasks) for m, c in configs.items()}
    history: dict[str, list] = {m: [] for m in runs}
    try:
        for _ in range(args.iterations):
            for method, run in runs.items():
                history[method].append(run.step())
    finally:
        for run in runs.values():
            run.close()
        if not args.cache:
            shutil.rmtree(workdir, ignore_errors=True)
    result = {"bench": "iteration", "config": "quickstart (configs/grpo.py vs configs/sgcd.py)",
              "iterations": args.iterations, "skipped": args.skip, "sft_steps": args.sft_steps, "seed": args.seed,
              "sft_s": round(sft_s, 1), "sft_nll_last": sft.get("sft/nll_last"),
              "sft_params_loaded_from": sft.get("sft/loaded_from"),
              "jax_backend": jax.default_backend(), "cpu_count": os.cpu_count(),
              "sgcd_async_annotation": configs["sgcd"].annotation.asynchronous}
    for method in runs:
        result[method] = summarize(history[method], args.skip)
    grpo, sgcd = result["grpo"], result["sgcd"]
    result["ratio_iteration_sgcd_over_grpo"] = round(sgcd["iteration"] / grpo["iteration"], 3)
    update_phase = lambda r: r["annotation_wait"] + r["teacher_context"] + r["score"] + r["update"]  # noqa: E731
    result["ratio_update_phase_sgcd_over_grpo"] = round(update_phase(sgcd) / update_phase(grpo), 3)
    # What the ratio would be if both sampled equally long episodes (rollout work depends on the policy).
    same = lambda r: grpo["rollout_phases_in_iteration"] + r["update_phase_in_iteration"]  # noqa: E731
    result["ratio_iteration_at_grpo_rollout_time"] = round(same(sgcd) / same(grpo), 3)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=1))
    return 0

