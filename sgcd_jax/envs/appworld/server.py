"""``appworld serve environment`` subprocesses: lifecycle, health, timeouts, crash-restart, and a pool.

One task per process, because AppWorld freezes the world's clock process-globally. The HTTP surface
used (appworld 0.1.3 ``serve/environment.py``): ``GET /`` (health), ``POST /initialize``
``{task_id, experiment_name, ...}``, ``POST /execute {task_id, code}``, ``POST /task_completed
{task_id}``, ``POST /evaluate {task_id, suppress_errors}``, ``POST /close {task_id}``; every POST
answers ``{"output": ...}``.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)


class AppWorldServerError(RuntimeError):
    """The server process is unreachable, crashed or timed out (restart it)."""


class AppWorldCallError(RuntimeError):
    """The server answered with an error status (the request was bad; the process is fine)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def default_command(venv: str | os.PathLike | None = None,
                    root: str | os.PathLike | None = None) -> Callable[[int], list[str]]:
    """``<venv>/bin/appworld serve environment --port N [--root ROOT]`` (venv from $APPWORLD_VENV or
    ~/.venvs/appworld, created by launch/appworld_setup.sh; the CLI defaults its root to the cwd)."""
    venv = Path(venv or os.environ.get("APPWORLD_VENV", Path.home() / ".venvs" / "appworld"))
    exe = venv / "bin" / "appworld"
    if not exe.exists():
        raise FileNotFoundError(f"{exe} not found: run `bash launch/appworld_setup.sh` to create the AppWorld "
                                f"venv (appworld pins pydantic<2, so it lives apart from sgcd_jax)")
    root_args = ["--root", str(root)] if root else []
    return lambda port: [str(exe), "serve", "environment", "--port", str(port), *root_args]


class AppWorldServer:
    def __init__(self, command: Callable[[int], list[str]], *, env: dict[str, str] | None = None,
                 startup_timeout_s: float = 180.0, request_timeout_s: float = 120.0,
                 log_dir: str | os.PathLike | None = None):
        self.command, self.env = command, env
        self.startup_timeout_s, self.request_timeout_s = startup_timeout_s, request_timeout_s
        self.log_dir = Path(log_dir) if log_dir else None
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.port = free_port()
        out = subprocess.DEVNULL
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"appworld-{self.port}.log", "ab")  # noqa: SIM115 - owned by Popen
        self.process = subprocess.Popen(self.command(self.port), stdout=out, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(self.env or {})}, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AppWorldServerError(f"AppWorld server exited with code {self.process.returncode} "
                                          f"during startup (command: {' '.join(self.command(self.port))})")
            if self.healthy():
                return
            time.sleep(0.1)
        self.stop()
        raise AppWorldServerError(f"AppWorld server not healthy after {self.startup_timeout_s:.0f}s")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def healthy(self, timeout_s: float = 2.0) -> bool:
        if not self.alive():
            return False
        try:
            with urllib.request.urlopen(self.url + "/", timeout=timeout_s) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def call(self, method: str, payload: dict[str, Any], timeout_s: float | None = None) -> Any:
        if not self.alive():
            raise AppWorldServerError(f"AppWorld server is not running (call {method})")
        request = urllib.request.Request(self.url + "/" + method, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s or self.request_timeout_s) as response:
                return json.loads(response.read())["output"]
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")[:2000]
            if not self.alive():
                raise AppWorldServerError(f"AppWorld server died during {method}") from exc
            raise AppWorldCallError(f"AppWorld {method} failed ({exc.code}): {body}") from exc
        except (OSError, urllib.error.URLError) as exc:  # refused, reset, timeout
            raise AppWorldServerError(f"AppWorld {method} failed: {exc}"
                                      f"{'' if self.alive() else ' (server process died)'}") from exc

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.restarts += 1
        self.start()


class ServerPool:
    """``size`` servers, started lazily; ``acquire`` hands out a healthy one (restarting dead ones)."""

    def __init__(self, size: int, make_server: Callable[[], AppWorldServer]):
        if size < 1:
            raise ValueError("AppWorld pool size must be >= 1")
        self._free: queue.Queue[AppWorldServer] = queue.Queue()
        self._all = [make_server() for _ in range(size)]
        for server in self._all:
            self._free.put(server)
        self._closed = False
        self._lock = threading.Lock()

    def acquire(self, timeout_s: float | None = None) -> AppWorldServer:
        if self._closed:
            raise RuntimeError("AppWorld server pool is closed")
        try:
            server = self._free.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"no free AppWorld server within {timeout_s}s; raise env pool_size") from None
        try:
            if server.process is None and server.port == 0:
                server.start()  # first use
            elif server.process is None:
                log.warning("AppWorld server on port %d was stopped after a failure; restarting", server.port)
                server.restart()
            elif not server.healthy():
                log.warning("AppWorld server on port %d unhealthy; restarting", server.port)
                server.restart()
        except Exception:
            self._free.put(server)
            raise
        return server

    def release(self, server: AppWorldServer, broken: bool = False) -> None:
        if broken:
            server.stop()  # restarted by the next acquire
        self._free.put(server)

    @property
    def restarts(self) -> int:
        return sum(s.restarts for s in self._all)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for server in self._all:
                server.stop()
