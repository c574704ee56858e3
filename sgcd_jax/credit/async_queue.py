"""AsyncAnnotationQueue: annotate sibling groups in worker threads while the next rollout runs.

    queue.submit(selection.mixed)          # returns at once
    next_rollouts = rollout(...)           # overlaps the external LLM's latency
    results = queue.collect(timeout_s=60)  # {group_id: AnnotationResult}

A result not ready by the deadline is reported as ``reason='queue_timeout'`` (no reference: plain
GRPO for that group) and its late answer is discarded; an annotator that raises is reported as
``error:<type>``. Nothing here raises into the training loop. Workers are daemon threads
(``sgcd_jax.daemon_pool``): an annotator call that hangs past its deadline cannot hold the process
open at exit.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from collections.abc import Iterable

from sgcd_jax.credit.annotator import AnnotationResult, Annotator, AnnotatorStats
from sgcd_jax.credit.selection import SiblingGroup
from sgcd_jax.daemon_pool import DaemonThreadPool

logger = logging.getLogger(__name__)


class AsyncAnnotationQueue:
    def __init__(self, annotator: Annotator, *, max_workers: int = 4,
                 stats: AnnotatorStats | None = None):
        self.annotator = annotator
        self.stats = stats if stats is not None else AnnotatorStats()
        self._pool = DaemonThreadPool(max_workers, thread_name_prefix="sgcd-annotator")
        self._pending: dict[str, cf.Future[AnnotationResult]] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> "AsyncAnnotationQueue":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def num_pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def submit(self, groups: Iterable[SiblingGroup]) -> list[str]:
        """Start annotating ``groups``; a group_id already pending is not submitted twice."""
        ids = []
        with self._lock:
            for group in groups:
                if group.group_id not in self._pending:
                    self._pending[group.group_id] = self._pool.submit(self.annotator.annotate, group)
                ids.append(group.group_id)
        return ids

    def collect(self, group_ids: Iterable[str] | None = None,
                timeout_s: float | None = None) -> dict[str, AnnotationResult]:
        """Wait up to ``timeout_s`` (None: forever) for ``group_ids`` (default: all pending)."""
        with self._lock:
            wanted = list(self._pending) if group_ids is None else list(group_ids)
            futures = {gid: self._pending.pop(gid, None) for gid in wanted}
        unknown = [gid for gid, fut in futures.items() if fut is None]
        if unknown:
            raise KeyError(f"collect() for group ids never submitted (or already collected): {unknown}")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        results = {}
        for gid, fut in futures.items():
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                result = fut.result(timeout=remaining)
            except cf.TimeoutError:
                fut.cancel()  # a running call finishes in its thread; its result is dropped
                result = AnnotationResult(gid, None, "queue_timeout", source=self.annotator.name)
                logger.warning("annotation of group %s not back within %.0f s: trained without a credit "
                               "reference (counted as annotator/reason/queue_timeout)", gid, timeout_s)
            except Exception as err:  # an annotator bug must not stop training
                logger.warning("annotator raised for group %s: %s", gid, type(err).__name__)
                result = AnnotationResult(gid, None, f"error:{type(err).__name__}",
                                          source=self.annotator.name)
            self.stats.record(result)
            results[gid] = result
        return results

    def close(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)
