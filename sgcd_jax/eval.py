"""``python -m sgcd_jax.eval --run_dir runs/x [--split test --trials 4 --num_tasks 20 --best]``

Evaluates the bare student of a run (its latest or best checkpoint, or ``--model`` for any loadable
model) over an env split with n trials per task: pass^k, pass@k, mean reward, successful
state-changing calls (TGC/SGC for AppWorld). Writes ``per_task.jsonl`` and ``summary.json``
(``envs.metrics.save_eval``). The student sees only what ``env.reset`` returns: this path has no
annotator, no siblings and no teacher context to render.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
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
    from sgcd_jax.learner.train_step import make_optimizer

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    abstract = {"params": params, "opt_state": make_optimizer(config.optim, 1).init(params), "rng": jax.random.key(0)}
    state, _ = checkpointer.restore(step, abstract, best=best)
    checkpointer.close()
    return config, nnx.merge(graphdef, state["params"], rest), tokenizer


def run_eval(config: TrainConfig, model: Any, tokenizer: Any, *, split: str, trials: int, num_tasks: int,
             out_dir: str, seed: int = 0) -> dict[str, Any]:
    from sgcd_jax.envs.metrics import save_eval

    env_factory = integration.build_env(config.env)
    tasks = env_factory.tasks(split)[:num_tasks]
    config = dataclasses.replace(config, eval=dataclasses.replace(config.eval, trials=trials))
    chat = integration.ChatAdapter(tokenizer)
    temperature = config.eval.temperature if trials == 1 else max(config.eval.temperature, 1.0)
    rows, summary = integration.eval_episodes(model, chat, env_factory, tasks, config, trials=trials,
                                              temperature=temperature, rng=jax.random.key(seed), split=split)
    save_eval(rows, summary, out_dir)
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sgcd_jax.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", required=True, help="a training run dir (config.json + checkpoints/)")
    parser.add_argument("--best", action="store_true", help="use the best-by-eval checkpoint")
    parser.add_argument("--split", default=None, help="env split (default: the run's env.eval_split)")
    parser.add_argument("--trials", type=int, default=1, help="episodes per task (sampled at T=1 when > 1)")
    parser.add_argument("--num_tasks", type=int, default=1_000_000)
    parser.add_argument("--out", default=None, help="output dir (default: run_dir/eval_<split>)")
    args = parser.parse_args(argv)
    config, model, tokenizer = load_run(args.run_dir, best=args.best)
    split = args.split or config.env.eval_split
    out = args.out or os.path.join(args.run_dir, f"eval_{split}")
    summary = run_eval(config, model, tokenizer, split=split, trials=args.trials, num_tasks=args.num_tasks,
                       out_dir=out)
    print(json.dumps(summary, indent=2, default=str))
    print(f"wrote {out}/per_task.jsonl and summary.json")


if __name__ == "__main__":
    main()
