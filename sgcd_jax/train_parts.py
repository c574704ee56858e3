"""The pieces ``train.py`` strings together: building the world from the config, one RL iteration,
the SFT warm-up, eval of the bare student, report samples. Host code only; the math is jitted in
``scoring`` / ``train_step`` / ``losses``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgcd_jax import distributed, integration, preemption, sft_cache
from sgcd_jax.config import ConfigError, CreditSpec, EnvSpec, LossSpec, ModelSpec, TrainConfig
from sgcd_jax.credit import (AnnotatorConfig, AsyncAnnotationQueue, SelectionConfig, build_annotator,
                             build_sdpo_teacher_batch, build_teacher_batch, select_groups)
from sgcd_jax.credit.selection import fill_mixed_groups, group_siblings
from sgcd_jax.credit.teacher import render_credit_text
from sgcd_jax.data import TaskStream
from sgcd_jax.losses.advantages import AdvantageBatch, AdvantageConfig, compute_advantages
from sgcd_jax.losses.credit import CreditBatch, CreditConfig, no_credit, sgcd_credit
from sgcd_jax.losses.distill import DistillConfig
from sgcd_jax.losses.policy import PolicyLossConfig
from sgcd_jax.losses.vocab import VocabConfig
from sgcd_jax.report import write_samples as _write_samples
from sgcd_jax.rollout.trajectory import Trajectory
from sgcd_jax.scoring import ScoreSpec, pack, score, to_device
from sgcd_jax.store import RolloutStore
from sgcd_jax.train_step import Learner, StepInputs, StepSpec, make_optimizer

ChatRenderer = integration.ChatAdapter
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


# ----------------------------------------------------------------------------- configs → loss objects
def policy_config(loss: LossSpec) -> PolicyLossConfig:
    return PolicyLossConfig(clip_low=loss.clip_low, clip_high=loss.clip_high,
                            dual_clip=loss.dual_clip if loss.dual_clip > 0 else None,
                            kl_coef=loss.kl_coef, kl_estimator=loss.kl_estimator,
                            entropy_coef=loss.entropy_coef, agg_mode=loss.aggregation)


def credit_config(loss: LossSpec) -> CreditConfig:
    low_pos, high_pos, low_neg, high_neg = (loss.eps_low_pos, loss.eps_high_pos, loss.eps_low_neg,
                                            loss.eps_high_neg)
    if not loss.bounded:  # the "no bounds" ablation: bounds so wide they never bind in practice
        low_pos = low_neg = 0.99
        high_pos = high_neg = 99.0
    return CreditConfig(beta_pos=loss.beta_pos, beta_neg=loss.beta_neg, eps_low_pos=low_pos,
                        eps_high_pos=high_pos, eps_low_neg=low_neg, eps_high_neg=high_neg, eta=loss.eta,
                        entropy_gate=loss.entropy_gate, entropy_threshold=loss.entropy_threshold,
                        granularity=loss.granularity, renormalize=loss.renormalize, lam=loss.credit_lambda,
                        lam_schedule=loss.lambda_schedule, lam_final=loss.lambda_final,
                        lam_decay_steps=loss.lambda_decay_steps)


def vocab_config(config: TrainConfig) -> VocabConfig:
    """Logprobs as the sampler drew them: logits / rollout.temperature (greedy rollouts: 1), as verl's
    actor does, so the scoring pass's π_old equals the sampler's log-probs and the PPO ratio is 1 on
    the first epoch at any temperature."""
    temperature = config.rollout.temperature if config.rollout.temperature > 0 else 1.0
    return VocabConfig(chunk_size=config.loss.vocab_chunk, temperature=temperature)


def step_spec(config: TrainConfig) -> StepSpec:
    loss = config.loss
    distill = (DistillConfig(mode=loss.sdpo_mode, coef=loss.sdpo_coef, agg_mode=loss.aggregation)
               if loss.sdpo_coef > 0 else None)
    return StepSpec(policy=policy_config(loss), vocab=vocab_config(config),
                    micro_batch_size=config.optim.micro_batch_size, distill=distill)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _advantages(rewards, group_ids, valid, cfg: AdvantageConfig):
    return compute_advantages(AdvantageBatch(rewards=rewards, group_ids=group_ids, valid=valid), cfg)


@jax.jit
def _masked_mean(values, mask):
    return (values * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def process_task_count(config: TrainConfig) -> int:
    """Tasks this process rolls out per iteration: its equal share of ``rollout.tasks_per_iteration``."""
    count = jax.process_count()
    if config.rollout.tasks_per_iteration % count:
        raise ConfigError(f"rollout.tasks_per_iteration={config.rollout.tasks_per_iteration} must be a multiple of "
                          f"the {count} processes (every process rolls out the same number of tasks)")
    return config.rollout.tasks_per_iteration // count


def to_mesh(host_batch: Any, learner: Learner, *, same_on_every_process: bool = False) -> Any:
    """Host (numpy) rows → device arrays for the jitted score/update: global arrays sharded over the
    mesh's batch axes (each process supplies its own rows, or — ``same_on_every_process`` — every
    process holds the whole batch), or plain device arrays without a mesh."""
    if learner.mesh is None:
        return to_device(host_batch)
    if same_on_every_process:
        return distributed.global_batch_from_host(host_batch, learner.mesh)
    return distributed.global_batch(host_batch, learner.mesh)


def rows_multiple(learner: Learner, micro: int) -> int:
    """Per-process row multiple: global rows split into micro-batches and over the batch shards."""
    if learner.mesh is None:
        return micro
    shards = int(np.prod([learner.mesh.shape[a] for a in distributed.BATCH_AXES if a in learner.mesh.shape]))
    if shards % jax.process_count():
        raise ConfigError(f"mesh batch axes (data x fsdp = {shards}) must be a multiple of the "
                          f"{jax.process_count()} processes: set mesh.data to the number of hosts (or a multiple)")
    return math.lcm(micro, shards // jax.process_count())


@functools.partial(jax.jit, static_argnames=("cfg", "enabled"))
def _credit(batch: CreditBatch, cfg: CreditConfig, step, enabled: bool):
    return sgcd_credit(batch, cfg, step) if enabled else no_credit(batch, cfg, step)


# ----------------------------------------------------------------------------- annotation
def build_annotation_queue(credit: CreditSpec, run_dir: str) -> AsyncAnnotationQueue | None:
    if credit.annotator == "none":
        return None
    cache_dir = credit.cache_dir or f"{run_dir}/annotation_cache"
    gemini = None
    if credit.annotator == "gemini":
        from sgcd_jax.credit.gemini import GeminiConfig
        gemini = GeminiConfig(model=credit.gemini_model, timeout_s=credit.timeout_s,
                              base_url=credit.gemini_base_url or None)
    annotator = build_annotator(AnnotatorConfig(kind=credit.annotator, cache_dir=cache_dir, gemini=gemini))
    return AsyncAnnotationQueue(annotator, max_workers=4)


def submit_annotation(groups, config: TrainConfig, annotator) -> list[str] | None:
    """Start annotating the mixed groups (SGCD-style credit only); returns the submitted group ids."""
    if annotator is None or not config.loss.needs_teacher or (config.loss.sdpo_coef > 0 and config.loss.credit == "none"):
        return None
    mixed = [g for g in groups if g.is_mixed]
    return annotator.submit(mixed) if mixed else []


def teacher_prompts(trajectories: list[Trajectory], groups, config: TrainConfig, annotator,
                    chat: "integration.ChatAdapter", counters: Counters, tools_by_task: dict,
                    submitted: list[str] | None = None) -> tuple[list, dict, dict]:
    """Teacher prompt ids per trajectory (None = no context) + annotation metrics + references.
    ``submitted``: group ids already handed to the queue (``submit_annotation``); None = submit now."""
    metrics: dict[str, float] = {}
    references: dict[str, Any] = {}
    if config.loss.sdpo_coef > 0 and config.loss.credit == "none":  # SDPO: a successful sibling's demo
        by_key = {}
        for group in groups:
            rows = build_sdpo_teacher_batch([group], chat.render_prompt_ids, tools_by_task[group.task_id])
            for traj, row in zip(group.trajectories, rows):
                by_key[(traj.group_id, traj.sample_index)] = row
    else:
        if submitted is None:
            submitted = submit_annotation(groups, config, annotator)
        start = time.perf_counter()
        results = annotator.collect(submitted, timeout_s=config.credit.timeout_s) if submitted else {}
        metrics["time/annotation_wait_s"] = time.perf_counter() - start
        references = {gid: r.reference for gid, r in results.items()}
        missing = sum(r.reference is None for r in results.values())
        counters.groups_without_reference += missing
        counters.annotation_fallbacks += sum(r.reason.startswith("fallback") for r in results.values())
        metrics.update(annotator.stats.as_metrics())
        by_key = {}
        for traj in trajectories:
            [row] = build_teacher_batch([traj], references, chat.render_prompt_ids, tools_by_task[traj.task_id])
            by_key[(traj.group_id, traj.sample_index)] = row
    prompts = []
    for traj in trajectories:
        row = by_key.get((traj.group_id, traj.sample_index))
        prompts.append(None if row is None or not row.has_context else row.token_ids[:row.teacher_prompt_len])
    return prompts, metrics, references


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
                 attrs={"credit_fn": "credit/sgcd" if config.loss.credit != "none" else "credit/none",
                        "credit_config": dataclasses.asdict(credit_config(config.loss)), "step": iteration,
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
    length = config.rollout.max_total_tokens + config.rollout.max_new_tokens  # a turn may overshoot the cap
    teacher_length = length + (config.credit.reference_tokens if config.loss.needs_teacher else 0)
    # Every process packs to the same shapes (its share of the rows; lengths fixed by the config).
    host_batch = pack(trajectories, prompts, rows_multiple=rows_multiple(learner, micro), pad_id=pad_id,
                      min_rows=process_task_count(config) * config.rollout.group_size,
                      min_length=length, min_teacher_length=teacher_length)
    _check_same_shapes(host_batch)
    batch = to_mesh(host_batch, learner)
    multi_device = learner.mesh is not None and learner.mesh.size > 1  # results resharded to the batch layout
    needs_teacher = config.loss.needs_teacher and any_process(any(p is not None for p in prompts))
    spec = ScoreSpec(vocab=vocab_config(config),
                     with_teacher=needs_teacher, with_reference=config.loss.needs_reference)  # no reference: skip it
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
    adv_cfg = AdvantageConfig(estimator=config.loss.advantage, eps=config.loss.adv_eps,
                              norm_by_std=config.loss.norm_by_std)
    advantages = _advantages(to_mesh(rewards, learner), to_mesh(group_ids, learner), batch.row_valid > 0, adv_cfg)
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
        credit = _credit(distributed.replicate_on_mesh(credit_batch, learner.mesh), credit_config(config.loss),
                         iteration, config.loss.credit != "none")
        credit = credit.replace(weights=distributed.shard_rows_on_mesh(credit.weights, learner.mesh),
                                token_advantages=distributed.shard_rows_on_mesh(credit.token_advantages,
                                                                                learner.mesh))
    else:
        credit = _credit(credit_batch, credit_config(config.loss), iteration, config.loss.credit != "none")
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
            "advantages": distributed.local_rows(advantages.advantages), "target_mask": host_batch.target_mask}
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
    selection_config = SelectionConfig(success_threshold=config.credit.success_threshold,
                                       non_mixed=config.credit.non_mixed_groups)
    selection = select_groups(trajectories, selection_config)
    groups = selection.mixed + selection.grpo
    oversampling: dict[str, float] = {}
    if config.credit.max_oversample_rounds > 0:  # dynamic sampling: more rounds until `share` groups are mixed

        def draw(round_index: int) -> list[Trajectory]:
            more_tasks = stream.next_tasks(share)
            tasks.extend(more_tasks)
            more = integration.rollout(learner.local_model(), chat, env_factory, more_tasks, config.rollout.group_size,
                                       rng, config, task_slots=[s + round_index * share * jax.process_count() for s in slots],
                                       mesh=local_mesh(learner))
            for traj in more:  # a task drawn twice in one iteration must not merge two groups
                traj.group_id = f"{traj.group_id}/round{round_index}"
            return more

        groups, trajectories, oversampling = fill_mixed_groups(selection, share, config.credit.max_oversample_rounds,
                                                               draw, selection_config)
        rollout_s = time.perf_counter() - start
        counters.episodes += (len(trajectories) - share * config.rollout.group_size) * jax.process_count()
    kept = [t for g in groups for t in g.trajectories]
    metrics = {**episode_metrics(trajectories, config.credit.success_threshold), **selection.stats.as_metrics(),
               **oversampling, "time/rollout_s": rollout_s,
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
        samples = report_samples(kept, host, references, chat)
    metrics["time/update_phase_s"] = time.perf_counter() - update_started
    return metrics, samples


def iteration(index: int, learner: Learner, ref_model, stream: TaskStream, env_factory, chat, annotator,
              rng: jax.Array, config: TrainConfig, counters: Counters,
              store: RolloutStore | None = None) -> tuple[dict, list]:
    """One synchronous RL iteration (rollout, then wait for annotation, then update); returns
    (metrics, report samples)."""
    rolled = rollout_phase(index, learner, stream, env_factory, chat, annotator, rng, config, counters)
    metrics, samples = update_phase(rolled, learner, ref_model, env_factory, chat, annotator, config, counters, store)
    metrics["time/iteration_s"] = time.perf_counter() - rolled.started
    return metrics, samples


def episode_metrics(trajectories: Sequence[Trajectory], threshold: float) -> dict[str, float]:
    rewards = np.asarray([t.reward for t in trajectories], np.float32)
    state_changes = [float(t.info.get("write_calls_ok", 0)) for t in trajectories]  # successful state-changing calls
    return {"reward_mean": float(rewards.mean()) if len(rewards) else 0.0,
            "success_rate": float((rewards >= threshold).mean()) if len(rewards) else 0.0,
            "state_change_success_rate": float(np.mean(state_changes)) if state_changes else 0.0,
            "turns_mean": float(np.mean([t.num_steps for t in trajectories])) if trajectories else 0.0,
            "response_tokens_mean": float(np.mean([t.loss_mask.sum() for t in trajectories])) if trajectories else 0.0,
            "parse_errors": float(sum(t.metrics.get("parse_errors", 0) for t in trajectories)),
            "tool_errors": float(sum(t.metrics.get("tool_errors", 0) for t in trajectories))}


def report_samples(trajectories: list[Trajectory], host: dict, references: dict, chat, limit: int = 2) -> list[dict]:
    """A failed and a successful sibling of one annotated group, with per-token weights."""
    picked = []
    for group_id, reference in references.items():
        if reference is None:
            continue
        rows = [i for i, t in enumerate(trajectories) if t.group_id == group_id]
        picked = rows[:limit]
        break
    if not picked:
        picked = list(range(min(limit, len(trajectories))))
    samples = []
    for row in picked:
        traj = trajectories[row]
        ids = traj.token_ids.tolist()
        weights = np.ones(len(ids), np.float32)
        weights[1:] = host["weights"][row, :len(ids) - 1]
        reference = references.get(traj.group_id)
        start = max(traj.prompt_len - 1, 0)
        samples.append({"title": f"{traj.task_id} sibling {traj.sample_index}", "reward": float(traj.reward),
                        "advantage": float(host["advantages"][row]),
                        "tokens": chat.token_strings(ids[start:]), "loss_mask": traj.loss_mask[start:].tolist(),
                        "weights": weights[start:].tolist(),
                        "reference": render_credit_text(reference, traj) if reference is not None else ""})
    return samples


def write_samples(run_dir: str, samples: list[dict]) -> None:
    _write_samples(run_dir, samples)


# ----------------------------------------------------------------------------- SFT warm-up and eval
def run_sft(learner: Learner, env_factory, chat, config: TrainConfig, progress) -> dict[str, float]:
    """Supervised warm-up on oracle demonstrations with its own AdamW; RL optimizer state untouched."""
    demos = integration.demonstrations(env_factory, chat, config)
    if not demos:
        raise ValueError(f"no oracle demonstration fits rollout.max_total_tokens={config.rollout.max_total_tokens}: "
                         "raise it or sft.num_demos")
    sft = Learner(learner.model(), make_optimizer(config.optim, config.sft.steps, config.sft.learning_rate, trainable=""),
                  dataclasses.replace(learner.spec, sft=True, distill=None,  # NLL of the untempered policy
                                      vocab=dataclasses.replace(learner.spec.vocab, temperature=1.0),
                                      micro_batch_size=min(config.sft.batch_size, config.optim.micro_batch_size)),
                  mesh=learner.mesh)
    # Every process packs the same demonstrations; rows padded so they split over the batch shards.
    sft_rows = rows_multiple(learner, sft.spec.micro_batch_size) * jax.process_count()
    order = np.random.default_rng(config.run.seed).permutation(len(demos))
    length = max(len(d.token_ids) for d in demos)  # one padded shape (one compile), no wider than the demos
    progress.phase("sft", config.sft.steps)
    nll = []
    first_step = sft_cache.restore_partial(sft, config)  # a warm-up stopped by a signal resumes where it stopped
    for step in range(first_step, config.sft.steps):
        if preemption.agreed():  # SIGTERM/SIGINT: save the warm-up's state, stop (train.main exits 75)
            sft_cache.save_partial(sft, step, config)
            raise preemption.Preempted(f"SFT warm-up stopped before step {step}/{config.sft.steps}, its state saved")
        take = [demos[order[(step * config.sft.batch_size + j) % len(demos)]] for j in range(config.sft.batch_size)]
        batch = to_mesh(pack(take, rows_multiple=sft_rows, pad_id=chat.pad_id,
                             min_length=length), sft, same_on_every_process=True)
        zeros = jnp.zeros_like(batch.target_mask)
        nll.append(sft.update(StepInputs(batch, zeros, zeros, zeros, zeros))["loss"])
        progress.advance("sft", step + 1, f"nll {nll[-1]:.3f}")
    learner.params = sft.params
    sft_cache.clear_partial(config)
    return {"sft/nll_first": nll[0] if nll else 0.0, "sft/nll_last": nll[-1] if nll else 0.0,
            "sft/demos": float(len(demos))}


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


def any_process(flag: bool) -> bool:
    """``flag`` on any process (the same answer on all: choices that pick jitted programs or
    collectives must agree, or processes would wait on each other)."""
    if jax.process_count() == 1:
        return flag
    return distributed.reduce_metrics({"flag": float(flag)}, "max")["flag"] > 0


def local_mesh(learner: Learner):
    """The mesh a process samples on (its own devices); None when that is one device."""
    if learner.mesh is None:
        return None
    mesh = distributed.local_mesh(learner.mesh)
    return mesh if mesh.size > 1 else None


def _check_same_shapes(batch) -> None:
    """Every process must pack to one shape, or the global arrays would not line up."""
    if jax.process_count() > 1:
        shapes = dict(zip(("rows", "length", "teacher_length"), (*batch.tokens.shape, batch.teacher_tokens.shape[1])))
        bounds = distributed.reduce_metrics({**shapes, **{f"-{k}": -v for k, v in shapes.items()}}, "max")
        if any(bounds[k] != -bounds[f"-{k}"] for k in shapes):  # max != min: raised on every process
            raise RuntimeError(f"processes packed different batch shapes (this one {shapes}, max/min over "
                               f"processes {bounds}): a trajectory outgrew rollout.max_total_tokens + max_new_tokens")


_ = (EnvSpec, ModelSpec, group_siblings)


def reference_model(learner: Learner, checkpointer, config: TrainConfig) -> nnx.Module:
    """Frozen KL reference: the policy RL starts from (post-SFT). Saved once so resume is exact."""
    if checkpointer.has_reference():
        params = checkpointer.restore_reference(learner.params)
    else:
        params = jax.tree.map(jnp.copy, learner.params)
        checkpointer.save_reference(params)
    return nnx.merge(learner.graphdef, params, learner.rest)
