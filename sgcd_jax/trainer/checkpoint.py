"""Orbax checkpointing of the whole training state, for exact resume.

Saved per step: ``state`` (params, optimizer state, PRNG key data, as one pytree; async) and
``meta`` (JSON: iteration, grain iterator state, annotation-cache pointer, counters, RNG/numpy
state the host loop needs). ``latest`` keeps the newest ``keep`` steps; ``best`` keeps the single
step with the highest eval success (best-by-eval), written only when eval improves.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _to_host_tree(tree: Any) -> Any:
    """Typed PRNG keys → raw uint32 key data (orbax stores plain arrays)."""
    def convert(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key_data(x)
        return x
    return jax.tree.map(convert, tree)


class TrainCheckpointer:
    """Owns the orbax managers of one run dir. ``save`` is async; ``wait`` blocks until durable."""

    def __init__(self, run_dir: str, *, keep: int = 2):
        self.directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
        handlers = dict(state=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler())
        self._latest = ocp.CheckpointManager(
            self.directory, item_names=("state", "meta"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                                 create=True),
            item_handlers=handlers)
        self._best = ocp.CheckpointManager(
            os.path.join(self.directory, "best"), item_names=("state", "meta"),
            options=ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=True,
                                                 create=True, best_fn=lambda m: m["eval_success"],
                                                 best_mode="max"),
            item_handlers=dict(state=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler()))

    def latest_step(self) -> int | None:
        return self._latest.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> None:
        if step in self._latest.all_steps():  # e.g. the final save on a checkpoint_every boundary
            return
        args = ocp.args.Composite(state=ocp.args.StandardSave(_to_host_tree(state)),
                                  meta=ocp.args.JsonSave(_jsonable(meta)))
        self._latest.save(step, args=args, force=force)

    def save_best(self, step: int, state: Any, meta: dict[str, Any], eval_success: float) -> None:
        if step in self._best.all_steps():
            return
        args = ocp.args.Composite(state=ocp.args.StandardSave(_to_host_tree(state)),
                                  meta=ocp.args.JsonSave(_jsonable(meta)))
        self._best.save(step, args=args, metrics={"eval_success": float(eval_success)}, force=True)

    def best_step(self) -> int | None:
        return self._best.best_step()

    def restore(self, step: int, abstract_state: Any, *, best: bool = False) -> tuple[Any, dict]:
        """Restore into the structure/dtypes/shardings of ``abstract_state`` (typed keys restored)."""
        manager = self._best if best else self._latest
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_host_tree(abstract_state))
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        state = jax.tree.map(_rewrap_key, abstract_state, restored.state)
        return state, dict(restored.meta)

    def has_reference(self) -> bool:
        return os.path.isdir(os.path.join(self.directory, "reference"))

    def save_reference(self, params: Any) -> None:
        """The frozen KL reference (written once, synchronously)."""
        with ocp.StandardCheckpointer() as writer:
            writer.save(os.path.join(self.directory, "reference"), _to_host_tree(params))

    def restore_reference(self, abstract_params: Any) -> Any:
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_params)
        with ocp.StandardCheckpointer() as reader:
            return reader.restore(os.path.join(self.directory, "reference"), target)

    def wait(self) -> None:
        self._latest.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self._latest.close()
        self._best.close()


def _rewrap_key(like: Any, value: Any) -> Any:
    if isinstance(like, jax.Array) and jax.dtypes.issubdtype(like.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(value, impl=jax.random.key_impl(like))
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value
