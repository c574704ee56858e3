"""The trainer's world and its two phases: ``Trainer`` holds what every phase needs (config, learner,
env factory, chat renderer, task stream, annotator, rollout store, reference model, counters, the
host PRNG key) so ``train.py``'s loop and ``bench/iteration.py`` drive the same object:

    rolled = trainer.roll(i)          # rollouts → rewards → sibling selection → submit annotation
    metrics, samples = trainer.finish(rolled)   # annotation → teacher contexts → score → credit → update

``phases`` keeps the phase functions themselves (host code; the math is jitted in ``scoring`` /
``train_step`` / ``losses``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax

from sgcd_jax.trainer import phases as parts
from sgcd_jax.config import TrainConfig
from sgcd_jax.data.tasks import TaskStream
from sgcd_jax.data.store import RolloutStore
from sgcd_jax.learner.train_step import Learner


def due(step: int, every: int) -> bool:
    """Whether a periodic action (eval, checkpoint) falls on ``step``; ``every`` = 0: never."""
    return bool(every) and step % every == 0


@dataclasses.dataclass
class Trainer:
    config: TrainConfig
    learner: Learner
    env_factory: Any
    chat: Any
    stream: TaskStream
    rng: jax.Array
    annotator: Any = None
    store: RolloutStore | None = None
    ref_model: Any = None
    counters: parts.Counters = dataclasses.field(default_factory=parts.Counters)
    last_finish: float = dataclasses.field(default_factory=time.perf_counter)
    rollout_memory: dict = dataclasses.field(default_factory=dict)

    def roll(self, index: int) -> parts.Rolled:
        """Iteration ``index``'s rollouts, selection and annotation submission (one key per call)."""
        self.rng, rollout_key = jax.random.split(self.rng)
        rolled = parts.rollout_phase(index, self.learner, self.stream, self.env_factory, self.chat, self.annotator,
                                     rollout_key, self.config, self.counters)
        self.rollout_memory = memory_metrics("after_rollout")
        return rolled

    def finish(self, rolled: parts.Rolled) -> tuple[dict[str, float], list]:
        """Score and update on ``rolled``; off-policy by a step when an update ran since it was sampled."""
        metrics, samples = parts.update_phase(rolled, self.learner, self.ref_model, self.env_factory, self.chat,
                                              self.annotator, self.config, self.counters, self.store,
                                              sampler_is_old=self.counters.updates != rolled.updates_at_rollout)
        now = time.perf_counter()
        metrics["time/iteration_s"] = now - max(self.last_finish, rolled.started)
        metrics.update({**self.rollout_memory, **memory_metrics("after_update")})
        self.last_finish = now
        return metrics, samples

    def evaluate(self, tasks) -> dict[str, float]:
        """The bare student on held-out ``tasks`` (``phases.evaluate_student``)."""
        return parts.evaluate_student(self.learner, self.env_factory, tasks, self.chat, self.config)

    def state(self, mesh) -> dict[str, Any]:
        """What a checkpoint saves: params, optimizer state and the host PRNG key."""
        key = self.rng if jax.process_count() == 1 else _replicated_key(self.rng, mesh)
        return {**self.learner.state(), "rng": key}

    def close(self) -> None:
        if self.annotator is not None:
            self.annotator.close(wait=False)


def memory_metrics(when: str) -> dict[str, float]:
    """This process's host memory now (``memory/rss_gb_<when>``), its peak so far (``memory/peak_rss_gb``, VmHWM)
    and the bytes of the jax buffers alive on this process (``memory/live_arrays_gb_<when>``): a gap between RSS and
    live buffers is runtime, compiled programs and allocator caching. Linux /proc; else buffers only."""
    out = {f"memory/live_arrays_gb_{when}": live_buffer_bytes() / 1e9}
    try:
        with open("/proc/self/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        out[f"memory/rss_gb_{when}"] = int(status["VmRSS"].split()[0]) * 1024 / 1e9
        out["memory/peak_rss_gb"] = int(status["VmHWM"].split()[0]) * 1024 / 1e9
    except (OSError, KeyError, ValueError):
        pass
    return out


def live_buffer_bytes() -> int:
    """Bytes of the distinct device buffers behind ``jax.live_arrays()`` on this process. Several arrays can view
    one buffer (an array and its shards' ``.data``, which orbax's save takes): summing ``nbytes`` counted SmolLM2's
    state twice after a checkpoint while RSS had not grown. Each buffer is counted once, by (device, address)."""
    seen: dict[tuple[Any, int], int] = {}
    for array in jax.live_arrays():
        try:
            for shard in array.addressable_shards:
                seen[(shard.device, shard.data.unsafe_buffer_pointer())] = shard.data.nbytes
        except Exception:  # noqa: BLE001 — deleted/donated meanwhile, or a backend without raw pointers
            seen[(None, id(array))] = 0 if array.is_deleted() else array.nbytes
    return sum(seen.values())


def _replicated_key(key: jax.Array, mesh) -> jax.Array:
    """The host loop's key as orbax saves it when several processes save one checkpoint."""
    from sgcd_jax.parallel import distributed

    return distributed.replicated(key, mesh)
