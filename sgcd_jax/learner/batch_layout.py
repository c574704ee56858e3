"""Where rows go across processes and devices: each process's task share, host batches onto the
mesh, row multiples for micro-batches and batch shards, and choices every process must agree on."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from sgcd_jax.parallel import distributed
from sgcd_jax.config import ConfigError, TrainConfig
from sgcd_jax.learner.scoring import to_device
from sgcd_jax.learner.train_step import Learner


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
