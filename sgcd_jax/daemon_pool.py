"""A thread pool whose workers are daemon threads: a call that never returns cannot pin the process.

``concurrent.futures.ThreadPoolExecutor`` joins its workers at interpreter exit, so one hung env or
annotator call (a user simulator, an HTTP read) keeps a finished run alive for as long as it hangs,
forever for a true hang. Callers here already give up on such calls (a deadline on the future) and
drop their results; this pool just lets the process exit past them. Same ``submit`` / ``shutdown``
surface as the standard executor.
"""

from __future__ import annotations

import concurrent.futures as cf
import queue
import threading
from typing import Any, Callable


class DaemonThreadPool:
    def __init__(self, max_workers: int, *, thread_name_prefix: str = "sgcd-daemon"):
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self._max_workers = max_workers
        self._prefix = thread_name_prefix
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)  # released by a worker each time it finishes an item
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> "DaemonThreadPool":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown(wait=False, cancel_futures=True)

    def submit(self, fn: Callable[..., Any], /, *args, **kwargs) -> cf.Future:
        future: cf.Future = cf.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot submit to a DaemonThreadPool after shutdown")
            self._work.put((future, fn, args, kwargs))
            if not self._idle.acquire(blocking=False) and len(self._threads) < self._max_workers:
                thread = threading.Thread(target=self._worker, daemon=True,
                                          name=f"{self._prefix}_{len(self._threads)}")
                thread.start()
                self._threads.append(thread)
        return future

    def _worker(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            del item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as err:  # noqa: BLE001 — delivered through the future
                    future.set_exception(err)
                else:
                    future.set_result(result)
            del future, fn, args, kwargs
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking work. ``cancel_futures``: queued calls are cancelled; ``wait``: join the
        workers (a hung one is never joined when ``wait=False``, and as a daemon it cannot block exit)."""
        with self._lock:
            self._closed = True
            if cancel_futures:
                while True:
                    try:
                        item = self._work.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        item[0].cancel()
            for _ in self._threads:
                self._work.put(None)
            threads = list(self._threads)
        if wait:
            for thread in threads:
                thread.join()
