"""Annotation → teacher contexts: the annotator queue from ``annotation.*``, submitting mixed groups,
and the teacher prompt of every trajectory (the credit reference, or for SDPO a successful sibling)."""

from __future__ import annotations

import time
from typing import Any

from sgcd_jax.config import AnnotationSpec, TrainConfig
from sgcd_jax.credit import (AnnotatorConfig, AsyncAnnotationQueue, build_annotator, build_sdpo_teacher_batch,
                             build_teacher_batch)
from sgcd_jax.rollout.trajectory import Trajectory


def build_annotation_queue(annotation: AnnotationSpec, run_dir: str) -> AsyncAnnotationQueue | None:
    if annotation.name == "none":
        return None
    cache_dir = annotation.cache_dir or f"{run_dir}/annotation_cache"
    gemini = None
    if annotation.name == "gemini":
        from sgcd_jax.credit.gemini import GeminiConfig
        gemini = GeminiConfig(model=annotation.model, timeout_s=annotation.timeout_s,
                              base_url=annotation.base_url or None)
    annotator = build_annotator(AnnotatorConfig(kind=annotation.name, cache_dir=cache_dir, gemini=gemini))
    return AsyncAnnotationQueue(annotator, max_workers=4)


def submit_annotation(groups, config: TrainConfig, annotator) -> list[str] | None:
    """Start annotating the mixed groups (SGCD-style credit only); returns the submitted group ids."""
    if annotator is None or not config.loss.needs_teacher or sibling_teacher(config):
        return None
    mixed = [g for g in groups if g.is_mixed]
    return annotator.submit(mixed) if mixed else []


def sibling_teacher(config: TrainConfig) -> bool:
    """An aux loss without credit (SDPO): the teacher sees a successful sibling, not a reference."""
    return bool(config.loss.aux) and config.loss.credit == "none"


def teacher_prompts(trajectories: list[Trajectory], groups, config: TrainConfig, annotator,
                    chat, counters, tools_by_task: dict,
                    submitted: list[str] | None = None) -> tuple[list, dict, dict]:
    """Teacher prompt ids per trajectory (None = no context) + annotation metrics + references.
    ``submitted``: group ids already handed to the queue (``submit_annotation``); None = submit now."""
    metrics: dict[str, float] = {}
    references: dict[str, Any] = {}
    if sibling_teacher(config):  # SDPO: a successful sibling's demo
        by_key = {}
        for group in groups:
            rows = build_sdpo_teacher_batch([group], chat.render_prompt_ids, tools_by_task[group.task_id])
            for traj, row in zip(group.trajectories, rows):
                by_key[(traj.group_id, traj.sample_index)] = row
    else:
        if submitted is None:
            submitted = submit_annotation(groups, config, annotator)
        start = time.perf_counter()
        results = annotator.collect(submitted, timeout_s=config.annotation.timeout_s) if submitted else {}
        metrics["time/annotation_wait_s"] = time.perf_counter() - start
        references = {gid: r.reference for gid, r in results.items()}
        if config.annotation.reference_control == "rotated":
            references = {gid: rotated(ref) for gid, ref in references.items()}
        elif config.annotation.reference_control == "foreign_quotes":
            references = foreign_quotes(references)
        missing = sum(r.reference is None for r in results.values())
        counters.groups_without_reference += missing
        counters.annotation_fallbacks += sum(r.reason.startswith("fallback") for r in results.values())
        metrics.update(annotator.stats.as_metrics())
        by_key = {}
        for traj in trajectories:
            [row] = build_teacher_batch([traj], references, chat.render_prompt_ids, tools_by_task[traj.task_id],
                                         style=config.annotation.reference_format)
            by_key[(traj.group_id, traj.sample_index)] = row
    prompts = []
    for traj in trajectories:
        row = by_key.get((traj.group_id, traj.sample_index))
        prompts.append(None if row is None or not row.has_context else row.token_ids[:row.teacher_prompt_len])
    return prompts, metrics, references


def foreign_quotes(references: dict) -> dict:
    """The quote control: each reference keeps its verdicts and the places of its quotes, but the quoted text
    (``success_action``) comes from the next group's reference (in group order, cyclically; a lone group keeps
    its own). A teacher that reads a sibling's answer from the quote now reads another task's answer."""
    gids = [gid for gid, ref in references.items() if ref is not None]
    out = dict(references)
    for i, gid in enumerate(gids):
        donor = references[gids[(i + 1) % len(gids)]]
        texts = [s.success_action for sib in donor.siblings for s in sib.steps if s.success_action]
        if not texts or len(gids) < 2:
            continue
        k, siblings = 0, []
        for sib in references[gid].siblings:
            steps = []
            for step in sib.steps:
                if step.success_action:
                    step = step.model_copy(update={"success_action": texts[k % len(texts)]})
                    k += 1
                steps.append(step)
            siblings.append(sib.model_copy(update={"steps": steps}))
        out[gid] = references[gid].model_copy(update={"siblings": siblings})
    return out


def rotated(reference):
    """The control reference: every sibling's step k carries the verdict (and reason) its step k+1 had (the
    last step wraps to step 0). A teacher that reads moves its disagreement with the student to the steps
    now flagged; one that only notices that a reference is present does not (``annotation.reference_control``)."""
    if reference is None:
        return None
    siblings = []
    for sib in reference.siblings:
        steps = sorted(sib.steps, key=lambda s: s.step)
        if len(steps) > 1:
            shifted = steps[1:] + steps[:1]
            steps = [s.model_copy(update={"step": own.step}) for own, s in zip(steps, shifted)]
        siblings.append(sib.model_copy(update={"steps": steps}))
    return reference.model_copy(update={"siblings": siblings})
