"""Start N local worker processes of one jax.distributed job, robust to a taken coordinator port.

Used by tests/test_train_multihost.py: every process gets ``--process_id i --num_processes N --port P``
appended to its command, ``XLA_FLAGS`` simulating ``devices`` CPU devices, and a log file.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PORT_TAKEN = ("already in use", "failed to add port")  # distributed.initialize's check / gRPC's message


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_env(devices: int) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    for key in list(env):  # stray cluster variables must not steer auto-detection
        if key.startswith(("SLURM_", "SGCD_", "JAX_COORDINATOR", "TPU_", "OMPI_")):
            env.pop(key)
    return env


def spawn(args: list[str], num_processes: int, devices: int, log_dir: Path, tag: str,
          port: int | None = None) -> tuple[list[subprocess.Popen], list[Path]]:
    """Start the processes (not waiting); returns them and their log paths."""
    port = free_port() if port is None else port
    procs, logs = [], []
    for i in range(num_processes):
        log = log_dir / f"{tag}.{i}.log"
        cmd = [sys.executable, *args, "--process_id", str(i), "--num_processes", str(num_processes),
               "--port", str(port)]
        with open(log, "w") as handle:  # a file, not a pipe: an undrained pipe blocks a chatty worker
            procs.append(subprocess.Popen(cmd, env=worker_env(devices), stdout=handle,
                                          stderr=subprocess.STDOUT, text=True, cwd=REPO))
        logs.append(log)
    return procs, logs


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    for proc in procs:
        proc.wait()


def run(args: list[str], num_processes: int, devices: int, log_dir: Path, tag: str,
        timeout_s: float = 300, attempts: int = 3) -> list[str]:
    """Run to completion; a process that fails stops the others at once; retried on a fresh port when
    the coordinator port was taken. Returns each process's output; raises with the logs on failure."""
    for attempt in range(attempts):
        procs, logs = spawn(args, num_processes, devices, log_dir, f"{tag}.try{attempt}")
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline and any(p.poll() is None for p in procs):
                if any(p.poll() not in (None, 0) for p in procs):
                    break
                time.sleep(0.2)
        finally:
            stop(procs)
        outputs = [log.read_text() for log in logs]
        if all(p.returncode == 0 for p in procs):
            return outputs
        joined = "\n".join(f"--- process {i} (rc {p.returncode}) ---\n{out[-3000:]}"
                           for i, (p, out) in enumerate(zip(procs, outputs)))
        timed_out = time.monotonic() >= deadline
        if timed_out or not any(m in joined.lower() for m in PORT_TAKEN) or attempt == attempts - 1:
            raise AssertionError(f"{tag}: {num_processes} processes failed{' (timed out)' if timed_out else ''}:\n"
                                 f"{joined}")
    raise AssertionError("unreachable")
