"""What the trainer's end-to-end tests share: the tiny world (model, env, rollout sizes) each test adds
its run/SFT/eval keys to, the metric prefixes that vary between identical runs, and a verifier that
makes every group mixed (a random tiny policy never succeeds on its own)."""

from __future__ import annotations

from typing import Callable

TINY_WORLD = {
    "run.progress": False, "run.tensorboard": False, "model.hidden_size": 32, "model.intermediate_size": 64,
    "model.num_layers": 1, "model.num_heads": 2, "model.num_kv_heads": 1, "model.head_dim": 16,
    "model.domain_vocab_size": 1024, "env.num_tasks": 8, "env.max_turns": 2, "rollout.tasks_per_iteration": 2,
    "rollout.group_size": 2, "rollout.max_new_tokens": 12, "rollout.max_total_tokens": 768,
    "optim.micro_batch_size": 2, "annotation.reference_tokens": 256,
}
# metrics that differ between equal runs: wall clock, and the jit-compile count (a resumed process compiles
# the sampler again where an uninterrupted one reuses its cache)
VOLATILE = ("time", "time/", "throughput/", "annotator/latency", "rollout/compiles", "memory/")  # memory: per process


def coin_flip_rollout(rollout: Callable, on_trajectory: Callable | None = None) -> Callable:
    """``rollout`` (integration.rollout) with odd siblings rewarded 1 and even ones 0, so every group
    of G ≥ 2 is mixed; ``on_trajectory`` sees each trajectory after its reward is set."""

    def wrapped(*args, **kwargs):
        trajectories = rollout(*args, **kwargs)
        for traj in trajectories:
            traj.reward = float(traj.sample_index % 2)
            if on_trajectory is not None:
                on_trajectory(traj)
        return trajectories

    return wrapped
