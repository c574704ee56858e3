"""Reuse an SFT warm-up across runs that would compute the identical one (``sft.cache_dir``).

A method comparison (``sgcd_jax.compare``: 4 methods × 3 seeds) starts every method of a seed from
the same post-SFT policy; without a cache each run repeats the warm-up (about a third of a quickstart
run). The key is a hash of everything the warm-up's result depends on: the model spec, the SFT spec,
the env spec, ``run.seed`` (init and demo order), ``rollout.max_total_tokens`` (which demos fit), the
tokenizer's files and the optimizer settings SFT reuses. Entries are orbax checkpoints written to a
temporary name and renamed, so a crash mid-write never leaves an entry that looks complete. Each
entry's ``integrity.json`` stores its key and a fingerprint of the params (``trainer/integrity.py``);
a restored entry whose key, fingerprint or finiteness does not check out is reported, removed and
recomputed (random bytes in a params file used to restore as a hit and train on NaNs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from sgcd_jax.trainer import integrity

logger = logging.getLogger(__name__)

# Bumped whenever the warm-up's computation changes for the same config (2: SFT batches padded to the
# longest demo instead of rollout.max_total_tokens), so an older entry is not restored as identical.
FORMAT_VERSION = 2


def cache_key(config: Any, tokenizer_dir: str | None = None) -> str:
    """Hex digest of every input of the SFT warm-up (``config``: a TrainConfig)."""
    parts = {"version": FORMAT_VERSION, "model": dataclasses.asdict(config.model),
             "sft": {k: v for k, v in dataclasses.asdict(config.sft).items() if k != "cache_dir"},
             "env": dataclasses.asdict(config.env), "seed": config.run.seed,
             "max_total_tokens": config.rollout.max_total_tokens,
             "optim": {k: getattr(config.optim, k) for k in ("schedule", "end_lr_fraction", "weight_decay", "b1", "b2",
                                                             "grad_clip", "micro_batch_size", "warmup_steps")},
             "loss": {"vocab_chunk": config.loss.vocab_chunk, "aggregation": config.policy.agg_mode}}
    if config.sft.reference_rate > 0:  # the reading rows' prompts (trainer/reading_demos.py)
        parts["reading_format"] = config.annotation.reference_format
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    if tokenizer_dir and os.path.isdir(tokenizer_dir):
        for name in sorted(os.listdir(tokenizer_dir)):
            with open(os.path.join(tokenizer_dir, name), "rb") as f:
                digest.update(name.encode() + f.read())
    return digest.hexdigest()[:20]


def _job_token() -> int:
    """Process 0's pid, agreed by every process (a temp name unique per job, shared within it)."""
    token = np.int64(os.getpid())
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        token = multihost_utils.broadcast_one_to_all(token)
    return int(token)


def cached_sft(params: Any, key: str, cache_dir: str, run_sft: Callable[[], tuple[Any, dict]]) -> tuple[Any, dict]:
    """(post-SFT params, metrics): restored from ``cache_dir/key`` when present, else ``run_sft()`` is
    called and its params saved there. ``params``: the current params (the restore target's layout
    and shardings). A corrupt entry is reported, removed and recomputed — it never fails the run."""
    entry = os.path.abspath(os.path.join(cache_dir, key))
    if os.path.isdir(entry):
        try:
            with ocp.StandardCheckpointer() as checkpointer:
                restored = checkpointer.restore(os.path.join(entry, "params"), params)
            with open(os.path.join(entry, "metrics.json")) as f:
                metrics = json.load(f)
            _verify(entry, key, restored)
            return restored, {**metrics, "sft/cache_hit": 1.0}
        except Exception as err:  # noqa: BLE001 — a bad entry costs a recompute, never the run
            logger.warning("SFT cache entry %s unreadable (%s); recomputing it", entry, err)
            if jax.process_index() == 0:
                shutil.rmtree(entry, ignore_errors=True)
    new_params, metrics = run_sft()
    digest, finite = integrity.fingerprint(new_params)
    if not all(finite):
        logger.error("SFT warm-up produced non-finite params (%s); not caching them",
                     integrity.non_finite_paths(new_params, finite)[:5])
        return new_params, {**metrics, "sft/cache_hit": 0.0}
    tmp = f"{entry}.tmp-{_job_token()}"  # one name for every process of the job: orbax writes it together
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(os.path.join(tmp, "params"), new_params)
            checkpointer.wait_until_finished()
        if jax.process_index() == 0:
            with open(os.path.join(tmp, "metrics.json"), "w") as f:
                json.dump({k: float(v) for k, v in metrics.items()}, f)
            with open(os.path.join(tmp, "integrity.json"), "w") as f:
                json.dump({"key": key, "params_fingerprint": digest}, f)
            if not os.path.isdir(entry):
                os.replace(tmp, entry)
    except OSError as err:  # a full or read-only disk must not lose the run: train on without the cache
        logger.warning("SFT cache write to %s failed (%s); continuing without caching", entry, err)
    finally:
        if jax.process_index() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    return new_params, {**metrics, "sft/cache_hit": 0.0}


class CorruptEntry(ValueError):
    """An SFT cache entry whose contents do not match what was written."""


def _verify(entry: str, key: str, params: Any) -> None:
    with open(os.path.join(entry, "integrity.json")) as f:  # missing (pre-integrity entry): recomputed
        stored = json.load(f)
    if stored.get("key") != key:
        raise CorruptEntry(f"entry names key {stored.get('key')!r}, not {key!r} (moved or copied)")
    digest, finite = integrity.fingerprint(params)
    if not all(finite):
        raise CorruptEntry(f"non-finite params in {integrity.non_finite_paths(params, finite)[:5]}")
    if digest != stored.get("params_fingerprint"):
        raise CorruptEntry("params do not match the fingerprint stored with them (files changed on disk)")


# ---- a warm-up interrupted by a signal: its state saved and resumed (trainer/preemption.py) ----
PARTIAL_DIR = "sft_partial"


def _partial_path(config: Any) -> str:
    return os.path.abspath(os.path.join(config.run_dir, PARTIAL_DIR))


def save_partial(sft_learner: Any, step: int, config: Any) -> None:
    """Save the SFT learner's params + optimizer state before step ``step`` (synchronously)."""
    path = _partial_path(config)
    tmp = f"{path}.tmp-{_job_token()}"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(tmp, "state"), {"params": sft_learner.params, "opt_state": sft_learner.opt_state})
        checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        with open(os.path.join(tmp, "progress.json"), "w") as f:
            json.dump({"step": int(step), "key": cache_key(config, os.path.join(config.run_dir, "tokenizer"))}, f)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    logger.warning("SFT warm-up interrupted before step %d: state saved in %s", step, path)


def restore_partial(sft_learner: Any, config: Any) -> int:
    """The step to start the warm-up at: 0, or where a saved partial warm-up of the same config stopped
    (its params and optimizer state loaded into ``sft_learner``)."""
    path = _partial_path(config)
    if not os.path.isdir(path):
        return 0
    try:
        with open(os.path.join(path, "progress.json")) as f:
            progress = json.load(f)
        if progress["key"] != cache_key(config, os.path.join(config.run_dir, "tokenizer")):
            logger.warning("ignoring %s: saved by a warm-up with another config", path)
            return 0
        with ocp.StandardCheckpointer() as checkpointer:
            state = checkpointer.restore(os.path.join(path, "state"),
                                         {"params": sft_learner.params, "opt_state": sft_learner.opt_state})
    except Exception as err:  # noqa: BLE001 — an unreadable partial warm-up is redone, never fatal
        logger.warning("ignoring unreadable partial SFT warm-up %s (%s); starting it over", path, err)
        return 0
    sft_learner.params, sft_learner.opt_state = state["params"], state["opt_state"]
    logger.warning("resuming the SFT warm-up at step %d from %s", progress["step"], path)
    return int(progress["step"])


def clear_partial(config: Any) -> None:
    if jax.process_index() == 0:
        shutil.rmtree(_partial_path(config), ignore_errors=True)
