"""Thin adapters from the trainer's config to the other packages' objects: model + tokenizer, chat
renderer, env factory, rollout engine, demonstrations, eval runner, HF export.

Kept in one place so the trainer reads the same whatever the packages' constructor signatures are.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from sgcd_jax.config import EnvSpec, ModelSpec, TrainConfig
from sgcd_jax.envs.base import EnvFactory, Task
from sgcd_jax.rollout.trajectory import Step, Trajectory


class ChatAdapter:
    """The models package's ChatRenderer plus what the trainer needs around it."""

    def __init__(self, tokenizer: Any):
        from sgcd_jax.models.chat import ChatRenderer

        self.tokenizer = tokenizer
        self.renderer = ChatRenderer(tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.renderer.end_of_turn_id)
        self._tools: dict[str, list] = {}

    def render_prompt_ids(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
        return self.renderer.prompt_ids(messages, tools, add_generation_prompt=True)

    def tools_for(self, env_factory: EnvFactory, task: Task) -> list[dict[str, Any]]:
        """The tool schemas the policy saw for ``task`` (Trajectory does not carry them: re-read from a
        fresh env's reset, cached per task)."""
        if task.task_id not in self._tools:
            self._tools[task.task_id] = list(env_factory.make().reset(task).tools or [])
        return self._tools[task.task_id]

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Per-token display strings (byte-level BPE markers decoded per token)."""
        return [self.tokenizer.decode([int(i)]) for i in ids]


def build_model(spec: ModelSpec, *, seed: int, run_dir: str = "", env_factory: EnvFactory | None = None,
                train_split: str = "train") -> tuple[nnx.Module, Any]:
    """``tiny``: a random-init Decoder on ``spec.tokenizer``'s vocabulary (``domain-bpe``: trained on the
    env's text, saved in the run dir); else ``load_model``."""
    from sgcd_jax.models import Decoder, ModelConfig, load_model, load_tokenizer

    if spec.source != "tiny":
        return load_model(spec.source, dtype=spec.dtype, param_dtype=spec.param_dtype,
                          attention_impl=spec.attention_impl, remat_policy=spec.remat_policy)
    if spec.tokenizer == "domain-bpe":
        from sgcd_jax.data.domain_tokenizer import load_or_train

        if env_factory is None:
            raise ValueError("model.tokenizer='domain-bpe' needs the env (its text is the BPE corpus)")
        tokenizer = load_or_train(run_dir, env_factory, train_split, spec.domain_vocab_size, "smollm2-135m-instruct")
    else:
        tokenizer = load_tokenizer(spec.tokenizer)
    cfg = ModelConfig(vocab_size=len(tokenizer), hidden_size=spec.hidden_size,
                      intermediate_size=spec.intermediate_size, num_layers=spec.num_layers,
                      num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                      max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=True,
                      param_dtype=spec.param_dtype, dtype=spec.dtype, rope_theta=10000.0,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, attention_impl=spec.attention_impl,
                      remat_policy=spec.remat_policy)
    return Decoder(cfg, rngs=nnx.Rngs(seed)), tokenizer


def build_env(spec: EnvSpec) -> EnvFactory:
    from sgcd_jax.envs.registry import make_factory

    kwargs = dict(max_turns=spec.max_turns, user=spec.user)
    if spec.name == "airline_lite":
        kwargs.update(difficulty=spec.difficulty, num_tasks=spec.num_tasks, seed=spec.seed,
                      tasks_per_db=spec.tasks_per_db)
    return make_factory(spec.name, **kwargs)


def export_model(model: nnx.Module, tokenizer: Any, out_dir: str) -> str:
    from sgcd_jax.models.export import export_hf

    export_hf(model, out_dir, tokenizer=tokenizer)
    return out_dir


def rollout_cache_len(max_total_tokens: int, decode_steps: int = 32, block: int = 512) -> int:
    """Top KV-cache bucket of a rollout: the whole-conversation budget + one decode chunk, rounded up to a
    multiple of the attention block (model.attention_block) so blockwise attention slices it without padding."""
    return -(-(max_total_tokens + decode_steps + 1) // block) * block


def make_engine(model: nnx.Module, chat: ChatAdapter, config: TrainConfig, *, temperature: float | None = None,
                mesh: Mesh | None = None):
    from sgcd_jax.rollout.engine import RolloutConfig, RolloutEngine
    from sgcd_jax.sampling import SamplingParams, Sampler

    r = config.rollout
    params = SamplingParams(temperature=r.temperature if temperature is None else temperature,
                            top_p=r.top_p, top_k=r.top_k)
    sampler = Sampler(model, params=params, stop_token_ids=chat.renderer.stop_token_ids(), mesh=mesh,
                      prefill_chunk=r.prefill_chunk, share_prefixes=r.share_prefixes,
                      reserve_budget=r.reserve_kv_budget,
                      max_cache_len=rollout_cache_len(r.max_total_tokens, block=model.cfg.attention_block))
    return RolloutEngine(sampler, chat.renderer, RolloutConfig(
        max_turns=config.env.max_turns, max_tokens_per_turn=r.max_new_tokens, max_total_tokens=r.max_total_tokens,
        decode_slots=r.decode_slots, env_timeout_s=r.env_timeout_s))


def rollout(model: nnx.Module, chat: ChatAdapter, env_factory: EnvFactory, tasks: Sequence[Task], group_size: int,
            rng: jax.Array, config: TrainConfig, *, temperature: float | None = None,
            task_slots: Sequence[int] | None = None, mesh: Mesh | None = None) -> list[Trajectory]:
    """G sibling episodes per task with the current policy (a fresh engine: group ids are stable).

    ``task_slots``: each task's place in the job-wide batch (sampling keys derive from it; see
    RolloutEngine.run). ``mesh``: the devices the sampler splits rows over (a process's local mesh)."""
    engine = make_engine(model, chat, config, temperature=temperature, mesh=mesh)
    trajectories = engine.run(list(tasks), env_factory, group_size, rng, task_slots=task_slots)
    for traj in trajectories:
        traj.timing.setdefault("engine_wall_s", engine.last_run_stats.get("wall_s", 0.0))
        traj.timing.setdefault("engine_compiles", engine.last_run_stats.get("compiles", 0.0))
    return trajectories


def demo_trajectory(demo: dict[str, Any], chat: ChatAdapter, task_id: str = "demo") -> Trajectory:
    """An oracle conversation → token ids with the loss mask on the assistant turns, rendered exactly as
    a rollout would be (prompt ids, generated text + end-of-turn, continuation ids for observations)."""
    messages, tools = demo["messages"], demo.get("tools")
    renderer = chat.renderer
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    ids = list(renderer.prompt_ids(messages[:first], tools))
    prompt_len = len(ids)
    mask, steps = [0] * len(ids), [-1] * len(ids)
    i, step = first, 0
    while i < len(messages):
        before = renderer.render_text(messages[:i], tools, add_generation_prompt=True)
        after = renderer.render_text(messages[:i + 1], tools, add_generation_prompt=False)
        if not after.startswith(before):
            raise ValueError("chat template re-renders history; cannot build SFT demonstrations from it")
        segment = after[len(before):]
        cut = segment.find(renderer.end_of_turn_text)
        generated = renderer.encode(segment[:cut + len(renderer.end_of_turn_text)] if cut >= 0 else segment)
        ids += generated
        mask += [1] * len(generated)
        steps += [step] * len(generated)
        j = i + 1
        while j < len(messages) and messages[j]["role"] != "assistant":
            j += 1
        if j < len(messages):
            observation = renderer.continuation_ids(messages[:i + 1], messages[i + 1:j], tools)
            ids += observation
            mask += [0] * len(observation)
            steps += [-1] * len(observation)
        i, step = j, step + 1
    n = len(ids)
    return Trajectory(task_id=task_id, group_id=f"demo/{task_id}", sample_index=0,
                      token_ids=np.asarray(ids, np.int32), loss_mask=np.asarray(mask, np.int32),
                      step_ids=np.asarray(steps, np.int32), sampler_logprobs=np.zeros(n, np.float32),
                      prompt_len=prompt_len, messages=list(messages), steps=demo_steps(messages),
                      reward=float(demo.get("reward", 1.0)), info=dict(demo.get("info", {})))


def demo_steps(messages: list[dict[str, Any]]) -> list[Step]:
    """The assistant turns of a chat as rollout Steps (text, tool calls, the observations after them)."""
    from sgcd_jax.envs.base import ToolCall

    out: list[Step] = []
    for message in messages:
        if message["role"] == "assistant":
            calls = [ToolCall(c.get("function", c)["name"], dict(c.get("function", c)["arguments"]), c.get("id", ""))
                     for c in message.get("tool_calls") or []]
            out.append(Step(index=len(out), text=message.get("content") or "", tool_calls=calls, observations=[]))
        elif out:
            out[-1].observations.append(dict(message))
    return out


def demo_split(train_split: str) -> str:
    """The split SFT demonstrations come from: its own tasks and DB entities (airline_lite generates any
    split name), so RL on ``train_split`` starts on tasks the warm-up never showed — success there
    measures what SFT taught (reading ids), not what it memorised, and leaves RL something to improve."""
    return f"{train_split}-sft-demos"


def demonstrations(env_factory: EnvFactory, chat: ChatAdapter, config: TrainConfig) -> list[Trajectory]:
    """Oracle demonstrations (airline_lite, split ``demo_split``) for the SFT warm-up, truncated to the
    rollout budget."""
    if config.env.name != "airline_lite":
        raise ValueError(f"sft.enabled needs demonstrations; only airline_lite has an oracle, env is "
                         f"{config.env.name!r}: set --config.sft.enabled=False")
    from sgcd_jax.envs.airline_lite import oracle_demos

    demos = oracle_demos(env_factory, demo_split(config.env.train_split), config.sft.num_demos,
                         shortcut=config.sft.demo_shortcut, shortcut_rate=config.sft.demo_shortcut_rate,
                         seed=config.run.seed)
    # Oracle demos that fail (truncated by the env) are dropped; the imperfect demonstrator's are kept.
    out = [demo_trajectory(d, chat, d.get("task_id", str(i))) for i, d in enumerate(demos)
           if d["reward"] >= 1.0 or d.get("shortcut")]
    return [t for t in out if len(t.token_ids) <= config.rollout.max_total_tokens]


def eval_episodes(model: nnx.Module, chat: ChatAdapter, env_factory: EnvFactory, tasks: Sequence[Task],
                  config: TrainConfig, *, trials: int, temperature: float, rng: jax.Array, split: str,
                  task_slots: Sequence[int] | None = None, mesh: Mesh | None = None, tasks_per_batch: int = 0,
                  log=None) -> tuple[list, dict[str, Any]]:
    """The one eval implementation (trainer and ``python -m sgcd_jax.eval``): the bare student batched
    through the rollout engine on plain env prompts (no credit reference or sibling evidence exists on
    this path) → per-task rows and the env summary, with ``success_rate`` from ``success_rate(rows)``
    and how the episodes ended (``terminations``). ``tasks_per_batch`` (0 = all at once) rolls the
    tasks out in batches, calling ``log(line)`` after each; samples do not depend on the batching
    (keys derive from each task's slot)."""
    import collections
    import time

    from sgcd_jax.envs.metrics import SUCCESS_THRESHOLD, summarize

    slots = list(range(len(tasks))) if task_slots is None else list(task_slots)
    batch = tasks_per_batch or max(len(tasks), 1)
    trajectories, started = [], time.perf_counter()
    for start in range(0, len(tasks), batch):
        trajectories += rollout(model, chat, env_factory, tasks[start:start + batch], trials, rng, config,
                                temperature=temperature, task_slots=slots[start:start + batch], mesh=mesh)
        done, elapsed = min(start + batch, len(tasks)), time.perf_counter() - started
        if log:
            log(f"eval: {done}/{len(tasks)} tasks, {len(trajectories)} episodes, {elapsed:.0f} s "
                f"({elapsed / len(trajectories):.1f} s/episode), ETA {elapsed / done * (len(tasks) - done):.0f} s")
    rows = eval_rows(trajectories, SUCCESS_THRESHOLD)
    summary = summarize(rows, env_factory.name, split)
    summary["success_rate"] = success_rate(rows)
    summary["terminations"] = dict(collections.Counter(t.termination for t in trajectories).most_common())
    return rows, summary


def success_rate(rows: Sequence[dict[str, Any]]) -> float:
    """The one success formula: successful episodes / episodes (every task weighs its trials)."""
    return float(sum(r["successes"] for r in rows) / max(sum(r["trials"] for r in rows), 1))


def evaluate(model: nnx.Module, chat: ChatAdapter, env_factory: EnvFactory, tasks: Sequence[Task],
             config: TrainConfig, rng: jax.Array | None = None, *, task_slots: Sequence[int] | None = None,
             mesh: Mesh | None = None) -> dict[str, float]:
    """The trainer's periodic eval: ``eval_episodes`` at ``eval.trials`` / ``eval.temperature`` as flat metrics."""
    rng = jax.random.key(config.run.seed + 1) if rng is None else rng
    rows, summary = eval_episodes(model, chat, env_factory, tasks, config, trials=config.eval.trials,
                                  temperature=config.eval.temperature, rng=rng, split=config.env.eval_split,
                                  task_slots=task_slots, mesh=mesh)
    out = {"success_rate": summary["success_rate"],
           "mean_reward": float(summary["mean_reward"]),
           "state_change_success_rate": float(np.mean([i.get("write_calls_ok", 0) for r in rows for i in r["infos"]]))}
    out.update({f"pass_hat_{k}": float(v) for k, v in summary["pass_hat_k"].items()})
    out.update({f"pass_at_{k}": float(v) for k, v in summary["pass_at_k"].items()})
    if summary.get("write_call_success_rate") is not None:
        out["write_call_success_rate"] = float(summary["write_call_success_rate"])
    return out


def eval_rows(trajectories: Sequence[Trajectory], threshold: float) -> list[dict[str, Any]]:
    by_task: dict[str, list[Trajectory]] = {}
    for traj in trajectories:
        by_task.setdefault(traj.task_id, []).append(traj)
    rows = []
    for task_id, group in by_task.items():
        rewards = [t.reward for t in group]
        rows.append({"task_id": task_id, "trials": len(group), "successes": sum(r >= threshold for r in rewards),
                     "rewards": rewards, "mean_reward": float(np.mean(rewards)),
                     "errors": [t.termination for t in group if t.termination in ("env_error", "env_timeout")],
                     "terminations": [t.termination for t in group],
                     "infos": [t.info for t in group]})
    return rows
