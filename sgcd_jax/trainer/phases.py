"""The phases ``trainer.Trainer`` runs: one RL iteration as rollout_phase (rollouts → rewards → sibling
selection → submit annotation) and update_phase (teacher contexts → score → advantages → credit →
store → update), the SFT warm-up, eval of the bare student, the KL reference. Host code only; the math
is jitted in ``scoring`` / ``train_step`` / ``losses``. Neighbours: ``teacher_context`` (annotation →
teacher prompts), ``batch_layout`` (rows over processes and devices), ``episode_summary`` (metrics and
report samples).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgcd_jax import integration
from sgcd_jax.parallel import distributed
from sgcd_jax.learner.batch_layout import (_check_same_shapes, any_process, local_mesh, padded_length,  # noqa: F401
                                   process_task_count, rows_multiple, to_mesh)
from sgcd_jax.config import TrainConfig
from sgcd_jax.credit import SelectionConfig, select_groups
from sgcd_jax.credit.localization import decisive_step_lists, trajectory_localization
from sgcd_jax.credit.selection import fill_mixed_groups
from sgcd_jax.data.tasks import TaskStream
from sgcd_jax.trainer import preemption, reading_demos, sft_cache
from sgcd_jax.trainer.episode_summary import episode_metrics, report_samples, write_samples  # noqa: F401
from sgcd_jax.losses.advantages import AdvantageBatch, AdvantageConfig
from sgcd_jax.losses.credit import CreditBatch, CreditConfig
from sgcd_jax.losses.registry import get
from sgcd_jax.losses.vocab import VocabConfig
from sgcd_jax.rollout.trajectory import Trajectory
from sgcd_jax.learner.scoring import ScoreSpec, pack, score, score_micro_rows
from sgcd_jax.data.store import RolloutStore
from sgcd_jax.trainer.teacher_context import (build_annotation_queue, sibling_teacher, submit_annotation,  # noqa: F401
                                      teacher_prompts)
from sgcd_jax.learner.train_step import Learner, StepInputs, StepSpec, make_optimizer

ChatAdapter = integration.ChatAdapter
build_env = integration.build_env
build_model = integration.build_model
export = integration.export_model


@dataclasses.dataclass
class Counters:
    """Monotone counts that survive resume (saved in checkpoint meta)."""

    updates: int = 0
    skipped_updates: int = 0
    episodes: int = 0
    env_errors: int = 0
    annotation_fallbacks: int = 0
    groups_without_reference: int = 0
    sft_steps: int = 0
    annotation: dict = dataclasses.field(default_factory=dict)  # AnnotatorStats.state() as of the last save

    def as_metrics(self) -> dict[str, float]:
        return {f"count/{k}": float(v) for k, v in dataclasses.asdict(self).items() if not isinstance(v, dict)}

    def attach(self, stats) -> None:
        """Resume ``stats`` (the annotation queue's AnnotatorStats) from these counters; saved with them."""
        stats.load(self.annotation)
        self._annotation_stats = stats

    def snapshot(self) -> dict[str, Any]:
        if getattr(self, "_annotation_stats", None) is not None:
            self.annotation = self._annotation_stats.state()
        return dataclasses.asdict(self)


def meta(iteration: int, stream: TaskStream, counters: Counters, best_eval: float) -> dict[str, Any]:
    return {"iteration": iteration, "data": stream.get_state(), "counters": counters.snapshot(),
            "best_eval": best_eval}


def frozen_copy(model: nnx.Module) -> nnx.Module:
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


# ----------------------------------------------------------------------------- configs → the jitted update
def vocab_config(config: TrainConfig) -> VocabConfig:
    """Logprobs as the sampler drew them: logits / rollout.temperature (greedy rollouts: 1), as verl's
    actor does, so the scoring pass's π_old equals the sampler's log-probs and the PPO ratio is 1 on
    the first epoch at any temperature."""
    temperature = config.rollout.temperature if config.rollout.temperature > 0 else 1.0
    return VocabConfig(chunk_size=config.loss.vocab_chunk, temperature=temperature)


def step_spec(config: TrainConfig) -> StepSpec:
    return StepSpec(policy=config.policy, vocab=vocab_config(config), micro_batch_size=config.optim.micro_batch_size,
                    policy_fn=config.loss.policy, aux=config.loss.aux, distill=config.distill,
                    master_dtype=config.optim.master_dtype)


@functools.partial(jax.jit, static_argnames=("cfg", "name"))
def _advantages(rewards, group_ids, valid, cfg: AdvantageConfig, name: str):
    return get(f"advantage/{name}")(AdvantageBatch(rewards=rewards, group_ids=group_ids, valid=valid), cfg)


@jax.jit
def _masked_mean(values, mask):
    return (values * mask).sum() / jnp.maximum(mask.sum(), 1.0)


@functools.partial(jax.jit, static_argnames=("cfg", "name"))
def _credit(batch: CreditBatch, cfg: CreditConfig, step, name: str):
    return get(f"credit/{name}")(batch, cfg, step)


# ----------------------------------------------------------------------------- one iteration
def open_rollout_store(config: TrainConfig) -> RolloutStore | None:
    """This process's sub-store under ``run_dir/rollouts`` (None when ``run.store_rollouts`` is off)."""
    if not config.run.store_rollouts:
        return None
    return RolloutStore(f"{config.run_dir}/rollouts", jax.process_index())


def store_iteration(store: RolloutStore, iteration: int, trajectories: Sequence[Trajectory], batch,
                    features: dict, teacher_logprobs, reverse_kl, credit, advantages, rewards: np.ndarray,
                    config: TrainConfig) -> None:
    """Append one scored iteration: exactly the arrays the credit function saw (so
    ``python -m sgcd_jax.rescore --require_exact`` reproduces the weights) plus tokens and rewards.
    An iteration already stored (a resumed run re-running the iteration it crashed in) is skipped:
    exact resume recomputes the same values."""
    if iteration in store.iterations:
        return
    n = len(trajectories)
    h = lambda x: distributed.local_rows(x)[:n]  # noqa: E731  this process's rows [n, ...]
    rows = int(batch.tokens.shape[0])  # global rows: the shape the credit function ran on
    tokens = {"token_ids": h(batch.tokens)[:, 1:], "loss_mask": h(batch.target_mask), "step_ids": h(batch.step_ids),
              "sampler_logprobs": h(batch.sampler_logprobs), "student_logprobs": h(features["student_logprobs"]),
              "teacher_logprobs": h(teacher_logprobs), "reverse_kl": h(reverse_kl),
              "entropy": h(features["student_entropy"]), "credit_weights": h(credit.weights),
              "token_advantages": h(credit.token_advantages)}
    store.append(iteration, task_ids=[t.task_id for t in trajectories], group_ids=[t.group_id for t in trajectories],
                 lengths=h(batch.token_mask)[:, 1:].sum(1), tokens=tokens, rewards=rewards[:n],
                 advantages=h(advantages.advantages),
                 prompt_lens=[t.prompt_len for t in trajectories],
                 sample_indices=[t.sample_index for t in trajectories],
                 attrs={"credit_fn": f"credit/{config.loss.credit}",
                        "credit_config": dataclasses.asdict(config.credit), "step": iteration,
                        "decisive_steps": decisive_step_lists(trajectories),
                        "padded_rows": rows})


def score_and_update(trajectories: list[Trajectory], prompts: Sequence[np.ndarray | None], learner: Learner,
                     ref_model, config: TrainConfig, iteration: int, pad_id: int,
                     store: RolloutStore | None = None, sampler_is_old: bool = False) -> tuple[dict, dict]:
    """Pack → jitted score pass → advantages → credit weights → (store) → jitted update. Returns
    metrics and per-row host arrays (weights, advantages) for the report.

    ``sampler_is_old``: the samples came from an earlier policy than the one being updated (the
    one-step-delayed pipeline), so the PPO ratio's π_old is the sampler's log-probs stored in the
    trajectories, not the current policy's scoring pass."""
    timings = {}
    start = time.perf_counter()
    micro = config.optim.micro_batch_size
    length = padded_length(trajectories, config)  # the batch's longest row, bucketed; not the budget
    teacher_length = length + (config.annotation.reference_tokens if config.loss.needs_teacher else 0)
    # Every process packs to the same shapes (its share of the rows; lengths fixed by the config).
    host_batch = pack(trajectories, prompts, rows_multiple=rows_multiple(learner, micro), pad_id=pad_id,
                      min_rows=process_task_count(config) * config.rollout.group_size,
                      min_length=length, min_teacher_length=teacher_length)
    _check_same_shapes(host_batch)
    batch = to_mesh(host_batch, learner)
    multi_device = learner.mesh is not None and learner.mesh.size > 1  # results resharded to the batch layout
    needs_teacher = config.loss.needs_teacher and any_process(any(p is not None for p in prompts))
    spec = ScoreSpec(vocab=vocab_config(config), with_teacher=needs_teacher,
                     with_reference=config.needs_reference,  # no reference: skip it
                     student_micro_rows=score_micro_rows(config.optim.score_micro_batch_size, host_batch.tokens.shape[0]))
    features = score(learner.model(), ref_model, batch, spec)
    if multi_device:  # the batch layout, whatever score returned
        features = distributed.shard_rows_on_mesh(features, learner.mesh)
    jax.block_until_ready(features)
    timings["time/score_s"] = time.perf_counter() - start

    start = time.perf_counter()
    rows = host_batch.tokens.shape[0]  # this process's rows
    rewards = np.zeros(rows, np.float32)
    rewards[:len(trajectories)] = [t.reward for t in trajectories]
    # Job-wide unique ids: process p owns [p*rows, (p+1)*rows); a group is named by its first row,
    # a padding row by itself (a singleton group).
    first_row = {}
    for i, traj in enumerate(trajectories):
        first_row.setdefault(traj.group_id, i)
    group_ids = np.arange(rows, dtype=np.int32)
    group_ids[:len(trajectories)] = [first_row[t.group_id] for t in trajectories]
    group_ids += jax.process_index() * rows
    advantages = _advantages(to_mesh(rewards, learner), to_mesh(group_ids, learner), batch.row_valid > 0,
                             config.advantage, config.loss.advantage)
    if multi_device:
        advantages = advantages.replace(advantages=distributed.shard_rows_on_mesh(advantages.advantages, learner.mesh))
    teacher_logprobs = features.get("teacher_logprobs", features["student_logprobs"])
    reverse_kl = features.get("reverse_kl", jnp.zeros_like(batch.target_mask))  # no teacher: q_T = p_S, KL = 0
    credit_batch = CreditBatch(advantages=advantages.advantages, student_logprobs=features["student_logprobs"],
                               teacher_logprobs=teacher_logprobs, loss_mask=batch.target_mask,
                               step_ids=batch.step_ids, reverse_kl=reverse_kl, entropy=features.get("student_entropy"))
    if multi_device:
        # Credit on replicated inputs (cheap elementwise math): the one-device program, so rescore
        # reproduces the weights bitwise; then sliced back to the batch layout for the update.
        credit = _credit(distributed.replicate_on_mesh(credit_batch, learner.mesh), config.credit,
                         iteration, config.loss.credit)
        credit = credit.replace(weights=distributed.shard_rows_on_mesh(credit.weights, learner.mesh),
                                token_advantages=distributed.shard_rows_on_mesh(credit.token_advantages,
                                                                                learner.mesh))
    else:
        credit = _credit(credit_batch, config.credit, iteration, config.loss.credit)
    if store is not None and trajectories:
        start_store = time.perf_counter()
        store_iteration(store, iteration, trajectories, batch, features, teacher_logprobs, reverse_kl, credit,
                        advantages, rewards, config)
        timings["time/store_s"] = time.perf_counter() - start_store
    inputs = StepInputs(batch=batch, token_advantages=credit.token_advantages,
                        old_logprobs=batch.sampler_logprobs if sampler_is_old else features["student_logprobs"],
                        ref_logprobs=features.get("ref_logprobs", jnp.zeros_like(batch.target_mask)),
                        teacher_logprobs=teacher_logprobs)
    metrics = {k: float(v) for k, v in jax.device_get({**advantages.metrics, **credit.metrics}).items()}
    for _ in range(config.optim.updates_per_iteration):  # PPO epochs over the same scored batch
        metrics.update(learner.update(inputs))
    timings["time/update_s"] = time.perf_counter() - start
    mask = batch.target_mask  # job-wide means below (replicated scalars)
    metrics["entropy"] = float(_masked_mean(features["student_entropy"], mask))
    if needs_teacher:
        metrics["teacher/log_ratio_mean"] = float(_masked_mean(teacher_logprobs - features["student_logprobs"], mask))
        metrics["teacher/reverse_kl_mean"] = float(_masked_mean(features["reverse_kl"], mask))
    host = {"weights": distributed.local_rows(credit.weights),
            "advantages": distributed.local_rows(advantages.advantages), "target_mask": host_batch.target_mask,
            "step_ids": host_batch.step_ids,
            **({"log_ratio": distributed.local_rows(teacher_logprobs - features["student_logprobs"])}
               if needs_teacher else {})}
    return {**metrics, **timings}, host


@dataclasses.dataclass
class Rolled:
    """An iteration between its rollout and its update: trajectories, selected groups, the
    annotation already submitted to the queue, and the rollout-side metrics."""

    index: int
    tasks: list
    groups: list
    kept: list[Trajectory]
    metrics: dict[str, float]
    submitted: list[str] | None
    started: float
    updates_at_rollout: int  # counters.updates when sampled: differs at update time ⇒ off-policy by a step


def rollout_phase(index: int, learner: Learner, stream: TaskStream, env_factory, chat, annotator, rng: jax.Array,
                  config: TrainConfig, counters: Counters) -> Rolled:
    """Rollouts (G siblings per task) → verifier rewards → sibling selection → submit annotation."""
    started = time.perf_counter()
    share = process_task_count(config)
    tasks = stream.next_tasks(share)
    # Slot j of process p is slot j*P + p of the job-wide batch: the one-process run's task order.
    slots = [j * jax.process_count() + jax.process_index() for j in range(share)]
    start = time.perf_counter()
    trajectories = integration.rollout(learner.local_model(), chat, env_factory, tasks, config.rollout.group_size,
                                       rng, config, task_slots=slots, mesh=local_mesh(learner))
    rollout_s = time.perf_counter() - start
    counters.episodes += len(trajectories) * jax.process_count()  # every process rolls out as many
    counters.env_errors += sum(t.termination in ("error", "env_error", "env_timeout") for t in trajectories)
    selection_config = SelectionConfig(success_threshold=config.annotation.success_threshold,
                                       non_mixed=config.annotation.non_mixed_groups)
    selection = select_groups(trajectories, selection_config)
    groups = selection.mixed + selection.grpo
    oversampling: dict[str, float] = {}
    if config.annotation.max_oversample_rounds > 0:  # dynamic sampling: more rounds until `share` groups are mixed

        def draw(round_index: int) -> list[Trajectory]:
            more_tasks = stream.next_tasks(share)
            tasks.extend(more_tasks)
            more = integration.rollout(learner.local_model(), chat, env_factory, more_tasks, config.rollout.group_size,
                                       rng, config, task_slots=[s + round_index * share * jax.process_count() for s in slots],
                                       mesh=local_mesh(learner))
            for traj in more:  # a task drawn twice in one iteration must not merge two groups
                traj.group_id = f"{traj.group_id}/round{round_index}"
            return more

        groups, trajectories, oversampling = fill_mixed_groups(selection, share, config.annotation.max_oversample_rounds,
                                                               draw, selection_config)
        rollout_s = time.perf_counter() - start
        counters.episodes += (len(trajectories) - share * config.rollout.group_size) * jax.process_count()
    kept = [t for g in groups for t in g.trajectories]
    metrics = {**episode_metrics(trajectories, config.annotation.success_threshold), **selection.stats.as_metrics(),
               **oversampling, "time/rollout_s": rollout_s,
               "rollout/compiles": max((t.timing.get("engine_compiles", 0.0) for t in trajectories), default=0.0),
               "throughput/rollout_tokens_per_s": sum(int(t.loss_mask.sum()) for t in trajectories) / max(rollout_s, 1e-9)}
    submitted = submit_annotation(groups, config, annotator) if kept else None
    return Rolled(index, tasks, groups, kept, metrics, submitted, started, counters.updates)


def update_phase(rolled: Rolled, learner: Learner, ref_model, env_factory, chat, annotator, config: TrainConfig,
                 counters: Counters, store: RolloutStore | None = None,
                 sampler_is_old: bool = False) -> tuple[dict, list]:
    """Collect annotation → teacher contexts → score → credit → update; returns (metrics, samples)."""
    metrics = dict(rolled.metrics)
    samples: list = []
    update_started = time.perf_counter()
    kept = rolled.kept
    if any_process(bool(kept)):  # every process joins the update, with no rows if it kept none
        prompts: list = [None] * len(kept)
        references: dict = {}
        if config.loss.needs_teacher:
            start = time.perf_counter()
            tools_by_task = {t.task_id: chat.tools_for(env_factory, t) for t in rolled.tasks}
            prompts, annotation_metrics, references = teacher_prompts(kept, rolled.groups, config, annotator, chat,
                                                                      counters, tools_by_task, rolled.submitted)
            metrics.update(annotation_metrics)
            metrics["time/teacher_context_s"] = time.perf_counter() - start
        update_metrics, host = score_and_update(kept, prompts, learner, ref_model, config, rolled.index, chat.pad_id,
                                               store, sampler_is_old)
        counters.updates += 1
        counters.skipped_updates += int(update_metrics.get("skipped", 0) > 0)
        metrics.update(update_metrics)
        metrics.update(trajectory_localization(kept, host))  # credit vs the env's decisive steps
        # labelled with the step its metrics are logged at (train.py logs update index i as step i + 1)
        samples = report_samples(kept, host, references, chat, iteration=rolled.index + 1)
    metrics["time/update_phase_s"] = time.perf_counter() - update_started
    return metrics, samples


# ----------------------------------------------------------------------------- SFT warm-up and eval
def run_sft(learner: Learner, env_factory, chat, config: TrainConfig, progress) -> dict[str, float]:
    """Supervised warm-up on oracle demonstrations with its own AdamW. It runs before RL, so the RL
    optimizer state is still fresh: freed for the warm-up (one AdamW state alive, not two: SmolLM2's
    moments are 1 GB) and re-initialised after."""
    demos = integration.demonstrations(env_factory, chat, config)
    if not demos:
        raise ValueError(f"no oracle demonstration fits rollout.max_total_tokens={config.rollout.max_total_tokens}: "
                         "raise it or sft.num_demos")
    learner.opt_state = None
    sft = Learner(learner.model(), make_optimizer(config.optim, config.sft.steps, config.sft.learning_rate, trainable=""),
                  dataclasses.replace(learner.spec, sft=True, aux=(),  # NLL of the untempered policy
                                      vocab=dataclasses.replace(learner.spec.vocab, temperature=1.0),
                                      micro_batch_size=min(config.sft.batch_size, config.optim.micro_batch_size)),
                  mesh=learner.mesh)
    # Every process packs the same demonstrations; rows padded so they split over the batch shards.
    sft_rows = rows_multiple(learner, sft.spec.micro_batch_size) * jax.process_count()
    reading = reading_demos.reading_demonstrations(env_factory, chat, config)  # rows that teach reading a reference
    orders = (np.random.default_rng(config.run.seed).permutation(len(demos)),
              np.random.default_rng([config.run.seed, 1]).permutation(len(reading)))
    length = max(len(d.token_ids) for d in demos + reading)  # one padded shape (one compile), no wider than the rows
    progress.phase("sft", config.sft.steps)
    nll = []
    first_step = sft_cache.restore_partial(sft, config)  # a warm-up stopped by a signal resumes where it stopped
    for step in range(first_step, config.sft.steps):
        if preemption.agreed():  # SIGTERM/SIGINT: save the warm-up's state, stop (train.main exits 75)
            sft_cache.save_partial(sft, step, config)
            raise preemption.Preempted(f"SFT warm-up stopped before step {step}/{config.sft.steps}, its state saved")
        take = reading_demos.sft_batch(step, demos, reading, config, orders)
        batch = to_mesh(pack(take, rows_multiple=sft_rows, pad_id=chat.pad_id,
                             min_length=length), sft, same_on_every_process=True)
        zeros = jnp.zeros_like(batch.target_mask)
        nll.append(sft.update(StepInputs(batch, zeros, zeros, zeros, zeros))["loss"])
        progress.advance("sft", step + 1, f"nll {nll[-1]:.3f}")
    learner.params = sft.params
    sft_cache.clear_partial(config)
    sft.opt_state = sft.master = None  # released now, whatever still references the SFT learner
    learner.reset_optimizer()
    return {"sft/nll_first": nll[0] if nll else 0.0, "sft/nll_last": nll[-1] if nll else 0.0,
            "sft/demos": float(len(demos)), "sft/reading_rows": float(len(reading))}


def evaluate_student(learner: Learner, env_factory, tasks, chat, config: TrainConfig) -> dict[str, float]:
    """The bare student on held-out tasks: plain prompt, no credit reference, no sibling evidence.
    Several processes: each evaluates its strided share on its own devices; task-weighted means."""
    start = time.perf_counter()
    count, index = jax.process_count(), jax.process_index()
    mine = list(tasks)[index::count]
    result = (integration.evaluate(learner.local_model(), chat, env_factory, mine, config,
                                   task_slots=list(range(index, len(tasks), count)), mesh=local_mesh(learner))
              if mine else {})
    if count > 1:
        result = distributed.weighted_mean_across_processes(result, weight=len(mine), name="eval")
    result["time/eval_s"] = time.perf_counter() - start
    return result


def reference_model(learner: Learner, checkpointer, config: TrainConfig) -> nnx.Module:
    """Frozen KL reference: the policy RL starts from (post-SFT). Saved once so resume is exact."""
    if checkpointer.has_reference():
        params = checkpointer.restore_reference(learner.params)
    else:
        params = jax.tree.map(jnp.copy, learner.params)
        checkpointer.save_reference(params)
    return nnx.merge(learner.graphdef, params, learner.rest)
