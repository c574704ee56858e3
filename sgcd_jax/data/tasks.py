"""Grain task stream: an endless, seeded, per-process-sharded stream of task indices.

Each epoch is a fresh seeded shuffle of the task list; process ``p`` of ``n`` takes every n-th
element, so hosts see disjoint tasks. The iterator's state (a small dict) goes into the checkpoint's
JSON meta, and ``restore`` puts the stream back exactly where it was.
"""

from __future__ import annotations

from typing import Any, Sequence

import grain

from sgcd_jax.envs.base import Task


class TaskStream:
    def __init__(self, tasks: Sequence[Task], *, seed: int, process_index: int = 0,
                 process_count: int = 1):
        if not tasks:
            raise ValueError("TaskStream got an empty task list: check env.train_split / env.num_tasks")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} outside [0, {process_count})")
        self.tasks = list(tasks)
        dataset = grain.MapDataset.range(len(self.tasks)).shuffle(seed=seed).repeat(None)
        dataset = dataset[process_index::process_count]
        self._iterator = iter(dataset.to_iter_dataset())

    def next_tasks(self, count: int) -> list[Task]:
        return [self.tasks[int(next(self._iterator))] for _ in range(count)]

    def get_state(self) -> dict[str, Any]:
        return dict(self._iterator.get_state())

    def set_state(self, state: dict[str, Any]) -> None:
        self._iterator.set_state(dict(state))
