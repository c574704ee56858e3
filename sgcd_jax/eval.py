"""``python -m sgcd_jax.eval --run_dir runs/x [--split test --trials 4 --num_tasks 20 --best]``
``python -m sgcd_jax.eval --model smollm2-135m-instruct --env tau3_airline --split test --trials 4``

Evaluates the bare student of a run (its latest or best checkpoint) or, with ``--model``, any
loadable model (short name, HF dir, .gguf) on any env, over a split with n trials per task: pass^k,
pass@k, mean reward, successful state-changing calls (TGC/SGC for AppWorld). Prints the eval config
(greedy or sampled), progress per batch of tasks with wall time per episode, and at the end how the
episodes ended (terminations per task). Writes ``per_task.jsonl`` and ``summary.json``
(``envs.metrics.save_eval``). The student sees only what ``env.reset`` returns: this path has no
annotator, no siblings and no teacher context to render.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import time
from typing import Any, Sequence

import jax

from sgcd_jax import integration
from sgcd_jax.config import TrainConfig, from_config_dict


def load_run(run_dir: str, *, best: bool = False) -> tuple[TrainConfig, Any, Any]:
    """(config, model with the checkpointed params, tokenizer) of a finished or running run."""
    from flax import nnx

    from sgcd_jax.trainer.checkpoint import TrainCheckpointer

    with open(os.path.join(run_dir, "config.json")) as f:
        config = from_config_dict(json.load(f))
    env_factory = integration.build_env(config.env)
    model, tokenizer = integration.build_model(config.model, seed=config.run.seed, run_dir=run_dir,
                                               env_factory=env_factory, train_split=config.env.train_split)
    checkpointer = TrainCheckpointer(run_dir, keep=config.run.keep_checkpoints)
    step = checkpointer.best_step() if best else checkpointer.latest_step()
    if step is None:
        raise FileNotFoundError(f"no {'best ' if best else ''}checkpoint under {checkpointer.directory}: "
                                "train first, or pass --model to evaluate a model directly")
    from sgcd_jax.learner.train_step import _upcast, make_optimizer, needs_master, rounds_stochastically

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    master = needs_master(params, config.optim.master_dtype)  # the checkpoint's state layout
    abstract = {"params": params, "rng": jax.random.key(0),
                "opt_state": make_optimizer(config.optim, 1).init(_upcast(params) if master else params)}
    if master:
        abstract["master"] = _upcast(params)
    if rounds_stochastically(params, config.optim.master_dtype):
        abstract["rounding_step"] = jax.numpy.zeros((), jax.numpy.uint32)
    state, _ = checkpointer.restore(step, abstract, best=best)
    checkpointer.close()
    return config, nnx.merge(graphdef, state["params"], rest), tokenizer


def model_config(model: str, env: str, *, base: TrainConfig | None = None, max_turns: int | None = None,
                 max_new_tokens: int | None = None, max_total_tokens: int = 0, user: str | None = None,
                 dtype: str | None = None) -> TrainConfig:
    """The config of a base-model eval: ``base`` (a recipe, or the defaults) with the model and env
    replaced. ``max_total_tokens=0``: set later from the env's longest prompt (``auto_budget``)."""
    config = base or TrainConfig()
    env_spec = dataclasses.replace(config.env, name=env, max_turns=max_turns or config.env.max_turns,
                                   user=user or config.env.user)
    if base is None and env != "airline_lite":
        env_spec = dataclasses.replace(env_spec, train_split="train", eval_split="test")
    model_spec = dataclasses.replace(config.model, source=model, source_env="",
                                     param_dtype=dtype or config.model.param_dtype, dtype=dtype or config.model.dtype)
    rollout = dataclasses.replace(config.rollout, max_new_tokens=max_new_tokens or config.rollout.max_new_tokens,
                                  max_total_tokens=max_total_tokens or max(config.rollout.max_total_tokens,
                                                                           (max_new_tokens or 0) + 1))
    return dataclasses.replace(config, model=model_spec, env=env_spec, rollout=rollout)


def auto_budget(config: TrainConfig, env_factory: Any, tokenizer: Any, split: str, context: int) -> int:
    """rollout.max_total_tokens for an eval: the longest first prompt + max_turns turns, within the
    model's context."""
    from sgcd_jax.preflight import longest_prompt

    longest, _, _ = longest_prompt(env_factory, [split], tokenizer)
    want = longest + config.env.max_turns * config.rollout.max_new_tokens
    return min(512 * math.ceil(want / 512), context)


def sampling_statement(trials: int, temperature: float) -> str:
    if temperature == 0.0:
        return "greedy (temperature 0)"
    return f"sampled at temperature {temperature:g}" + (" (trials > 1 need distinct samples)" if trials > 1 else "")


def eval_temperature(config: TrainConfig, trials: int, override: float | None = None) -> float:
    if override is not None:
        return override
    return config.eval.temperature if trials == 1 else max(config.eval.temperature, 1.0)


def run_eval(config: TrainConfig, model: Any, tokenizer: Any, *, split: str, trials: int, num_tasks: int,
             out_dir: str, seed: int = 0, temperature: float | None = None, tasks_per_batch: int = 0,
             log=print) -> dict[str, Any]:
    """``integration.eval_episodes`` (the trainer's eval) over ``num_tasks`` tasks × ``trials``, in
    batches of ``tasks_per_batch`` (0 = all at once) with progress after each; returns the summary
    (also written with the per-task rows)."""
    from sgcd_jax.envs.metrics import save_eval

    env_factory = integration.build_env(config.env)
    tasks = env_factory.tasks(split)[:num_tasks]
    config = dataclasses.replace(config, eval=dataclasses.replace(config.eval, trials=trials))
    chat = integration.ChatAdapter(tokenizer)
    temperature = eval_temperature(config, trials, temperature)
    started = time.perf_counter()
    rows, summary = integration.eval_episodes(model, chat, env_factory, tasks, config, trials=trials,
                                              temperature=temperature, rng=jax.random.key(seed), split=split,
                                              tasks_per_batch=tasks_per_batch, log=log)
    wall = time.perf_counter() - started
    summary["sampling"] = sampling_statement(trials, temperature)
    summary["wall_s"] = wall
    summary["wall_s_per_episode"] = wall / max(sum(r["trials"] for r in rows), 1)
    save_eval(rows, summary, out_dir)
    return summary


def reasons_table(summary: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """How episodes ended, overall and per task (the first thing to read when a score is 0)."""
    lines = ["episodes ended by: " + ", ".join(f"{k} {v}" for k, v in summary["terminations"].items())]
    if summary["terminations"].get("max_tokens"):
        lines.append("  max_tokens = cut by rollout.max_total_tokens (raise --max_total_tokens)")
    if summary["terminations"].get("max_turns"):
        lines.append("  max_turns = the conversation reached env.max_turns without a proper end (scores 0)")
    lines.append(f"{'task':>10}  succ/trials  mean_reward  terminations")
    for row in rows:
        ends = ", ".join(f"{k}×{v}" for k, v in collections.Counter(row["terminations"]).most_common())
        lines.append(f"{row['task_id']:>10}  {row['successes']:>5}/{row['trials']:<5}  {row['mean_reward']:>11.3f}  {ends}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sgcd_jax.eval", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run_dir", help="a training run dir (config.json + checkpoints/)")
    source.add_argument("--model", help="any loadable model: short name (smollm2-135m-instruct), HF dir or .gguf")
    parser.add_argument("--env", default="tau3_airline", help="with --model: airline_lite | tau3_airline | appworld")
    parser.add_argument("--config", default="", help="with --model: a recipe for the other settings (default: defaults)")
    parser.add_argument("--best", action="store_true", help="use the best-by-eval checkpoint")
    parser.add_argument("--split", default=None, help="env split (default: the run's env.eval_split)")
    parser.add_argument("--trials", type=int, default=1, help="episodes per task (sampled at T=1 when > 1)")
    parser.add_argument("--num_tasks", type=int, default=1_000_000)
    parser.add_argument("--temperature", type=float, default=None,
                        help="default: eval.temperature (0 = greedy) for 1 trial, max(it, 1.0) for more")
    parser.add_argument("--max_turns", type=int, default=None, help="env.max_turns (default: the config's)")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="rollout.max_new_tokens per turn")
    parser.add_argument("--max_total_tokens", type=int, default=0,
                        help="rollout.max_total_tokens (with --model, 0 = longest prompt + max_turns turns)")
    parser.add_argument("--user", default=None, help="env.user: scripted | gemini")
    parser.add_argument("--dtype", default=None, help="with --model: float32 | bfloat16 (params and compute)")
    parser.add_argument("--tasks_per_batch", type=int, default=8, help="tasks rolled out together (progress after each)")
    parser.add_argument("--out", default=None, help="output dir (default: run_dir/eval_<split>)")
    args = parser.parse_args(argv)
    if args.run_dir:
        config, model, tokenizer = load_run(args.run_dir, best=args.best)
        if args.max_total_tokens:
            config = dataclasses.replace(config, rollout=dataclasses.replace(
                config.rollout, max_total_tokens=args.max_total_tokens))
        out_default = os.path.join(args.run_dir, f"eval_{args.split or config.env.eval_split}")
    else:
        from sgcd_jax.config_files import load_config_file
        from sgcd_jax.preflight import check_budget, check_model_source, check_secrets

        base = load_config_file(args.config) if args.config else None
        config = model_config(args.model, args.env, base=base, max_turns=args.max_turns,
                              max_new_tokens=args.max_new_tokens, max_total_tokens=args.max_total_tokens,
                              user=args.user, dtype=args.dtype)
        check_model_source(config)
        check_secrets(config, annotator=False)
        env_factory = integration.build_env(config.env)
        model, tokenizer = integration.build_model(config.model, seed=config.run.seed, env_factory=env_factory)
        split = args.split or config.env.eval_split
        if not args.max_total_tokens:
            context = int(getattr(getattr(model, "cfg", None), "max_position_embeddings", 0) or 1 << 30)
            config = dataclasses.replace(config, rollout=dataclasses.replace(
                config.rollout, max_total_tokens=auto_budget(config, env_factory, tokenizer, split, context)))
        check_budget(dataclasses.replace(config, env=dataclasses.replace(
            config.env, train_split=split, eval_split=split)), env_factory, tokenizer)
        out_default = os.path.join("runs", f"eval_{os.path.basename(args.model.rstrip('/'))}_{args.env}_{split}")
    split = args.split or config.env.eval_split
    out = args.out or out_default
    temperature = eval_temperature(config, args.trials, args.temperature)
    print("eval config: " + json.dumps({
        "model": config.model.source if not args.run_dir else args.run_dir, "env": config.env.name,
        "split": split, "trials": args.trials, "num_tasks": args.num_tasks, "user": config.env.user,
        "max_turns": config.env.max_turns, "max_new_tokens": config.rollout.max_new_tokens,
        "max_total_tokens": config.rollout.max_total_tokens, "dtype": config.model.dtype,
        "sampling": sampling_statement(args.trials, temperature), "top_p": config.rollout.top_p,
        "top_k": config.rollout.top_k, "out": out}), flush=True)
    summary = run_eval(config, model, tokenizer, split=split, trials=args.trials, num_tasks=args.num_tasks,
                       out_dir=out, temperature=args.temperature, tasks_per_batch=args.tasks_per_batch,
                       log=lambda line: print(line, flush=True))
    print(json.dumps(summary, indent=2, default=str))
    with open(os.path.join(out, "per_task.jsonl")) as handle:
        print(reasons_table(summary, [json.loads(line) for line in handle]))
    print(f"wrote {out}/per_task.jsonl and summary.json")


if __name__ == "__main__":
    main()
