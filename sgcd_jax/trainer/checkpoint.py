"""Orbax checkpointing of the whole training state, for exact resume.

Saved per step: ``state`` (params, optimizer state, PRNG key data, as one pytree; async) and
``meta`` (JSON: iteration, grain iterator state, annotation-cache pointer, counters, RNG/numpy
state the host loop needs). ``latest`` keeps the newest ``keep`` steps; ``best`` keeps the single
step with the highest eval success (best-by-eval), written only when eval improves.

Integrity (``trainer/integrity.py``): every save stores a fingerprint of the state's contents in
``meta``; a state with a non-finite leaf is never written (so it can never rotate out a good
checkpoint). ``restore`` re-computes the fingerprint of what it read and raises ``CorruptCheckpoint``
naming the step dir on a mismatch, a non-finite value or an unreadable file; ``restore_latest``
then moves that step aside (``checkpoints/corrupt-<step>``) and uses the previous intact one.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from sgcd_jax.trainer import integrity

logger = logging.getLogger(__name__)


class CorruptCheckpoint(RuntimeError):
    """A checkpoint step that cannot be read back intact (the message names its directory)."""


def _checked_meta(state: Any, meta: dict[str, Any], what: str) -> dict[str, Any] | None:
    """``meta`` plus the state's fingerprint, or None (nothing is saved) when a leaf is non-finite."""
    digest, finite = integrity.fingerprint(_to_host_tree(state))
    if not all(finite):
        bad = integrity.non_finite_paths(_to_host_tree(state), finite)
        logger.error("not saving %s: non-finite values in %s%s; the previous checkpoints are kept", what,
                     ", ".join(bad[:5]), " …" if len(bad) > 5 else "")
        return None
    return {**meta, "integrity": {"state_fingerprint": digest}}


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

    def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
        """Whether a checkpoint was written (False: the step exists already, or the state is non-finite)."""
        if step in self._latest.all_steps():  # e.g. the final save on a checkpoint_every boundary
            return False
        meta = _checked_meta(state, meta, f"checkpoint {step}")
        if meta is None:
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(_to_host_tree(state)),
                                  meta=ocp.args.JsonSave(_jsonable(meta)))
        self._latest.save(step, args=args, force=force)
        return True

    def save_best(self, step: int, state: Any, meta: dict[str, Any], eval_success: float) -> None:
        if step in self._best.all_steps():
            return
        meta = _checked_meta(state, meta, f"best checkpoint {step}")
        if meta is None:
            return
        args = ocp.args.Composite(state=ocp.args.StandardSave(_to_host_tree(state)),
                                  meta=ocp.args.JsonSave(_jsonable(meta)))
        self._best.save(step, args=args, metrics={"eval_success": float(eval_success)}, force=True)

    def best_step(self) -> int | None:
        return self._best.best_step()

    def restore(self, step: int, abstract_state: Any, *, best: bool = False) -> tuple[Any, dict]:
        """Restore into the structure/dtypes/shardings of ``abstract_state`` (typed keys restored)."""
        manager = self._best if best else self._latest
        where = os.path.join(manager.directory, str(step))
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_host_tree(abstract_state))
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
            meta = dict(restored.meta)
        except Exception as err:  # noqa: BLE001 — orbax / tensorstore / json errors alike
            raise CorruptCheckpoint(f"checkpoint {where} is unreadable: {type(err).__name__}: "
                                    f"{str(err)[:300]}") from err
        digest, finite = integrity.fingerprint(restored.state)
        if not all(finite):
            raise CorruptCheckpoint(f"checkpoint {where} holds non-finite values in "
                                    f"{integrity.non_finite_paths(restored.state, finite)[:5]}")
        expected = (meta.get("integrity") or {}).get("state_fingerprint")
        if expected is not None and expected != digest:
            raise CorruptCheckpoint(f"checkpoint {where}: its arrays do not match the fingerprint saved with "
                                    "them (data files changed on disk)")
        state = jax.tree.map(_rewrap_key, abstract_state, restored.state)
        return state, {k: v for k, v in meta.items() if k != "integrity"}

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | tuple[None, None, None]:
        """(step, state, meta) of the newest intact checkpoint, or (None, None, None) if there is none.
        A corrupt step is reported by path, moved to ``corrupt-<step>`` and the previous one tried;
        raises ``CorruptCheckpoint`` when steps exist but none is intact."""
        errors = []
        for step in sorted(self._latest.all_steps(), reverse=True):
            try:
                state, meta = self.restore(step, abstract_state)
            except CorruptCheckpoint as err:
                logger.error("%s; falling back to the previous checkpoint", err)
                errors.append(str(err))
                self._quarantine(step)
                continue
            if errors:
                logger.warning("resuming from intact checkpoint %d after %d corrupt one(s)", step, len(errors))
            return step, state, meta
        if errors:
            raise CorruptCheckpoint("no intact checkpoint to resume from: " + " | ".join(errors)
                                    + " — delete the run dir's checkpoints or set run.resume=False")
        return None, None, None

    def _quarantine(self, step: int) -> None:
        """Move a corrupt step out of the manager's view (kept for inspection), so a new save of the
        same step number is not skipped as 'already saved'."""
        source = os.path.join(self.directory, str(step))
        if jax.process_index() == 0 and os.path.isdir(source):
            target = os.path.join(self.directory, f"corrupt-{step}")
            suffix = 0
            while os.path.exists(target):
                suffix += 1
                target = os.path.join(self.directory, f"corrupt-{step}.{suffix}")
            os.replace(source, target)
            logger.error("moved corrupt checkpoint %s to %s", source, target)
        if jax.process_count() > 1:
            from sgcd_jax.parallel import distributed
            distributed.barrier(f"checkpoint-quarantine-{step}", timeout_s=distributed.resolve_config().barrier_timeout_s)
        self._latest.reload()

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
