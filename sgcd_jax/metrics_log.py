"""Metrics sinks: jsonl (the source of truth the report reads), TensorBoard, and a rich progress bar.

Named ``metrics_log`` so it does not shadow the standard library's ``logging``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

METRICS_FILE = "metrics.jsonl"


def _scalar(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value


class MetricsLogger:
    """Appends one JSON line per ``log`` call; mirrors scalars to TensorBoard if enabled.

    On resume, lines with ``step >= resume_step`` are dropped first so a resumed run's file equals an
    uninterrupted one (steps logged after the last checkpoint are recomputed, not duplicated).
    """

    def __init__(self, run_dir: str, *, tensorboard: bool = True, resume_step: int | None = None):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, METRICS_FILE)
        if resume_step is not None and os.path.exists(self.path):
            kept = [line for line in read_metrics(self.path) if line.get("step", -1) < resume_step]
            with open(self.path, "w") as f:
                for line in kept:
                    f.write(json.dumps(line) + "\n")
        elif resume_step is None and os.path.exists(self.path):
            os.remove(self.path)
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(run_dir, "tb"))
            except ImportError:  # optional sink
                self._tb = None

    def log(self, step: int, metrics: dict[str, Any], *, phase: str = "train") -> None:
        record = {"step": int(step), "phase": phase, "time": time.time()}
        for key, value in metrics.items():
            scalar = _scalar(value)
            if scalar is None:
                continue
            record[key] = scalar if math.isfinite(scalar) else str(scalar)
            if self._tb is not None and math.isfinite(scalar):
                self._tb.add_scalar(f"{phase}/{key}", scalar, step)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for index, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if index + 1 < len(lines):  # only the last line can be cut short by a kill mid-write
                raise ValueError(f"{path}: line {index + 1} is not JSON (the file is corrupt, not just "
                                 "cut short)") from None
            logging.getLogger(__name__).warning("%s: ignoring a partial last line (%d bytes), written by a "
                                                "process killed mid-write", path, len(line))
    return records


class Progress:
    """A rich progress bar per phase; a no-op when disabled (tests, non-tty logs)."""

    def __init__(self, enabled: bool):
        self._progress = None
        self._tasks: dict[str, Any] = {}
        if enabled:
            from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn
            self._progress = RichProgress(TextColumn("{task.description}"), BarColumn(),
                                          TextColumn("{task.completed}/{task.total}"),
                                          TextColumn("{task.fields[info]}"), TimeElapsedColumn())
            self._progress.start()

    def phase(self, name: str, total: int) -> None:
        if self._progress is not None:
            self._tasks[name] = self._progress.add_task(name, total=total, info="")

    def advance(self, name: str, completed: int, info: str = "") -> None:
        if self._progress is not None and name in self._tasks:
            self._progress.update(self._tasks[name], completed=completed, info=info)

    def print(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
