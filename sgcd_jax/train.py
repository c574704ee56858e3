"""``python -m sgcd_jax.train [--config configs/x.py] [--config.key=value …] [--dry_run]`` — the training loop.

One iteration (DESIGN.md): grain task stream → rollouts (G siblings per task) → verifier rewards →
sibling selection → annotation (async queue) → teacher contexts → one jitted scoring pass
(student, teacher-with-reference, optional reference logprobs, divergence features; chunked) →
group advantages → bounded detached credit weights → jitted train step → metrics. Periodic eval of
the bare student, orbax checkpoints (exact resume), report at the end. With no ``--config`` it runs
the quickstart (configs/quickstart.py).
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m sgcd_jax.train: SIGTERM/SIGINT are handled from the first line on
    from sgcd_jax.trainer import preemption as _early_preemption
    _early_preemption.install()

import os
import sys
import time
from typing import Any

import jax
import numpy as np

from sgcd_jax import config as config_lib
from sgcd_jax import cli
from sgcd_jax.parallel import distributed
from sgcd_jax.trainer import preemption, sft_cache
from sgcd_jax.trainer import phases as parts
from sgcd_jax.trainer.checkpoint import TrainCheckpointer
from sgcd_jax.config import TrainConfig
from sgcd_jax.data.tasks import TaskStream
from sgcd_jax.metrics_log import MetricsLogger, Progress, read_metrics
from sgcd_jax.parallel.sharding import MeshConfig, make_mesh
from sgcd_jax.preflight import check_environment, preflight
from sgcd_jax.learner.train_step import Learner, make_optimizer
from sgcd_jax.trainer.run_lock import RunDirLocked, locks_run_dir
from sgcd_jax.trainer.trainer import Trainer, due


class _NullLogger:
    """Metrics sink of non-main processes (only process 0 writes metrics files)."""

    def log(self, step: int, metrics: dict, phase: str = "train") -> None:  # noqa: ARG002
        pass

    def close(self) -> None:
        pass


@locks_run_dir  # a second run on the same run dir fails at once, naming the holder (trainer/run_lock.py)
def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training; returns a summary with the run dir, report path and final eval."""
    check_environment(config)  # environment-dependent config errors before any compute
    run_dir = config.run_dir
    process_index, process_count = jax.process_index(), jax.process_count()
    is_main = process_index == 0
    if is_main:
        config_lib.save_resolved(config, run_dir)
    progress = Progress(config.run.progress and is_main)

    # ---- world: env, tasks, model, tokenizer, chat renderer
    env_factory = parts.build_env(config.env)
    preflight(config, env_factory, log=progress.print)  # model source, secrets, token budget: before any compute
    train_tasks = env_factory.tasks(config.env.train_split)
    eval_tasks = env_factory.tasks(config.env.eval_split)[: config.eval.num_tasks]
    # Process 0 builds first (a domain tokenizer is trained and saved in the run dir); the others load it.
    barrier_s = distributed.resolve_config().barrier_timeout_s
    if process_count > 1 and not is_main:
        distributed.barrier("world-built", timeout_s=barrier_s)
    model, tokenizer = parts.build_model(config.model, seed=config.run.seed, run_dir=run_dir, env_factory=env_factory,
                                         train_split=config.env.train_split)
    if process_count > 1 and is_main:
        distributed.barrier("world-built", timeout_s=barrier_s)
    chat = parts.ChatAdapter(tokenizer)
    if preemption.agreed():  # signalled while the world was built: nothing to save yet
        raise preemption.Preempted("stopped before training started (nothing to save yet)")

    total_updates = config.run.num_iterations * config.optim.updates_per_iteration
    # Params and optimizer state sharded on the mesh.* mesh; one SPMD update over all processes.
    mesh = make_mesh(MeshConfig(data=config.mesh.data, fsdp=config.mesh.fsdp, tp=config.mesh.tp))
    learner = Learner(model, make_optimizer(config.optim, total_updates), parts.step_spec(config), mesh=mesh)
    stream = TaskStream(train_tasks, seed=config.run.seed, process_index=process_index,
                        process_count=process_count)
    trainer = Trainer(config, learner, env_factory, chat, stream, rng=jax.random.key(config.run.seed))
    checkpointer = TrainCheckpointer(run_dir, keep=config.run.keep_checkpoints)
    start_iteration, best_eval = 0, -1.0

    def save(step: int, best: float | None = None) -> None:
        """The one checkpoint write: the latest (``best`` None) or the best-by-eval one."""
        meta = parts.meta(step, stream, trainer.counters, best_eval if best is None else best)
        if best is None:
            checkpointer.save(step, trainer.state(mesh), meta, force=True)
        else:
            checkpointer.save_best(step, trainer.state(mesh), meta, best)

    # ---- resume exactly, or start fresh (with the optional SFT warm-up)
    latest = checkpointer.latest_step() if config.run.resume else None
    if latest is not None:
        latest, state, meta = checkpointer.restore_latest(trainer.state(mesh))  # a corrupt newest → previous intact
        learner.load_state(state)
        trainer.rng = _local_key(state["rng"])
        stream.set_state(meta["data"])
        trainer.counters = parts.Counters(**meta["counters"])
        start_iteration, best_eval = int(meta["iteration"]), float(meta["best_eval"])
        progress.print(f"resumed from {checkpointer.directory} at iteration {start_iteration}")
    elif config.sft.enabled:
        sft_metrics = _warm_up(learner, env_factory, chat, config, progress)
        progress.print(f"SFT warm-up: {sft_metrics}")
    # KL reference = the policy RL starts from (after SFT), saved once so a resumed run uses the same one.
    trainer.ref_model = parts.reference_model(learner, checkpointer, config) if config.needs_reference else None
    logger = (MetricsLogger(run_dir, tensorboard=config.run.tensorboard,
                            resume_step=start_iteration + 1 if latest is not None else None) if is_main else _NullLogger())
    if latest is None:
        if config.eval.at_start:  # the baseline the RL curve is read against
            logger.log(0, trainer.evaluate(eval_tasks), phase="eval")
        save(0)

    trainer.annotator = parts.build_annotation_queue(config.annotation, run_dir) if config.loss.needs_teacher else None
    if trainer.annotator is not None:
        trainer.counters.attach(trainer.annotator.stats)  # annotator/* totals continue across a resume
    trainer.store = parts.open_rollout_store(config)
    stop_signal = preemption.Preemption()  # SIGTERM/SIGINT → finish the iteration, checkpoint, stop
    progress.phase("iterations", config.run.num_iterations)
    run = config.run
    iteration = start_iteration
    eval_result: dict[str, float] = {}
    pipelined = _check_pipelining(config) and trainer.annotator is not None
    pending: parts.Rolled | None = None  # rolled out, annotation in flight, not yet scored/updated
    trainer.last_finish = time.perf_counter()

    def stop_requested(step: int) -> bool:
        return bool(run.stop_after_iterations and step - start_iteration >= run.stop_after_iterations)

    def boundary(step: int) -> bool:
        """After update ``step`` the run evaluates / checkpoints / stops: nothing may be in flight."""
        return (step >= run.num_iterations or due(step, run.checkpoint_every) or due(step, run.eval_every)
                or stop_requested(step))

    def log(step: int, metrics: dict[str, float], samples: list) -> None:
        if process_count > 1:  # job-wide means over the keys any process logged
            metrics = distributed.reduce_metrics_union(metrics)
        logger.log(step, {**metrics, **trainer.counters.as_metrics()})
        if samples and is_main:
            parts.write_samples(run_dir, samples)
        progress.advance("iterations", step,
                         f"success {metrics.get('success_rate', 0):.2f} loss {metrics.get('loss', 0):+.3f}")

    try:
        while iteration < run.num_iterations:
            # ---- rollout (and, pipelined, the next iteration's rollout while this one's annotation runs)
            pending = pending or trainer.roll(iteration)
            preempted = stop_signal.agreed()  # one SIGTERMed process stops them all, at the same point
            ahead = (trainer.roll(iteration + 1)
                     if pipelined and not boundary(iteration + 1) and not preempted else None)
            # ---- annotation → teacher contexts → score → credit → update
            metrics, samples = trainer.finish(pending)
            iteration, pending = iteration + 1, ahead
            # ---- eval, log, checkpoint, stop
            if due(iteration, run.eval_every) and iteration < run.num_iterations:
                eval_result = trainer.evaluate(eval_tasks)
                logger.log(iteration, eval_result, phase="eval")
                if eval_result["success_rate"] > best_eval:
                    best_eval = eval_result["success_rate"]
                    save(iteration, best=best_eval)
            log(iteration, metrics, samples)
            stop_now = preempted or stop_signal.agreed() or stop_requested(iteration)
            if stop_now and pending is not None:  # preempted with a batch in flight: drain it first
                metrics, _ = trainer.finish(pending)
                iteration, pending = iteration + 1, None
                log(iteration, metrics, [])
            if stop_now or due(iteration, run.checkpoint_every):
                save(iteration)
            if stop_now:
                progress.print(f"stopping at iteration {iteration} (checkpoint saved)")
                checkpointer.close()
                return {"run_dir": run_dir, "iteration": iteration, "preempted": True}
        # ---- final eval, checkpoint, export, report
        if latest is not None and start_iteration >= run.num_iterations:
            # a finished run started again: its final eval is on record; nothing to redo or re-log
            eval_result = _last_eval(run_dir)
            progress.print(f"already finished at iteration {start_iteration}")
        else:
            eval_result = trainer.evaluate(eval_tasks)
            logger.log(iteration, eval_result, phase="eval")
            save(iteration)
            if eval_result["success_rate"] > best_eval:
                save(iteration, best=eval_result["success_rate"])
        checkpointer.close()
    finally:
        stop_signal.restore()
        logger.close()
        progress.close()
        trainer.close()
    summary = {"run_dir": run_dir, "iteration": iteration, "preempted": False, "eval": eval_result}
    if run.export_hf and is_main:  # local_model: whole on every process (replicated over data)
        summary["export_dir"] = parts.export(learner.local_model(), tokenizer, os.path.join(run_dir, "export"))
    if run.report and is_main:
        from sgcd_jax.report import build_report
        summary["report"] = build_report([run_dir])
    return summary


def _local_key(key: jax.Array) -> jax.Array:
    """A restored key back on this process (rollout keys feed process-local computations)."""
    if jax.process_count() == 1:
        return key
    return jax.random.wrap_key_data(np.asarray(jax.random.key_data(key)), impl=jax.random.key_impl(key))


def _warm_up(learner: Learner, env_factory, chat, config: TrainConfig, progress: Progress) -> dict[str, float]:
    """The SFT warm-up, or (``sft.cache_dir``) an identical earlier one restored from the cache."""
    if not config.sft.cache_dir:
        return parts.run_sft(learner, env_factory, chat, config, progress)

    def compute():
        metrics = parts.run_sft(learner, env_factory, chat, config, progress)
        return learner.params, metrics

    key = sft_cache.cache_key(config, os.path.join(config.run_dir, "tokenizer"))
    learner.params, metrics = sft_cache.cached_sft(learner.params, key, config.sft.cache_dir, compute)
    return metrics


def _last_eval(run_dir: str) -> dict[str, float]:
    """The last eval record of a run (process 0 wrote it; empty where this process cannot read one)."""
    evals = [r for r in read_metrics(run_dir) if r.get("phase") == "eval"] if os.path.isdir(run_dir) else []
    if not evals:
        return {}
    return {k: v for k, v in evals[-1].items() if k not in ("step", "phase", "time")}


def _check_pipelining(config: TrainConfig) -> bool:
    """``annotation.asynchronous``: iteration k's annotation runs during rollout k+1 and update k
    happens after it, so update k is one policy step off its samples; the PPO ratio then uses the
    sampler's log-probs, which are π_old for untruncated sampling at any temperature (the learner
    scores logits / rollout.temperature too), not under top-p / top-k truncation."""
    if not config.annotation.asynchronous:
        return False
    if config.rollout.top_p < 1.0 or config.rollout.top_k > 0:
        raise config_lib.ConfigError(
            f"annotation.asynchronous=True needs rollout.top_p=1 and rollout.top_k=0 (got "
            f"{config.rollout.top_p}, {config.rollout.top_k}): the delayed update uses the sampler's "
            "log-probs as π_old, which truncation changes. Set annotation.asynchronous=False or sample untruncated.")
    return True


def parse_args(argv: list[str]) -> TrainConfig:
    """``--config path.py`` plus ``--config.a.b=value`` overrides (``sgcd_jax.cli``)."""
    return cli.parse_args(argv)[0]


def main(argv: list[str] | None = None) -> None:
    preemption.install()  # from process start: a signal during config, compile or SFT is a clean stop too
    argv = sys.argv if argv is None else argv
    config, dry_run = cli.parse_or_exit(argv)
    if dry_run:  # validated; nothing built
        print(cli.resolved_json(config))
        return
    distributed.initialize()  # no-op for one process; joins the job before any other JAX use
    started = time.time()
    try:
        summary = train(config)
    except RunDirLocked as err:
        sys.exit(f"error: {err}")
    except config_lib.ConfigError as err:
        sys.exit(f"config error: {err}")
    except preemption.Preempted as stop:  # e.g. during the SFT warm-up, its state saved
        print(f"preempted ({preemption.signal_name()}): {stop}; rerun the same command to resume", flush=True)
        sys.exit(preemption.EXIT_PREEMPTED)
    if summary.get("preempted") and preemption.requested():
        print(f"preempted ({preemption.signal_name()}) at iteration {summary['iteration']}: checkpoint saved in "
              f"{summary['run_dir']}; rerun the same command to resume", flush=True)
        sys.exit(preemption.EXIT_PREEMPTED)
    elapsed = time.time() - started
    print(f"done in {elapsed:.0f}s: run dir {summary['run_dir']}")
    if summary.get("report"):
        print(f"report: {os.path.abspath(summary['report'])}")



if __name__ == "__main__":
    main()
