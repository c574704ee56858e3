"""Credit localization of a stored run, including runs stored before trajectories carried ground truth.

Each stored episode is replayed through a fresh env of the run's config: its assistant turns are cut
from the stored ids by ``step_ids``, decoded and parsed as the rollout engine did, and stepped; the
env's ``info()["credit_truth"]`` then gives the decisive steps (``sgcd_jax.envs.credit_truth``). The
replayed reward must equal the stored one (counted in ``reward_mismatches``). Deterministic envs only
(airline_lite; τ³ with the scripted user).

    python -m sgcd_jax.credit.replay_truth --run_dir runs/quickstart
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Sequence

import numpy as np

from sgcd_jax.credit.localization import decisive_steps, localization_metrics
from sgcd_jax.rollout.trajectory import Step


def replay_episode(env_factory, task, tools, token_ids: np.ndarray, step_ids: np.ndarray, decode, parse,
                   max_turns: int) -> tuple[float, dict[str, Any], list[Step]]:
    """(reward, info, steps) of the stored episode ``token_ids``/``step_ids`` (one row) replayed."""
    env = env_factory.make()
    env.reset(task)
    steps: list[Step] = []
    for k in range(int(step_ids.max(initial=-1)) + 1):
        text = decode(token_ids[step_ids == k])
        parsed = parse(text, tools)
        steps.append(Step(index=k, text=text, tool_calls=list(parsed.action.tool_calls), observations=[],
                          parse_error="; ".join(e.message for e in parsed.errors)))
        if parsed.errors and not parsed.action.tool_calls:
            continue  # the engine does not call the env for a turn with only rejected calls
        if env.step(parsed.action).done or len(steps) >= max_turns:
            break
    return env.reward(), env.info(), steps


def run_localization(run_dir: str) -> dict[str, Any]:
    from sgcd_jax import integration
    from sgcd_jax.config import from_config_dict
    from transformers import PreTrainedTokenizerFast
    from sgcd_jax.rollout.toolparse import parse_tool_calls
    from sgcd_jax.data.store import iter_segments

    with open(os.path.join(run_dir, "config.json")) as f:
        config = from_config_dict(json.load(f))
    env_factory = integration.build_env(config.env)
    if not os.path.exists(os.path.join(run_dir, "tokenizer", "tokenizer.json")):
        raise ValueError(f"{run_dir}/tokenizer/tokenizer.json not found: replay_truth reads the run's saved "
                         "tokenizer (model.tokenizer='domain-bpe' runs such as the quickstart save it)")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(os.path.join(run_dir, "tokenizer"))  # read-only
    chat = integration.ChatAdapter(tokenizer)
    stop_ids = set(chat.renderer.stop_token_ids())

    def decode(ids: np.ndarray) -> str:
        ids = [int(i) for i in ids]
        if ids and ids[-1] in stop_ids:
            ids = ids[:-1]
        return tokenizer.decode(ids, skip_special_tokens=False)

    tasks = {t.task_id: t for t in env_factory.tasks(config.env.train_split)}
    per_iteration, mismatches, episodes = [], 0, 0
    for rows in iter_segments(os.path.join(run_dir, "rollouts")):
        decisive = []
        for i, task_id in enumerate(rows.task_ids):
            n = int(rows.lengths[i])
            ids, steps_row = rows.tokens["token_ids"][i, :n], rows.tokens["step_ids"][i, :n]
            task = tasks[task_id]
            reward, info, steps = replay_episode(env_factory, task, chat.tools_for(env_factory, task), ids,
                                                 steps_row, decode, parse_tool_calls, config.env.max_turns)
            mismatches += int(reward != float(rows.trajectories["reward"][i]))
            episodes += 1
            decisive.append(decisive_steps(info, steps))
        clean = lambda name: np.nan_to_num(rows.tokens[name], nan=0.0)  # noqa: E731  (padding is NaN)
        weights = np.where(rows.tokens["loss_mask"] > 0, clean("credit_weights"), 1.0)
        log_ratio = clean("teacher_logprobs") - clean("student_logprobs")
        advantages = rows.trajectories["advantage"]
        metrics = localization_metrics(weights, rows.tokens["loss_mask"], rows.tokens["step_ids"], advantages,
                                       decisive, log_ratio)
        for side, keep in (("success", advantages > 0), ("failure", advantages < 0)):  # each sibling kind alone
            part = localization_metrics(weights, rows.tokens["loss_mask"], rows.tokens["step_ids"],
                                        np.where(keep, advantages, 0.0), decisive, log_ratio)
            metrics.update({f"{side}/{k}": v for k, v in part.items()})
        if metrics:
            per_iteration.append({"iteration": rows.iteration, **metrics})
    keys = sorted({k for m in per_iteration for k in m if k != "iteration"})
    return {"run_dir": run_dir, "episodes": episodes, "reward_mismatches": mismatches,
            "iterations_with_mixed_truth": len(per_iteration),
            "mean": {k: float(np.mean([m[k] for m in per_iteration if k in m])) for k in keys},
            "per_iteration": per_iteration}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m sgcd_jax.credit.replay_truth",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", required=True, help="a finished run (its config.json, tokenizer/, rollouts/)")
    args = parser.parse_args(argv)
    out = run_localization(args.run_dir)
    print(json.dumps({k: v for k, v in out.items() if k != "per_iteration"}, indent=1))
    return out


if __name__ == "__main__":
    main()
