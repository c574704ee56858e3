"""Multi-host (multi-controller) runtime: initialise JAX's distributed system, turn per-process
batches into global arrays, reduce metrics across processes, and keep side effects on process 0.

One process per host (TPU VM worker, SLURM task, GKE pod, or a local process in tests) runs the same
program. Each process drives its own env workers for its share of tasks; the jitted train step sees
one global array per batch field, laid out on the mesh from the processes' local rows.

Where the coordinator comes from, in order:
  1. explicit ``DistributedConfig(coordinator_address=..., num_processes=..., process_id=...)``;
  2. environment ``SGCD_COORDINATOR_ADDRESS`` / ``SGCD_NUM_PROCESSES`` / ``SGCD_PROCESS_ID``
     (set by launch/local_multiprocess.sh, launch/gke_jobset.yaml); ``JAX_COORDINATOR_ADDRESS`` too;
  3. SLURM (``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``/``SLURM_JOB_NODELIST``, ``SLURM_NTASKS``,
     ``SLURM_PROCID``) and Cloud TPU metadata: JAX's own cluster auto-detection (one GPU per SLURM
     task unless ``SGCD_LOCAL_DEVICE_IDS`` says otherwise).
``SGCD_CLUSTER`` (explicit | slurm | tpu | none) forces the mode when the config says "auto".

Timeouts matter: with JAX's defaults a dead peer can stall the survivors for minutes. The
``heartbeat_timeout_s`` here is what bounds "one process died → the others exit with an error".
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

CLUSTER_MODES = ("auto", "explicit", "slurm", "tpu", "none")
ENV_COORDINATOR = "SGCD_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "SGCD_NUM_PROCESSES"
ENV_PROCESS_ID = "SGCD_PROCESS_ID"
ENV_CLUSTER = "SGCD_CLUSTER"  # overrides cluster="auto": explicit | slurm | tpu | none
ENV_LOCAL_DEVICE_IDS = "SGCD_LOCAL_DEVICE_IDS"  # "0,1,2,3": GPUs this process owns
# Timeouts from the environment (seconds), e.g. a short heartbeat in tests or a long barrier at scale.
ENV_TIMEOUTS = {"initialization_timeout_s": "SGCD_INITIALIZATION_TIMEOUT_S",
                "heartbeat_timeout_s": "SGCD_HEARTBEAT_TIMEOUT_S",
                "shutdown_timeout_s": "SGCD_SHUTDOWN_TIMEOUT_S", "barrier_timeout_s": "SGCD_BARRIER_TIMEOUT_S"}
_SLURM_REQUIRED = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID")
BATCH_AXES = ("data", "fsdp")  # = sharding.BATCH_AXES: the batch dim is split over both

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """How this process joins the job. ``cluster="auto"`` with nothing set means single process."""

    cluster: str = "auto"  # one of CLUSTER_MODES
    coordinator_address: str | None = None  # "host:port" of process 0
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None  # GPU: devices this process owns
    initialization_timeout_s: int = 300  # waiting for all processes to connect
    heartbeat_timeout_s: int = 60  # a peer silent this long is declared dead → every process exits
    shutdown_timeout_s: int = 60  # waiting for peers at exit
    barrier_timeout_s: int = 600  # named barriers (checkpoint, eval); longer than one iteration

    def __post_init__(self) -> None:
        if self.cluster not in CLUSTER_MODES:
            raise ValueError(f"distributed.cluster={self.cluster!r}; use one of {CLUSTER_MODES}")
        if self.cluster == "explicit" and None in (self.coordinator_address, self.num_processes,
                                                    self.process_id):
            raise ValueError("distributed.cluster='explicit' needs coordinator_address, num_processes "
                             "and process_id (or SGCD_COORDINATOR_ADDRESS/SGCD_NUM_PROCESSES/"
                             "SGCD_PROCESS_ID in the environment)")
        for name in ("initialization_timeout_s", "heartbeat_timeout_s", "shutdown_timeout_s",
                     "barrier_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"distributed.{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.coordinator_address is not None and ":" not in self.coordinator_address:
            raise ValueError(f"distributed.coordinator_address={self.coordinator_address!r} must be "
                             "'host:port'")


def resolve_config(cfg: DistributedConfig | None = None,
                   environ: Mapping[str, str] | None = None) -> DistributedConfig:
    """Fill unset fields from the environment and decide the cluster mode (pure: no side effects).

    Returns a config whose ``cluster`` is "explicit" (all three fields known), "slurm"/"tpu" (JAX
    auto-detection fills the rest) or "none" (single process).
    """
    env = os.environ if environ is None else environ
    if cfg is None:  # timeouts from the environment only when the caller did not choose them
        cfg = DistributedConfig(**{name: value for name, key in ENV_TIMEOUTS.items()
                                   if (value := _int_env(env, key)) is not None})
    mode = cfg.cluster
    if mode == "auto" and env.get(ENV_CLUSTER):
        mode = env[ENV_CLUSTER]
        if mode not in CLUSTER_MODES:
            raise ValueError(f"{ENV_CLUSTER}={mode!r}; use one of {CLUSTER_MODES}")
    if mode == "none":
        return dataclasses.replace(cfg, cluster="none")
    address = cfg.coordinator_address or env.get(ENV_COORDINATOR) or env.get("JAX_COORDINATOR_ADDRESS")
    num = cfg.num_processes if cfg.num_processes is not None else _int_env(env, ENV_NUM_PROCESSES)
    pid = cfg.process_id if cfg.process_id is not None else _int_env(env, ENV_PROCESS_ID)
    devices = cfg.local_device_ids
    if devices is None and env.get(ENV_LOCAL_DEVICE_IDS):
        devices = tuple(int(i) for i in env[ENV_LOCAL_DEVICE_IDS].split(","))
    filled = dict(coordinator_address=address, num_processes=num, process_id=pid,
                  local_device_ids=devices)
    if mode == "explicit" or (mode == "auto" and None not in (address, num, pid)):
        return dataclasses.replace(cfg, cluster="explicit", **filled)  # validates the three fields
    if mode == "slurm" or (mode == "auto" and all(k in env for k in _SLURM_REQUIRED)):
        missing = [k for k in _SLURM_REQUIRED if k not in env]
        if missing:
            raise ValueError(f"distributed.cluster='slurm' but {missing} are not set: run under srun")
        if int(env["SLURM_NTASKS"]) == 1 and address is None:
            return dataclasses.replace(cfg, cluster="none")
        return dataclasses.replace(cfg, cluster="slurm", **filled)
    if mode == "tpu" or (mode == "auto" and _looks_like_multihost_tpu(env)):
        return dataclasses.replace(cfg, cluster="tpu", **filled)
    return dataclasses.replace(cfg, cluster="none")


def _int_env(env: Mapping[str, str], key: str) -> int | None:
    value = env.get(key)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} must be an integer") from None


def _looks_like_multihost_tpu(env: Mapping[str, str]) -> bool:
    # Set on every worker of a multi-host TPU VM slice and by GKE's TPU webhook.
    hostnames = env.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hostnames or env.get("MEGASCALE_NUM_SLICES", "1") not in ("", "1")


def initialize(cfg: DistributedConfig | None = None) -> DistributedConfig:
    """Join the multi-process job (no-op for a single process); call before any other JAX use.

    Idempotent: a second call returns the resolved config without reconnecting.
    """
    resolved = resolve_config(cfg)
    if resolved.cluster == "none" or jax.distributed.is_initialized():
        return resolved
    kwargs: dict[str, Any] = dict(
        initialization_timeout=resolved.initialization_timeout_s,
        heartbeat_timeout_seconds=resolved.heartbeat_timeout_s,
        shutdown_timeout_seconds=resolved.shutdown_timeout_s,
    )
    # slurm / tpu: JAX's cluster detection fills whatever is still None.
    kwargs.update(coordinator_address=resolved.coordinator_address,
                  num_processes=resolved.num_processes, process_id=resolved.process_id)
    if resolved.local_device_ids is not None:
        kwargs["local_device_ids"] = list(resolved.local_device_ids)
    elif resolved.cluster == "explicit":
        # All local devices are ours; stops JAX from guessing a cluster type from stray env vars.
        kwargs["cluster_detection_method"] = "deactivate"
    if resolved.cluster == "explicit" and resolved.process_id == 0:
        _check_coordinator_port_free(resolved.coordinator_address)  # JAX would segfault instead
    logger.info("jax.distributed.initialize(%s) [%s]", kwargs, resolved.cluster)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as error:  # noqa: BLE001 - re-raised with the fix
        raise RuntimeError(
            f"joining the distributed job failed ({resolved.cluster}: coordinator="
            f"{resolved.coordinator_address}, num_processes={resolved.num_processes}, "
            f"process_id={resolved.process_id}): {error}. Check that every process got the same "
            "coordinator address and process count, that process 0 started, and that the port is "
            f"free and reachable (initialization_timeout_s={resolved.initialization_timeout_s})"
        ) from error
    return dataclasses.replace(resolved, num_processes=jax.process_count(),
                               process_id=jax.process_index())


def _check_coordinator_port_free(address: str) -> None:
    """Raise a clear error when the coordinator port already has a listener on this host."""
    import socket

    port = int(address.rsplit(":", 1)[1])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: TIME_WAIT is fine
        try:
            sock.bind(("", port))
        except OSError as error:
            raise RuntimeError(
                f"coordinator port {port} is already in use on this host ({error}); pick another "
                f"port in the coordinator address ({ENV_COORDINATOR} / distributed.coordinator_address)"
            ) from None


# ----------------------------------------------------------------------------- process-0 helpers

def is_main_process() -> bool:
    return jax.process_index() == 0


def main_process_only(fn: Callable[..., T]) -> Callable[..., T | None]:
    """Decorator: run ``fn`` on process 0 only (log/report/file writers); returns None elsewhere."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T | None:
        return fn(*args, **kwargs) if is_main_process() else None

    return wrapper


def barrier(name: str, timeout_s: int = 600) -> None:
    """Wait until every process reaches ``name``; raise (not hang) if a peer does not come.

    ``timeout_s``: pass ``DistributedConfig.barrier_timeout_s``; names must be unique per call site
    and iteration (e.g. f"checkpoint-{step}").
    Use around process-0-only writes that others then read (e.g. a config file in the run dir).
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed_state  # public API has no barrier timeout

    client = jax_distributed_state.global_state.client
    if client is None:
        raise RuntimeError("barrier() with several processes but jax.distributed is not initialised")
    try:
        client.wait_at_barrier(name, timeout_in_ms=int(timeout_s * 1000))
    except Exception as error:  # noqa: BLE001
        raise RuntimeError(
            f"process {jax.process_index()}/{jax.process_count()} timed out or failed at barrier "
            f"{name!r} after {timeout_s}s: a peer process died or is stuck ({error})") from error


# ----------------------------------------------------------------------------- data placement

def process_shard(items: list[T], process_index: int | None = None,
                  process_count: int | None = None) -> list[T]:
    """This process's strided share of ``items`` (tasks, env workers): items[i::n]."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    return list(items[index::count])


def local_batch_size(global_batch_size: int, mesh: Mesh, batch_axes: tuple[str, ...] = BATCH_AXES
                     ) -> int:
    """Rows each process must supply so the global batch splits evenly over ``batch_axes``."""
    batch_axes = tuple(a for a in batch_axes if a in mesh.shape)
    shards = int(np.prod([mesh.shape[a] for a in batch_axes]))
    if global_batch_size % shards:
        raise ValueError(f"global batch {global_batch_size} is not divisible by the {shards} "
                         f"shards of mesh axes {batch_axes}; pick a multiple of {shards}")
    if global_batch_size % jax.process_count():
        raise ValueError(f"global batch {global_batch_size} is not divisible by "
                         f"{jax.process_count()} processes")
    return global_batch_size // jax.process_count()


def global_batch(local_batch: Any, mesh: Mesh, batch_axes: tuple[str, ...] = BATCH_AXES) -> Any:
    """Assemble per-process numpy rows into global ``jax.Array``s sharded on the batch dim.

    Every leaf's leading dim is this process's rows; the global leading dim is the sum over
    processes (process p's rows come p-th, matching ``process_shard`` order only if tasks are
    re-ordered accordingly — the loss never depends on row order).
    """

    axes = tuple(a for a in batch_axes if a in mesh.shape)  # a mesh may lack e.g. "fsdp"

    def place(leaf: Any) -> jax.Array:
        leaf = np.asarray(leaf)
        spec = PartitionSpec(axes, *([None] * (leaf.ndim - 1)))
        return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), leaf)

    return jax.tree.map(place, local_batch)


def global_batch_from_host(full_batch: Any, mesh: Mesh, batch_axes: tuple[str, ...] = BATCH_AXES) -> Any:
    """Global arrays from a batch every process holds in full (same numpy on every process, e.g. SFT
    demonstrations): each device takes its own rows, nothing crosses processes."""
    axes = tuple(a for a in batch_axes if a in mesh.shape)

    def place(leaf: Any) -> jax.Array:
        leaf = np.asarray(leaf)
        sharding = NamedSharding(mesh, PartitionSpec(axes, *([None] * (leaf.ndim - 1))))
        return jax.make_array_from_callback(leaf.shape, sharding, lambda index: leaf[index])

    return jax.tree.map(place, full_batch)


def place(tree: Any, shardings: Any) -> Any:
    """Put ``tree`` (values identical on every process, e.g. a seeded model init) on ``shardings``.
    One process: ``jax.device_put``; several: each device gets its slice of the host value."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def put(leaf: Any, sharding: NamedSharding) -> jax.Array:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return leaf if leaf.sharding == sharding else jax.jit(lambda x: x, out_shardings=sharding)(leaf)
        value = np.asarray(leaf)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(put, tree, shardings)


def replicated(tree: Any, mesh: Mesh) -> Any:
    """Place host values / single-device arrays (the same on every process) replicated on ``mesh``."""
    sharding = NamedSharding(mesh, PartitionSpec())

    def place(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            data = np.asarray(jax.random.key_data(leaf))
            return jax.random.wrap_key_data(jax.make_array_from_callback(data.shape, sharding, lambda i: data[i]),
                                            impl=jax.random.key_impl(leaf))
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return leaf  # already a global array
        value = np.asarray(leaf)
        return jax.make_array_from_callback(value.shape, sharding, lambda i: value[i])

    return jax.tree.map(place, tree)


def replicate_on_mesh(tree: Any, mesh: Mesh) -> Any:
    """Global arrays → the same values replicated on every device of ``mesh`` (an all-gather).

    Math jitted on replicated inputs is the single-device program, so its results are bitwise what a
    one-device recomputation gives (``python -m sgcd_jax.rescore --require_exact``)."""
    return _identity(tree, jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), tree))


def shard_rows_on_mesh(tree: Any, mesh: Mesh, batch_axes: tuple[str, ...] = BATCH_AXES) -> Any:
    """Arrays with a leading batch dim → sharded over ``batch_axes`` like ``global_batch``'s (scalars
    stay replicated). No arithmetic: replicated inputs are just sliced."""
    axes = tuple(a for a in batch_axes if a in mesh.shape)
    return _identity(tree, jax.tree.map(
        lambda x: NamedSharding(mesh, PartitionSpec(axes, *([None] * (x.ndim - 1))) if x.ndim else PartitionSpec()),
        tree))


def _identity(tree: Any, shardings: Any) -> Any:
    return jax.jit(lambda x: x, out_shardings=shardings)(tree)


def local_rows(leaf: Any) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in global row order (numpy; the rows this
    process supplied to ``global_batch``). Replicas of a row on several local devices count once."""
    if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable:
        return np.asarray(leaf)
    pieces: dict[int, np.ndarray] = {}
    for shard in leaf.addressable_shards:
        start = shard.index[0].start or 0
        pieces.setdefault(start, np.asarray(shard.data))
    rows = np.concatenate([pieces[k] for k in sorted(pieces)], axis=0)
    if len(rows) == leaf.shape[0]:  # every row on this process: not split over processes
        raise ValueError(f"local_rows: array {leaf.shape} ({leaf.sharding}) is not split over processes on "
                         "its first dim, so this process's rows are unknown; reshard it first "
                         "(distributed.shard_rows_on_mesh)")
    return rows


def local_mesh(mesh: Mesh) -> Mesh:
    """The sub-mesh of ``mesh`` on this process's devices (same axis names; axes that span processes
    shrink). Single process: ``mesh`` itself. Raises when this process's devices are not a block."""
    if jax.process_count() == 1:
        return mesh
    devices = mesh.devices
    mine = np.vectorize(lambda d: d.process_index == jax.process_index())(devices)
    index = [np.unique(i) for i in np.nonzero(mine)]
    block = devices[np.ix_(*index)]
    if block.size != mine.sum() or not all(d.process_index == jax.process_index() for d in block.flat):
        raise ValueError(f"process {jax.process_index()}'s devices are not one block of the mesh "
                         f"{dict(mesh.shape)}: build it with sharding.make_mesh (process-major device order)")
    return Mesh(block, mesh.axis_names)


def process_local_view(tree: Any, mesh: Mesh) -> Any:
    """The same arrays as arrays on ``local_mesh(mesh)``, built from this process's shards without a
    copy: what a process samples rollouts with, while training keeps the global arrays. Needs every
    leaf replicated across the mesh axes that span processes (the data axis in the recommended
    meshes); single process: ``tree`` unchanged."""
    if jax.process_count() == 1:
        return tree
    local = local_mesh(mesh)
    spanning = {a for a in mesh.axis_names if local.shape[a] != mesh.shape[a]}

    def view(path, leaf: Any) -> Any:
        if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable:
            return leaf
        spec = leaf.sharding.spec if isinstance(leaf.sharding, NamedSharding) else None
        used = {a for entry in (spec or ()) if entry is not None
                for a in ((entry,) if isinstance(entry, str) else entry)}
        if spec is None or used & spanning:
            raise ValueError(f"{jax.tree_util.keystr(path)} is sharded over {sorted(used & spanning)}, mesh "
                             f"axes that span processes; a process-local rollout view needs it replicated "
                             f"across processes: split processes on 'data' only (mesh.data = number of hosts)")
        return jax.make_array_from_single_device_arrays(
            leaf.shape, NamedSharding(local, spec), [shard.data for shard in leaf.addressable_shards])

    return jax.tree_util.tree_map_with_path(view, tree)


# Cross-process metric reductions live in distributed_metrics.py; re-exported so callers keep one name.
from sgcd_jax.parallel.metrics import (allgather_json, fully_replicated_host_copy, reduce_metrics,  # noqa: E402,F401
                                          reduce_metrics_union, reduce_ratio, weighted_mean_across_processes)
