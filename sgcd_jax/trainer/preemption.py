"""SIGTERM / SIGINT → a clean, resumable stop, from process start (the SFT warm-up included).

``install()`` runs first thing in ``sgcd_jax.train.main``: a signal only sets a flag. The RL loop
checks it once per iteration (finish the iteration, checkpoint, stop); the SFT warm-up checks it
every step (its partial state is saved and resumed: ``sft_cache.save_partial``). The process then
exits with ``EXIT_PREEMPTED`` (75, ``EX_TEMPFAIL``: "try again") and prints ``preempted``, so a
scheduler can tell an interrupted run from a finished one (exit 0) and requeue it. A second SIGINT
raises ``KeyboardInterrupt`` at once (Ctrl-C twice = stop now, nothing saved).
"""

from __future__ import annotations

import signal
import sys
import threading

EXIT_PREEMPTED = 75  # os.EX_TEMPFAIL

_requested = threading.Event()
_signal_name: list[str] = []


class Preempted(Exception):
    """Raised where a phase stops early on a signal after saving what it needs to resume."""


def _handle(signum, frame):  # noqa: ARG001
    name = signal.Signals(signum).name
    if signum == signal.SIGINT and _requested.is_set():
        raise KeyboardInterrupt
    _signal_name[:] = [name]
    _requested.set()
    print(f"received {name}: stopping at the next safe point (checkpoint, then exit {EXIT_PREEMPTED}); "
          "Ctrl-C again to stop at once", file=sys.stderr, flush=True)


def install() -> dict:
    """Route SIGTERM and SIGINT to the flag; returns the previous handlers ({} off the main thread)."""
    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            old = signal.signal(sig, _handle)
            if old is not _handle:
                previous[sig] = old
    except ValueError:  # not the main thread (e.g. train() called from a worker): no handler
        return {}
    return previous


def requested() -> bool:
    """Whether this process received a stop signal."""
    return _requested.is_set()


def signal_name() -> str:
    return _signal_name[0] if _signal_name else ""


def agreed() -> bool:
    """``requested()`` on any process (a collective when several run: every process stops at the same step)."""
    import jax

    if jax.process_count() == 1:
        return requested()
    from sgcd_jax.parallel.metrics import reduce_metrics

    return reduce_metrics({"flag": float(requested())}, "max")["flag"] > 0


def reset() -> None:
    """Clear the flag (tests that preempt several runs in one process)."""
    _requested.clear()
    _signal_name.clear()


class Preemption:
    """The training loop's view: installs the handlers if ``main`` has not, restores them at the end."""

    def __init__(self):
        self._previous = install()

    @property
    def requested(self) -> bool:
        return requested()

    def agreed(self) -> bool:
        return agreed()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
