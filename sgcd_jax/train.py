"""``python -m sgcd_jax.train [--config configs/x.py] [--config.key=value …]`` — the training loop.

One iteration (DESIGN.md): grain task stream → rollouts (G siblings per task) → verifier rewards →
sibling selection → annotation (async queue) → teacher contexts → one jitted scoring pass
(student, teacher-with-reference, optional reference logprobs, divergence features; chunked) →
group advantages → bounded detached credit weights → jitted train step → metrics. Periodic eval of
the bare student, orbax checkpoints (exact resume), report at the end. With no ``--config`` it runs
the quickstart (configs/quickstart.py).
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m sgcd_jax.train: SIGTERM/SIGINT are handled from the first line on
    from sgcd_jax import preemption as _early_preemption
    _early_preemption.install()

import os
import sys
import time
from typing import Any

import jax
import numpy as np

from sgcd_jax import config as config_lib
from sgcd_jax import distributed, preemption, sft_cache
from sgcd_jax import train_parts as parts
from sgcd_jax.checkpoint import TrainCheckpointer
from sgcd_jax.config import TrainConfig
from sgcd_jax.data import TaskStream
from sgcd_jax.metrics_log import MetricsLogger, Progress, read_metrics
from sgcd_jax.run_lock import RunDirLocked, locks_run_dir
from sgcd_jax.preemption import Preemption as _Preemption  # SIGTERM/SIGINT → finish the iteration, checkpoint, stop
from sgcd_jax.preemption import Preempted as _Preempted, agreed as _stop_agreed
from sgcd_jax.sharding import MeshConfig, make_mesh
from sgcd_jax.train_step import Learner, make_optimizer


class _NullLogger:
    """Metrics sink of non-main processes (only process 0 writes metrics files)."""

    def log(self, step: int, metrics: dict, phase: str = "train") -> None:  # noqa: ARG002
        pass

    def close(self) -> None:
        pass


@locks_run_dir  # a second run on the same run dir fails at once, naming the holder (sgcd_jax/run_lock.py)
def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training; returns a summary with the run dir, report path and final eval."""
    config_lib.preflight(config)  # environment-dependent config errors before any compute
    run_dir = config.run_dir
    process_index, process_count = jax.process_index(), jax.process_count()
    is_main = process_index == 0
    if is_main:
        config_lib.save_resolved(config, run_dir)
    progress = Progress(config.run.progress and is_main)

    # ---- world: env, tasks, model, tokenizer, chat renderer
    env_factory = parts.build_env(config.env)
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
    chat = parts.ChatRenderer(tokenizer)
    if _stop_agreed():  # signalled while the world was built: nothing to save yet
        raise _Preempted("stopped before training started (nothing to save yet)")

    total_updates = config.run.num_iterations * config.optim.updates_per_iteration
    # Params and optimizer state sharded on the mesh.* mesh; one SPMD update over all processes.
    mesh = make_mesh(MeshConfig(data=config.mesh.data, fsdp=config.mesh.fsdp, tp=config.mesh.tp))
    learner = Learner(model, make_optimizer(config.optim, total_updates), parts.step_spec(config), mesh=mesh)
    stream = TaskStream(train_tasks, seed=config.run.seed, process_index=process_index,
                        process_count=process_count)
    checkpointer = TrainCheckpointer(run_dir, keep=config.run.keep_checkpoints)
    rng = jax.random.key(config.run.seed)
    counters = parts.Counters()
    start_iteration, best_eval = 0, -1.0

    # ---- resume exactly, or start fresh (with the optional SFT warm-up)
    latest = checkpointer.latest_step() if config.run.resume else None
    saveable = lambda: {**learner.state(), "rng": _global_key(rng, mesh)}  # noqa: E731
    if latest is not None:
        latest, state, meta = checkpointer.restore_latest(saveable())  # a corrupt newest step → the previous intact one
        learner.load_state(state)
        rng = _local_key(state["rng"])
        stream.set_state(meta["data"])
        counters = parts.Counters(**meta["counters"])
        start_iteration, best_eval = int(meta["iteration"]), float(meta["best_eval"])
        progress.print(f"resumed from {checkpointer.directory} at iteration {start_iteration}")
    elif config.sft.enabled:
        sft_metrics = _warm_up(learner, env_factory, chat, config, progress)
        progress.print(f"SFT warm-up: {sft_metrics}")
    # KL reference = the policy RL starts from (after SFT), saved once so a resumed run uses the same one.
    ref_model = parts.reference_model(learner, checkpointer, config) if config.loss.needs_reference else None
    logger = (MetricsLogger(run_dir, tensorboard=config.run.tensorboard,
                            resume_step=start_iteration + 1 if latest is not None else None) if is_main else _NullLogger())
    if latest is None:
        if config.eval.at_start:  # the baseline the RL curve is read against
            logger.log(0, parts.evaluate_student(learner, env_factory, eval_tasks, chat, config), phase="eval")
        checkpointer.save(0, saveable(), parts.meta(0, stream, counters, best_eval),
                          force=True)

    annotator = parts.build_annotation_queue(config.credit, run_dir) if config.loss.needs_teacher else None
    if annotator is not None:
        counters.attach(annotator.stats)  # annotator/* totals continue across a resume
    store = parts.open_rollout_store(config)
    preemption = _Preemption()
    progress.phase("iterations", config.run.num_iterations)
    iteration = start_iteration
    eval_result: dict[str, float] = {}
    pipelined = _check_pipelining(config) and annotator is not None
    pending: parts.Rolled | None = None  # rolled out, annotation in flight, not yet scored/updated
    last_finish = time.perf_counter()

    def boundary(step: int) -> bool:
        """After update ``step`` the run evaluates / checkpoints / stops: nothing may be in flight."""
        return (step >= config.run.num_iterations or bool(config.run.checkpoint_every and step % config.run.checkpoint_every == 0)
                or bool(config.run.eval_every and step % config.run.eval_every == 0)
                or bool(config.run.stop_after_iterations and step - start_iteration >= config.run.stop_after_iterations))

    def roll(index: int) -> parts.Rolled:
        nonlocal rng
        rng, rollout_key = jax.random.split(rng)
        return parts.rollout_phase(index, learner, stream, env_factory, chat, annotator, rollout_key, config, counters)

    def finish(rolled: parts.Rolled) -> tuple[dict[str, float], list]:
        nonlocal iteration, last_finish
        metrics, samples = parts.update_phase(rolled, learner, ref_model, env_factory, chat, annotator, config,
                                              counters, store, sampler_is_old=counters.updates != rolled.updates_at_rollout)
        now = time.perf_counter()
        metrics["time/iteration_s"] = now - max(last_finish, rolled.started)
        last_finish = now
        iteration += 1
        return metrics, samples

    try:
        while iteration < config.run.num_iterations:
            if pending is None:
                pending = roll(iteration)
            ahead = None
            preempted = preemption.agreed()  # one SIGTERMed process stops them all, at the same point
            if pipelined and not boundary(iteration + 1) and not preempted:
                ahead = roll(iteration + 1)  # its annotation runs while `pending` is scored and updated
            metrics, samples = finish(pending)
            pending = ahead
            if process_count > 1:  # job-wide means over the keys any process logged
                metrics = distributed.reduce_metrics_union(metrics)
            if config.run.eval_every and iteration % config.run.eval_every == 0 and iteration < config.run.num_iterations:
                eval_result = parts.evaluate_student(learner, env_factory, eval_tasks, chat, config)
                logger.log(iteration, eval_result, phase="eval")
                if eval_result["success_rate"] > best_eval:
                    best_eval = eval_result["success_rate"]
                    checkpointer.save_best(iteration, saveable(),
                                           parts.meta(iteration, stream, counters, best_eval), best_eval)
            logger.log(iteration, {**metrics, **counters.as_metrics()})
            if samples and is_main:
                parts.write_samples(run_dir, samples)
            progress.advance("iterations", iteration,
                             f"success {metrics.get('success_rate', 0):.2f} loss {metrics.get('loss', 0):+.3f}")
            stop_now = preempted or preemption.agreed() or (config.run.stop_after_iterations and
                                                iteration - start_iteration >= config.run.stop_after_iterations)
            if stop_now and pending is not None:  # preempted with a batch in flight: drain it first
                metrics, samples = finish(pending)
                pending = None
                if process_count > 1:
                    metrics = distributed.reduce_metrics_union(metrics)
                logger.log(iteration, {**metrics, **counters.as_metrics()})
            if stop_now or (config.run.checkpoint_every and iteration % config.run.checkpoint_every == 0):
                checkpointer.save(iteration, saveable(),
                                  parts.meta(iteration, stream, counters, best_eval), force=True)
            if stop_now:
                progress.print(f"stopping at iteration {iteration} (checkpoint saved)")
                checkpointer.close()
                return {"run_dir": run_dir, "iteration": iteration, "preempted": True}
        # ---- final eval, checkpoint, export, report
        if latest is not None and start_iteration >= config.run.num_iterations:
            # a finished run started again: its final eval is on record; nothing to redo or re-log
            eval_result = _last_eval(run_dir)
            progress.print(f"already finished at iteration {start_iteration}")
        else:
            eval_result = parts.evaluate_student(learner, env_factory, eval_tasks, chat, config)
            logger.log(iteration, eval_result, phase="eval")
            checkpointer.save(iteration, saveable(),
                              parts.meta(iteration, stream, counters, best_eval), force=True)
            if eval_result["success_rate"] > best_eval:
                checkpointer.save_best(iteration, saveable(),
                                       parts.meta(iteration, stream, counters, eval_result["success_rate"]),
                                       eval_result["success_rate"])
        checkpointer.close()
    finally:
        preemption.restore()
        logger.close()
        progress.close()
        if annotator is not None:
            annotator.close(wait=False)
    summary = {"run_dir": run_dir, "iteration": iteration, "preempted": False, "eval": eval_result}
    if config.run.export_hf and is_main:  # local_model: whole on every process (replicated over data)
        summary["export_dir"] = parts.export(learner.local_model(), tokenizer, os.path.join(run_dir, "export"))
    if config.run.report and is_main:
        from sgcd_jax.report import build_report
        summary["report"] = build_report([run_dir])
    return summary


def _global_key(key: jax.Array, mesh) -> jax.Array:
    """The host loop's PRNG key as orbax saves it: replicated on the mesh when several processes
    save one checkpoint; unchanged for one process."""
    return distributed.replicated(key, mesh) if jax.process_count() > 1 else key


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
    """``credit.async_annotation``: iteration k's annotation runs during rollout k+1 and update k
    happens after it, so update k is one policy step off its samples; the PPO ratio then uses the
    sampler's log-probs, which are π_old for untruncated sampling at any temperature (the learner
    scores logits / rollout.temperature too), not under top-p / top-k truncation."""
    if not config.credit.async_annotation:
        return False
    if config.rollout.top_p < 1.0 or config.rollout.top_k > 0:
        raise config_lib.ConfigError(
            f"credit.async_annotation=True needs rollout.top_p=1 and rollout.top_k=0 (got "
            f"{config.rollout.top_p}, {config.rollout.top_k}): the delayed update uses the sampler's "
            "log-probs as π_old, which truncation changes. Set credit.async_annotation=False or sample untruncated.")
    return True


def parse_args(argv: list[str]) -> TrainConfig:
    """``--config path.py`` plus ``--config.a.b=value`` overrides (ml_collections config_flags)."""
    from absl import flags
    from ml_collections import config_flags

    flag_values = flags.FlagValues()
    default = os.path.join(config_lib.configs_dir(), "quickstart.py")
    try:
        config_flags.DEFINE_config_file("config", default, "experiment config file", flag_values=flag_values,
                                        sys_argv=list(argv), lock_config=True)
        flag_values(argv)
        config_dict = flag_values.config
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as err:
        overrides = [a for a in argv[1:] if a.startswith("--config")]
        raise config_lib.ConfigError(f"bad command line {overrides}: {err}. Keys and defaults: "
                                     "configs/base.py") from None
    return config_lib.from_config_dict(config_dict)


def main(argv: list[str] | None = None) -> None:
    preemption.install()  # from process start: a signal during config, compile or SFT is a clean stop too
    argv = sys.argv if argv is None else argv
    try:
        config = parse_args(argv)
    except config_lib.ConfigError as err:
        sys.exit(f"config error: {err}")
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
