"""Sibling selection and dynamic sampling.

Siblings are the G trajectories of one task in one iteration (same ``group_id``). SGCD needs
*mixed* groups (0 < #success < G): only they contrast what the verifier rewards against what it
punishes. Non-mixed groups are dropped or kept for plain GRPO (credit weight 1); the
``OversamplingPolicy`` tells the trainer to draw more tasks until the batch holds enough mixed
groups, up to a cap.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Literal

from sgcd_jax.rollout.trajectory import Trajectory

NonMixedPolicy = Literal["drop", "grpo"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SelectionConfig:
    """``success_threshold``: reward ≥ threshold counts as success (lower it for partial rewards,
    e.g. AppWorld's fraction of unit tests). ``non_mixed``: ``drop`` all-success/all-fail groups or
    keep them as plain ``grpo`` groups (credit weight 1)."""

    success_threshold: float = 1.0
    non_mixed: NonMixedPolicy = "drop"

    def __post_init__(self):
        if self.non_mixed not in ("drop", "grpo"):
            raise ValueError(f"SelectionConfig.non_mixed={self.non_mixed!r}: use 'drop' or 'grpo'")
        if not math.isfinite(self.success_threshold):
            raise ValueError("SelectionConfig.success_threshold must be a finite float")


@dataclasses.dataclass
class SiblingGroup:
    """The siblings of one task, ordered by ``sample_index``; ``successes[i]`` is whether
    ``trajectories[i].reward >= success_threshold``."""

    group_id: str
    task_id: str
    trajectories: list[Trajectory]
    successes: list[bool]

    @property
    def num_success(self) -> int:
        return sum(self.successes)

    @property
    def is_mixed(self) -> bool:
        return 0 < self.num_success < len(self.trajectories)

    @property
    def successful(self) -> list[Trajectory]:
        return [t for t, ok in zip(self.trajectories, self.successes) if ok]

    @property
    def failed(self) -> list[Trajectory]:
        return [t for t, ok in zip(self.trajectories, self.successes) if not ok]


@dataclasses.dataclass
class SelectionStats:
    num_groups: int = 0
    num_mixed: int = 0
    num_all_success: int = 0
    num_all_fail: int = 0
    num_trajectories: int = 0

    @property
    def mixed_fraction(self) -> float:
        return self.num_mixed / self.num_groups if self.num_groups else 0.0

    def as_metrics(self, prefix: str = "selection/") -> dict[str, float]:
        return {f"{prefix}groups": float(self.num_groups),
                f"{prefix}mixed": float(self.num_mixed),
                f"{prefix}all_success": float(self.num_all_success),
                f"{prefix}all_fail": float(self.num_all_fail),
                f"{prefix}mixed_fraction": self.mixed_fraction}

    def merge(self, other: "SelectionStats") -> "SelectionStats":
        return SelectionStats(*(a + b for a, b in zip(dataclasses.astuple(self),
                                                      dataclasses.astuple(other))))


@dataclasses.dataclass
class SelectionResult:
    """``mixed``: groups to annotate. ``grpo``: non-mixed groups kept with weight 1 (empty under
    ``non_mixed='drop'``). ``dropped``: non-mixed groups left out of the batch."""

    mixed: list[SiblingGroup]
    grpo: list[SiblingGroup]
    dropped: list[SiblingGroup]
    stats: SelectionStats


def group_siblings(trajectories: Sequence[Trajectory], success_threshold: float) -> list[SiblingGroup]:
    """Groups by ``group_id`` in first-seen order; siblings sorted by ``sample_index``."""
    by_group: dict[str, list[Trajectory]] = {}
    for traj in trajectories:
        by_group.setdefault(traj.group_id, []).append(traj)
    groups = []
    for group_id, members in by_group.items():
        members = sorted(members, key=lambda t: t.sample_index)
        task_ids = {t.task_id for t in members}
        if len(task_ids) != 1:
            raise ValueError(f"group {group_id!r} mixes tasks {sorted(task_ids)}: siblings of a "
                             "group must share one task_id — check how the rollout assigns group_id")
        indices = [t.sample_index for t in members]
        if len(set(indices)) != len(indices):
            raise ValueError(f"group {group_id!r} has duplicate sample_index values {indices}")
        groups.append(SiblingGroup(group_id=group_id, task_id=members[0].task_id,
                                   trajectories=members,
                                   successes=[t.reward >= success_threshold for t in members]))
    return groups


def select_groups(trajectories: Sequence[Trajectory], config: SelectionConfig) -> SelectionResult:
    groups = group_siblings(trajectories, config.success_threshold)
    stats = SelectionStats(num_groups=len(groups), num_trajectories=len(trajectories))
    mixed, non_mixed = [], []
    for group in groups:
        if group.is_mixed:
            mixed.append(group)
            stats.num_mixed += 1
        else:
            non_mixed.append(group)
            if group.num_success == len(group.trajectories):
                stats.num_all_success += 1
            else:
                stats.num_all_fail += 1
    keep = config.non_mixed == "grpo"
    return SelectionResult(mixed=mixed, grpo=non_mixed if keep else [],
                           dropped=[] if keep else non_mixed, stats=stats)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OversamplingConfig:
    """Draw tasks until ``target_mixed_groups`` mixed groups are collected, at most
    ``max_total_tasks`` tasks and ``max_rounds`` rollout rounds per batch. ``min_mixed_rate`` floors
    the observed mixed fraction used to size the next draw (so an all-fail start does not ask for
    an unbounded number of tasks)."""

    target_mixed_groups: int
    max_total_tasks: int
    max_rounds: int = 4
    min_mixed_rate: float = 0.1

    def __post_init__(self):
        if self.target_mixed_groups < 1:
            raise ValueError("OversamplingConfig.target_mixed_groups must be ≥ 1")
        if self.max_total_tasks < self.target_mixed_groups:
            raise ValueError(f"OversamplingConfig.max_total_tasks={self.max_total_tasks} is below "
                             f"target_mixed_groups={self.target_mixed_groups}: it could never fill")
        if self.max_rounds < 1 or not 0.0 < self.min_mixed_rate <= 1.0:
            raise ValueError("OversamplingConfig needs max_rounds ≥ 1 and 0 < min_mixed_rate ≤ 1")


class OversamplingPolicy:
    """Stateful per-batch accumulator the trainer drives::

        policy.reset()
        while (n := policy.tasks_to_draw()) > 0:
            policy.add(select_groups(rollout(draw(n)), selection_config))
        mixed, grpo = policy.batch()
    """

    def __init__(self, config: OversamplingConfig):
        self.config = config
        self.reset()

    def reset(self) -> None:
        self.rounds = 0
        self.tasks_drawn = 0
        self.stats = SelectionStats()
        self._mixed: list[SiblingGroup] = []
        self._grpo: list[SiblingGroup] = []

    @property
    def num_mixed(self) -> int:
        return len(self._mixed)

    def need_more(self) -> bool:
        return self.tasks_to_draw() > 0

    def tasks_to_draw(self) -> int:
        """How many tasks the next rollout round should draw; 0 when full or the cap is hit."""
        cfg = self.config
        missing = cfg.target_mixed_groups - len(self._mixed)
        remaining = cfg.max_total_tasks - self.tasks_drawn
        if missing <= 0 or remaining <= 0 or self.rounds >= cfg.max_rounds:
            return 0
        if self.rounds == 0:
            return min(cfg.target_mixed_groups, remaining)
        rate = max(self.stats.mixed_fraction, cfg.min_mixed_rate)
        return min(remaining, math.ceil(missing / rate))

    def add(self, result: SelectionResult) -> None:
        self.rounds += 1
        self.tasks_drawn += result.stats.num_groups
        self.stats = self.stats.merge(result.stats)
        self._mixed.extend(result.mixed)
        self._grpo.extend(result.grpo)

    def batch(self) -> tuple[list[SiblingGroup], list[SiblingGroup]]:
        """(mixed groups, at most the target; non-mixed groups kept for plain GRPO). Extra mixed
        groups beyond the target are dropped so the batch shape stays fixed."""
        return self._mixed[: self.config.target_mixed_groups], list(self._grpo)

    def as_metrics(self, prefix: str = "oversampling/") -> dict[str, float]:
        return {f"{prefix}rounds": float(self.rounds), f"{prefix}tasks_drawn": float(self.tasks_drawn),
                f"{prefix}mixed_collected": float(len(self._mixed)),
                f"{prefix}filled": float(len(self._mixed) >= self.config.target_mixed_groups),
                **self.stats.as_metrics(prefix)}


def fill_mixed_groups(first: SelectionResult, target: int, max_extra_rounds: int,
                      draw: Callable[[int], Sequence[Trajectory]],
                      config: SelectionConfig) -> tuple[list[SiblingGroup], list[Trajectory], dict[str, float]]:
    """Dynamic sampling (DAPO-style) for the trainer: while fewer than ``target`` mixed groups are
    collected, ``draw(round)`` rolls out another batch of tasks (same size every round, so the sampler
    sees one shape), up to ``max_extra_rounds`` extra rounds. Returns (groups for the update: at most
    ``target`` mixed ones, then non-mixed ``grpo`` groups only to fill up to ``target`` groups, so the
    packed batch never outgrows its fixed shape; every trajectory rolled out; metrics)."""
    policy = OversamplingPolicy(OversamplingConfig(  # one accumulator for both drivers
        target_mixed_groups=target, max_total_tasks=target * (max_extra_rounds + 1), max_rounds=max_extra_rounds + 1))
    policy.add(first)
    trajectories = [t for g in first.mixed + first.grpo + first.dropped for t in g.trajectories]
    while policy.need_more():
        more = list(draw(policy.rounds))
        trajectories.extend(more)
        policy.add(select_groups(more, config))
    mixed, non_mixed = policy.batch()
    groups = mixed + non_mixed[:max(0, target - len(mixed))]
    metrics = {**policy.as_metrics(), "oversampling/extra_rounds": float(policy.rounds - 1)}
    return groups, trajectories, metrics
