"""An exclusive lock on a run dir: a second run on the same dir fails at once, naming the holder.

Two runs on one run dir used to both "succeed" while logging every step twice (or deleting each
other's metrics file) and overwriting each other's checkpoints. ``RunDirLock(run_dir).acquire()``
takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``run_dir/.lock`` and writes the holder (pid, host,
start time) into it. The kernel drops a flock when its process dies — kill -9 included — so a lock
left by a dead run is stale by construction: the next run takes it and says whose it was. (flock is
per host on some network filesystems; a holder on another host is then named but not excluded.)
Only process 0 of a multi-process job locks; the job's other processes share its run dir.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import socket
import time
from typing import Callable

LOCK_FILE = ".lock"


class RunDirLocked(RuntimeError):
    """Another live process holds the run dir."""


class RunDirLock:
    def __init__(self, run_dir: str):
        self.run_dir = os.path.abspath(run_dir)
        self.path = os.path.join(self.run_dir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> "RunDirLock":
        os.makedirs(self.run_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirLocked(
                f"run dir {self.run_dir} is in use by pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
                f"(started {holder.get('started', '?')}; lock file {self.path}). Wait for that run to finish, stop it, "
                "or choose another run.name / run.workdir.") from None
        previous = _read_holder(fd)
        if previous and previous.get("pid") != os.getpid():
            print(f"run dir {self.run_dir}: taking over a stale lock of pid {previous.get('pid')} on host "
                  f"{previous.get('host')} (that process is gone)", flush=True)
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)  # an empty file = nobody; the flock itself is what excludes
            except OSError:
                pass
            os.close(fd)  # drops the flock

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        self.release()


def locks_run_dir(train_fn: Callable) -> Callable:
    """Decorate ``train(config, ...)``: process 0 holds ``config.run_dir``'s lock for the call."""

    @functools.wraps(train_fn)
    def locked(config, *args, **kwargs):
        import jax

        if jax.process_index() != 0:
            return train_fn(config, *args, **kwargs)
        with RunDirLock(config.run_dir):
            return train_fn(config, *args, **kwargs)

    return locked


def _read_holder(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}
