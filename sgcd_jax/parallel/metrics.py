"""Metrics across processes: job-wide means / maxima of per-process scalars, JSON all-gathers and a
host copy of replicated arrays (``distributed`` re-exports these names)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

def reduce_metrics(metrics: Mapping[str, Any], op: str = "mean") -> dict[str, float]:
    """Combine per-process scalar metrics (host floats) into job-wide values, same on every process.

    op: "mean" | "sum" | "max" | "min". Every process must pass the same keys (one allgather); when
    processes may report different keys use ``reduce_metrics_union``. For ratios use
    ``reduce_ratio`` on sums and denominators.
    """
    reducers = {"mean": np.mean, "sum": np.sum, "max": np.max, "min": np.min}
    if op not in reducers:
        raise ValueError(f"reduce_metrics op={op!r}; use one of {sorted(reducers)}")
    keys = sorted(metrics)
    local = np.asarray([float(metrics[k]) for k in keys], np.float64)  # [K]
    gathered = _allgather_rows(local)  # [P, K]
    return {k: float(v) for k, v in zip(keys, reducers[op](gathered, axis=0))}


def reduce_metrics_union(metrics: Mapping[str, Any], op: str = "mean") -> dict[str, float]:
    """``reduce_metrics`` over the union of the processes' keys (the key lists go through the
    coordinator's key-value store first): a key a process lacks — a failure reason it never saw —
    is left out of that key's reduction there."""
    reducers = {"mean": np.nanmean, "sum": np.nansum, "max": np.nanmax, "min": np.nanmin}
    if op not in reducers:
        raise ValueError(f"reduce_metrics_union op={op!r}; use one of {sorted(reducers)}")
    keys = sorted(metrics)
    if jax.process_count() > 1:
        keys = sorted({k for other in allgather_json(keys, "metric-keys") for k in other})
    local = np.asarray([float(metrics.get(k, np.nan)) for k in keys], np.float64)  # [K]
    gathered = _allgather_rows(local)  # [P, K]
    with warnings.catch_warnings():  # a key that is NaN on every process stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return {k: float(v) for k, v in zip(keys, reducers[op](gathered, axis=0))}


def reduce_ratio(numerators: Mapping[str, float], denominators: Mapping[str, float]
                 ) -> dict[str, float]:
    """Job-wide sum(num)/sum(den) per key — exact token-weighted means across processes."""
    num = reduce_metrics(numerators, "sum")
    den = reduce_metrics({k: denominators[k] for k in numerators}, "sum")
    return {k: num[k] / den[k] if den[k] else float("nan") for k in num}


def _allgather_rows(local: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return local[None]
    from jax.experimental import multihost_utils

    # float32 on device (x64 is usually off); exact for counts below 2**24.
    gathered = multihost_utils.process_allgather(jnp.asarray(local, jnp.float32), tiled=False)
    return np.asarray(gathered, np.float64).reshape(jax.process_count(), -1)


def allgather_json(value: Any, name: str, timeout_s: int = 600) -> list[Any]:
    """Every process's JSON-able ``value`` (small host objects: eval summaries), in process order,
    through the coordinator's key-value store. ``name`` must be unique per call (e.g. with the step)."""
    import json

    if jax.process_count() == 1:
        return [value]
    from jax._src import distributed as jax_distributed_state

    client = jax_distributed_state.global_state.client
    if client is None:
        raise RuntimeError("allgather_json() with several processes but jax.distributed is not initialised")
    prefix = f"sgcd/{name}/{_exchange_counter(name)}"
    client.key_value_set(f"{prefix}/{jax.process_index()}", json.dumps(value))
    try:
        return [json.loads(client.blocking_key_value_get(f"{prefix}/{p}", int(timeout_s * 1000)))
                for p in range(jax.process_count())]
    except Exception as error:  # noqa: BLE001
        raise RuntimeError(f"process {jax.process_index()} timed out exchanging {name!r} after {timeout_s}s: "
                           f"a peer process died or is stuck ({error})") from error


_EXCHANGES: dict[str, int] = {}


def _exchange_counter(name: str) -> int:
    _EXCHANGES[name] = _EXCHANGES.get(name, 0) + 1  # every process calls in the same order
    return _EXCHANGES[name]


def weighted_mean_across_processes(metrics: Mapping[str, float], weight: float, name: str) -> dict[str, float]:
    """Per key, the ``weight``-weighted mean over the processes that report it (e.g. eval metrics
    averaged over tasks when each process evaluated ``weight`` tasks); same result on every process."""
    gathered = allgather_json({"weight": float(weight), "metrics": {k: float(v) for k, v in metrics.items()}}, name)
    out: dict[str, float] = {}
    for key in sorted({k for g in gathered for k in g["metrics"]}):
        pairs = [(g["weight"], g["metrics"][key]) for g in gathered if key in g["metrics"] and g["weight"] > 0]
        total = sum(w for w, _ in pairs)
        out[key] = sum(w * v for w, v in pairs) / total if total else float("nan")
    return out


def fully_replicated_host_copy(tree: Any) -> Any:
    """numpy copy of every leaf on every process: sharded global arrays are gathered, arrays this
    process already holds whole (numpy, fully addressable) are copied as they are."""
    from jax.experimental import multihost_utils

    def copy(leaf: Any) -> np.ndarray:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return np.asarray(leaf)

    return jax.tree.map(copy, tree)
