"""RolloutEngine: the host loop that turns (tasks × G siblings) into Trajectories.

    engine = RolloutEngine(sampler, ChatRenderer(tokenizer), RolloutConfig(max_turns=30))
    trajectories = engine.run(tasks, env_factory, group_size=8, rng=jax.random.key(0))

Per turn, for every live episode at once: the pending ids (prompt, or observation suffix + generation
prompt) are appended to the episode's KV-cache row and one assistant turn is sampled (one batched
`GenerationSession.step`); the turn is parsed (hermes tool calls); valid calls go to `env.step`, all
episodes' env calls run concurrently in a thread pool with a per-call timeout; rejected calls become
error observations the agent sees. An env that raises, hangs or returns garbage ends only its own
episode (termination "env_error" / "env_timeout"). Episodes end on env done, `max_turns` or
`max_total_tokens`; their cache rows are then released (the batch compacts). Each trajectory keeps its
end reason (`termination`: env_done / the env's own / max_turns / max_tokens / env_error / env_timeout).

With `decode_slots > 0` the turns are not synchronous (continuous batching, `sampling.continuous`): a
fixed number of decode slots; a turn that ends goes to the env pool at once while the other slots keep
decoding, and a slot whose episode ended or waits is given to a queued turn. Same per-episode keys, so
the same tokens as the synchronous loop (tests/test_continuous_batching.py).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from collections.abc import Hashable, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from sgcd_jax.envs.base import AgentAction, EnvFactory, EnvReset, Task
from sgcd_jax.rollout.episode import EnvCallError, Episode, checked_env_step, wait_result
from sgcd_jax.daemon_pool import DaemonThreadPool
from sgcd_jax.rollout.toolparse import parse_tool_calls
from sgcd_jax.rollout.trajectory import Step, Trajectory
from sgcd_jax.sampling.session import TurnOutput


class Renderer(Protocol):
    """What the engine needs from chat rendering (sgcd_jax.models.chat.ChatRenderer implements it)."""

    tokenizer: Any

    def prompt_ids(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None,
                   add_generation_prompt: bool = True) -> list[int]: ...

    def continuation_ids(self, messages: Sequence[dict[str, Any]], new_messages: Sequence[dict[str, Any]],
                         tools: Sequence[dict[str, Any]] | None = None, add_generation_prompt: bool = True,
                         generated_ended_with_end_of_turn: bool = True) -> list[int]: ...

    def stop_token_ids(self) -> tuple[int, ...]: ...


class TurnSession(Protocol):
    def step(self, chunks: dict[Hashable, Sequence[int]], *, max_new_tokens: int | dict[Hashable, int],
             rng: jax.Array, stop_strings: Sequence[str] = ()) -> dict[Hashable, TurnOutput]: ...


class TurnGenerator(Protocol):
    """sgcd_jax.sampling.Sampler, or a scripted stand-in in tests."""

    def session(self) -> TurnSession: ...

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, rng: jax.Array,
                 stop_strings: Sequence[str] = ()) -> list[TurnOutput]: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    max_turns: int = 30  # assistant turns per episode
    max_tokens_per_turn: int = 512
    max_total_tokens: int = 16384  # whole conversation (prompt + all turns + observations)
    env_timeout_s: float = 60.0  # per reset / step / reward call
    env_workers: int = 32
    stop_strings: tuple[str, ...] = ()
    # > 0: continuous batching over this many decode slots (sampling.continuous; needs a generator with
    # `continuous(num_slots)`, no stop strings); 0: synchronous turns (every live episode, then every env)
    decode_slots: int = 0

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_tokens_per_turn", "max_total_tokens", "env_workers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RolloutConfig.{name} must be positive, got {getattr(self, name)}")
        if self.decode_slots < 0:
            raise ValueError(f"RolloutConfig.decode_slots must be >= 0, got {self.decode_slots}")
        if self.env_timeout_s <= 0:
            raise ValueError(f"RolloutConfig.env_timeout_s must be positive, got {self.env_timeout_s}")


class RolloutEngine:
    def __init__(self, generator: TurnGenerator, renderer: Renderer, config: RolloutConfig = RolloutConfig()):
        self.generator = generator
        self.renderer = renderer
        self.config = config
        self.stop_token_ids = set(renderer.stop_token_ids())
        self._runs = 0
        self._chat_rng = jax.random.key(0)
        self.last_run_stats: dict[str, float] = {}

    # ------------------------------------------------------------------ public
    def run(self, tasks: Sequence[Task], env_factory: EnvFactory, group_size: int,
            rng: jax.Array, task_slots: Sequence[int] | None = None) -> list[Trajectory]:
        """G = group_size sibling episodes per task → trajectories ordered task-major, sibling-minor.

        Sampling keys are per episode: fold_in(fold_in(rng, slot), sibling), then per turn and token
        position, where ``task_slots[t]`` (default t) names task t's place in the job-wide batch. An
        episode's tokens thus depend only on (rng, slot, sibling), not on which episodes share this
        call: a multi-host rollout (each host its slots) samples exactly what one host would."""
        if group_size <= 0:
            raise ValueError(f"group_size must be positive, got {group_size}")
        slots = list(range(len(tasks))) if task_slots is None else [int(s) for s in task_slots]
        if len(slots) != len(tasks) or len(set(slots)) != len(slots):
            raise ValueError(f"task_slots must give one distinct slot per task, got {slots} for {len(tasks)} tasks")
        self._runs += 1
        started = time.monotonic()
        cfg = self.config
        pool = DaemonThreadPool(cfg.env_workers, thread_name_prefix="env")  # a hung env call cannot pin exit
        try:
            episodes = [Episode(key=(t, g), task=task, group_id=f"{task.task_id}/run{self._runs}")
                        for t, task in enumerate(tasks) for g in range(group_size)]
            self._reset_all(episodes, env_factory, pool)
            episode_keys = _episode_keys(rng, slots, group_size)  # [tasks * G], task-major
            compiles_before = _compiles(self.generator)
            if self._continuous():
                turn, batching = self._run_continuous(episodes, episode_keys, group_size, pool)
            else:
                session = self.generator.session()
                turn = 0
                while live := [e for e in episodes if not e.done]:
                    keys = list(turn_keys(episode_keys, [len(e.steps) for e in episodes]))  # [tasks * G]
                    self._generate_turn(session, live, {e.key: keys[e.key[0] * group_size + e.key[1]]
                                                        for e in live})
                    self._step_envs([e for e in live if not e.done], pool)
                    turn += 1
                session.step({}, max_new_tokens=0, rng=rng)  # release the cache
                stats = getattr(session, "stats", None)
                batching = {} if stats is None else {
                    "decode_row_steps": float(stats.decode_row_steps),
                    "slot_utilization": stats.generated_tokens / max(stats.decode_row_steps, 1)}
            compiles = _compiles(self.generator) - compiles_before
            trajectories = self._finish_all(episodes, pool)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # a hung env thread must not block us
        elapsed = time.monotonic() - started
        generated = sum(int(t.loss_mask.sum()) for t in trajectories)
        self.last_run_stats = {"wall_s": elapsed, "generated_tokens": float(generated),
                               "generated_tokens_per_s": generated / max(elapsed, 1e-9), "turn_rounds": float(turn),
                               "compiles": float(compiles), **batching}
        return trajectories

    def chat(self, messages: list[dict[str, Any]], *, max_new_tokens: int = 256, rng: jax.Array | None = None) -> str:
        """generate(messages) → assistant text; e.g. a local-model user simulator (envs.users.LocalModelUser)."""
        if rng is None:
            self._chat_rng, rng = jax.random.split(self._chat_rng)
        prompt = self.renderer.prompt_ids(messages, None, add_generation_prompt=True)
        out = self.generator.generate([prompt], max_new_tokens=max_new_tokens, rng=rng)[0]
        return self._decode_turn(out.token_ids)

    generate = chat  # the `generate(messages) -> str` callable envs.users.LocalModelUser expects

    # ------------------------------------------------------------------ phases
    def _reset_all(self, episodes: list[Episode], env_factory: EnvFactory, pool) -> None:
        deadline = time.monotonic() + self.config.env_timeout_s
        futures = {}
        for episode in episodes:
            try:
                episode.env = env_factory.make()
                futures[episode.key] = pool.submit(episode.env.reset, episode.task)
            except Exception as exc:  # noqa: BLE001
                episode.finish("env_error", f"env_factory.make/reset raised {type(exc).__name__}: {exc}")
        for episode in episodes:
            if episode.done:
                continue
            try:
                reset = wait_result(futures[episode.key], deadline, "env.reset")
                if not isinstance(reset, EnvReset) or not isinstance(reset.messages, list):
                    raise EnvCallError("env_error", f"env.reset returned {type(reset).__name__}, expected EnvReset")
                episode.messages, episode.tools = list(reset.messages), list(reset.tools or [])
                prompt = self.renderer.prompt_ids(episode.messages, episode.tools, add_generation_prompt=True)
            except EnvCallError as exc:
                episode.finish(exc.termination, str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 — e.g. the template rejects a malformed message
                episode.finish("env_error", f"rendering the reset messages failed: {type(exc).__name__}: {exc}")
                continue
            episode.add_context(prompt)
            episode.prompt_len = len(prompt)
            if len(prompt) >= self.config.max_total_tokens:
                episode.finish("max_tokens", f"prompt has {len(prompt)} tokens >= max_total_tokens")

    def _generate_turn(self, session: TurnSession, live: list[Episode], rng: jax.Array | dict) -> None:
        cfg = self.config
        budgets = {e.key: min(cfg.max_tokens_per_turn, cfg.max_total_tokens - len(e.token_ids)) for e in live}
        started = time.monotonic()
        outputs = session.step({e.key: e.pending for e in live}, max_new_tokens=budgets, rng=rng,
                               stop_strings=cfg.stop_strings)
        elapsed = time.monotonic() - started
        for episode in live:
            self._record_turn(episode, outputs[episode.key], elapsed)

    def _record_turn(self, episode: Episode, out: TurnOutput, elapsed: float) -> None:
        """Book one generated turn: tokens/logprobs/loss mask, parsed tool calls, budget end."""
        step_index = len(episode.steps)
        episode.add_generated(out.token_ids, out.logprobs, step_index)
        episode.timing["generate_s"] += elapsed
        episode.metrics["generated_tokens"] += len(out.token_ids)
        text = self._decode_turn(out.token_ids)
        parsed = parse_tool_calls(text, episode.tools)
        episode.messages.append({"role": "assistant", "content": text})
        episode.steps.append(Step(index=step_index, text=text, tool_calls=list(parsed.action.tool_calls),
                                  observations=[], parse_error="; ".join(e.message for e in parsed.errors)))
        episode.metrics["turns"] += 1
        episode.metrics["tool_calls"] += parsed.num_calls
        for error in parsed.errors:
            episode.metrics[error.kind] += 1
        episode.parsed = parsed
        episode.ended_with_end_of_turn = bool(len(out.token_ids)) and int(out.token_ids[-1]) in self.stop_token_ids
        if len(episode.token_ids) >= self.config.max_total_tokens:
            episode.finish("max_tokens")

    def _step_envs(self, live: list[Episode], pool) -> None:
        deadline = time.monotonic() + self.config.env_timeout_s
        futures = {}
        for episode in live:
            action: AgentAction = episode.parsed.action
            if episode.parsed.errors and not action.tool_calls:
                continue  # only rejected calls: the agent just sees the errors, the env is not called
            futures[episode.key] = pool.submit(episode.env.step, action)
        for episode in live:
            started = time.monotonic()
            if episode.key in futures:
                try:
                    result = checked_env_step(wait_result(futures[episode.key], deadline, "env.step"))
                except EnvCallError as exc:
                    self._apply_env_result(episode, exc)
                    continue
                finally:
                    episode.timing["env_s"] += time.monotonic() - started
                self._apply_env_result(episode, result)
            else:
                self._apply_env_result(episode, None)

    def _apply_env_result(self, episode: Episode, result: Any) -> None:
        """Book an env step (an EnvStep, an EnvCallError, or None when only rejected calls were made): the
        observations, the end (done / max_turns / max_tokens / env error) or the next turn's pending ids."""
        if isinstance(result, EnvCallError):
            episode.metrics[result.termination] += 1
            episode.finish(result.termination, str(result))
            return
        observations, done, termination = [], False, ""
        if result is not None:
            observations, done, termination = result.observations, result.done, result.termination
            episode.metrics["env_tool_errors"] += result.tool_errors
        observations = observations + episode.parsed.error_observations()
        episode.steps[-1].observations = observations
        if done:
            episode.messages += observations  # shown to humans; never read by the policy
            episode.finish(termination or "env_done")
            return
        if len(episode.steps) >= self.config.max_turns:
            episode.messages += observations
            episode.finish("max_turns")
            return
        try:
            suffix = self.renderer.continuation_ids(
                episode.messages, observations, episode.tools, add_generation_prompt=True,
                generated_ended_with_end_of_turn=episode.ended_with_end_of_turn)
        except Exception as exc:  # noqa: BLE001
            episode.finish("env_error", f"rendering observations failed: {type(exc).__name__}: {exc}")
            return
        episode.messages += observations
        episode.add_context(suffix)
        if len(episode.token_ids) >= self.config.max_total_tokens:
            episode.finish("max_tokens")

    # ------------------------------------------------------------------ continuous batching
    def _continuous(self) -> bool:
        return self.config.decode_slots > 0 and hasattr(self.generator, "continuous")

    def _run_continuous(self, episodes: list[Episode], episode_keys: jax.Array, group_size: int,
                        pool) -> tuple[int, dict[str, float]]:
        """Decode slots refilled across episodes: a turn that ends goes to the env thread pool at once while
        the other slots keep decoding; the observation comes back as the episode's next queued turn. The
        same per-episode keys as the synchronous loop (fold_in(episode key, turn), then token position)."""
        cfg = self.config
        if cfg.stop_strings:
            raise ValueError("rollout stop strings need the synchronous engine (rollout.decode_slots=0)")
        slots = self.generator.continuous(cfg.decode_slots, prompts=-(-len(episodes) // group_size))
        index = {e.key: e.key[0] * group_size + e.key[1] for e in episodes}
        in_env: dict[Any, tuple[concurrent.futures.Future, float, float]] = {}  # key → (future, started, deadline)
        turn_started: dict[Any, float] = {}

        def queue_turn(episode: Episode) -> None:
            budget = min(cfg.max_tokens_per_turn, cfg.max_total_tokens - len(episode.token_ids))
            key = turn_keys(episode_keys[index[episode.key]][None], [len(episode.steps)])[0]
            slots.submit(episode.key, episode.pending, max_new_tokens=budget, rng=key)
            turn_started[episode.key] = time.monotonic()

        for episode in episodes:
            if not episode.done:
                queue_turn(episode)
        by_key = {e.key: e for e in episodes}
        chunks = 0
        while slots.has_work() or in_env:
            if slots.has_work():
                outputs = slots.step()
                chunks += 1
            else:  # every live episode waits on its env: block until one returns
                concurrent.futures.wait([f for f, _, _ in in_env.values()], return_when="FIRST_COMPLETED",
                                        timeout=max(min(d for _, _, d in in_env.values()) - time.monotonic(), 0.0))
                outputs = {}
            for key, out in outputs.items():
                episode = by_key[key]
                self._record_turn(episode, out, time.monotonic() - turn_started[key])
                if episode.done:
                    slots.release(key)
                    continue
                action: AgentAction = episode.parsed.action
                if episode.parsed.errors and not action.tool_calls:
                    self._apply_env_result(episode, None)  # only rejected calls: the env is not called
                    self._continue_or_release(episode, slots, queue_turn)
                    continue
                now = time.monotonic()
                in_env[key] = (pool.submit(episode.env.step, action), now, now + cfg.env_timeout_s)
            for key in [k for k, (f, _, d) in in_env.items() if f.done() or time.monotonic() >= d]:
                future, started, deadline = in_env.pop(key)
                episode = by_key[key]
                try:
                    result = checked_env_step(wait_result(future, deadline, "env.step"))
                except EnvCallError as exc:
                    result = exc
                episode.timing["env_s"] += time.monotonic() - started
                self._apply_env_result(episode, result)
                self._continue_or_release(episode, slots, queue_turn)
        stats = slots.stats
        return chunks, {"decode_row_steps": float(stats.decode_row_steps), "slot_utilization": stats.slot_utilization,
                        "parked_rows": float(stats.parked)}

    @staticmethod
    def _continue_or_release(episode: Episode, slots, queue_turn) -> None:
        if episode.done:
            slots.release(episode.key)
        else:
            queue_turn(episode)

    def _finish_all(self, episodes: list[Episode], pool) -> list[Trajectory]:
        deadline = time.monotonic() + self.config.env_timeout_s
        results = {}
        for episode in episodes:
            if episode.env is not None and episode.termination not in ("env_timeout", "env_error"):
                results[episode.key] = pool.submit(lambda env: (env.reward(), env.info()), episode.env)
        trajectories = []
        for episode in episodes:
            reward, info = 0.0, {}
            if episode.key in results:
                try:
                    reward, info = wait_result(results[episode.key], deadline, "env.reward/info")
                    reward = float(reward)
                    info = dict(info) if isinstance(info, dict) else {"info": repr(info)[:500]}
                except (EnvCallError, TypeError, ValueError) as exc:
                    reward, info = 0.0, {}
                    episode.metrics["reward_errors"] += 1
                    episode.error = episode.error or str(exc)
            trajectories.append(episode.to_trajectory(episode.key[1], reward, info))
        return trajectories

    def _decode_turn(self, ids) -> str:
        ids = [int(i) for i in ids]
        if ids and ids[-1] in self.stop_token_ids:
            ids = ids[:-1]
        return self.renderer.tokenizer.decode(ids, skip_special_tokens=False)


@jax.jit
def _episode_keys_impl(rng: jax.Array, slots: jax.Array, siblings: jax.Array) -> jax.Array:
    return jax.vmap(lambda s, g: jax.random.fold_in(jax.random.fold_in(rng, s), g))(slots, siblings)


def _episode_keys(rng: jax.Array, slots: Sequence[int], group_size: int) -> jax.Array:
    """[len(slots) * group_size] keys, task-major: episode (t, g) ← fold_in(fold_in(rng, slots[t]), g)."""
    slot_of = np.repeat(np.asarray(slots, np.int32), group_size)
    sibling = np.tile(np.arange(group_size, dtype=np.int32), len(slots))
    return _episode_keys_impl(rng, slot_of, sibling)


@jax.jit
def _fold_in_turns(episode_keys: jax.Array, turns: jax.Array) -> jax.Array:
    return jax.vmap(jax.random.fold_in)(episode_keys, turns)


def _compiles(generator: Any) -> int:
    compiles = getattr(generator, "compiles", None)
    return int(compiles()) if callable(compiles) else 0


def turn_keys(episode_keys: jax.Array, turns: Sequence[int] | np.ndarray) -> jax.Array:
    """[N] keys, one per episode for this turn: fold_in(episode key [N], the episode's own turn index [N])."""
    return _fold_in_turns(episode_keys, np.asarray(turns, np.int32))
