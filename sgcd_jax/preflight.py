"""Checks a run can do what its config asks, before any model is loaded or step compiled.

``preflight(config, env_factory)`` (train and eval call it right after building the env):
- ``model.source``: a short name or an existing path; the error names the env var the recipe reads
  it from (``model.source_env``, e.g. QWEN3_4B_DIR) and the config key;
- secrets: a Gemini user or annotator needs its API key variable set (named, never read into logs);
- token budget: the env's longest rendered first prompt (system prompt + tool schemas + first user
  turn, measured with the run's tokenizer and chat template over the train and eval tasks) plus
  one turn (``rollout.max_new_tokens``) must fit in ``rollout.max_total_tokens``; otherwise every
  episode would end at reset with reward 0. The error gives the exact key and a value to set.
"""

from __future__ import annotations

import math
import os
from typing import Any

from sgcd_jax.config import ConfigError, TrainConfig

GEMINI_KEY_ENV = "GEMINI_API_KEY"
MAX_TASKS_MEASURED = 256  # per split: a bound on the reset cost of very large task sets


def preflight(config: TrainConfig, env_factory: Any, *, log=print) -> dict[str, Any]:
    """All checks below; returns what was measured (``longest_prompt_tokens``, its task id)."""
    check_model_source(config)
    check_secrets(config)
    tokenizer = budget_tokenizer(config)
    if tokenizer is None:
        return {}
    measured = check_budget(config, env_factory, tokenizer)
    if measured and log:
        log(f"preflight: longest first prompt {measured['longest_prompt_tokens']} tokens "
            f"(task {measured['longest_prompt_task']}, {measured['tasks_measured']} tasks) + one turn "
            f"{config.rollout.max_new_tokens} <= rollout.max_total_tokens={config.rollout.max_total_tokens}")
    return measured


def check_environment(config: TrainConfig) -> None:
    """What the process environment must provide, checked first thing in ``train`` (before the env or model
    is built): a missing model dir, or an annotator or user simulator that cannot work, fails now, naming its key."""
    check_model_source(config)
    check_secrets(config)
    if config.loss.needs_teacher and config.annotation.name == "replay":
        raise ConfigError("annotation.name='replay' is not available in the trainer (it needs the identity of the "
                          "annotator that filled the cache); use sgcd_jax.credit.ReplayAnnotator offline, or "
                          "annotation.name='contrast' / 'gemini' with annotation.cache_dir")


def check_model_source(config: TrainConfig) -> None:
    from sgcd_jax.models.loading import MODEL_ALIASES

    source = config.model.source
    if source == "tiny" or source.lower() in MODEL_ALIASES or os.path.exists(source):
        return
    where = (f"set ${config.model.source_env} to its HF checkpoint dir (config.json + *.safetensors), or pass "
             f"--config.model.source=<dir>" if config.model.source_env else "pass --config.model.source=<HF dir | .gguf | "
             f"short name {sorted(MODEL_ALIASES)}>")
    raise ConfigError(f"model.source={source!r} does not exist: {where}")


def check_secrets(config: TrainConfig, *, annotator: bool = True) -> None:
    """``annotator=False``: a path without an annotator (eval) checks only the user's key."""
    users = config.env.user == "gemini"
    annotates = annotator and config.annotation.name == "gemini" and config.loss.needs_teacher
    if (users or annotates) and not os.environ.get(GEMINI_KEY_ENV):
        what = " and ".join(n for n, on in (("env.user='gemini'", users), ("annotation.name='gemini'", annotates)) if on)
        raise ConfigError(f"{what} needs ${GEMINI_KEY_ENV} (unset): export it, or use "
                          + (" / ".join(a for a, on in (("--config.env.user=scripted", users),
                                                       ("--config.annotation.name=contrast", annotates)) if on)))


def budget_tokenizer(config: TrainConfig) -> Any | None:
    """The run's tokenizer when it can be had without the model (None for a domain BPE, trained later)."""
    from sgcd_jax.models import load_tokenizer

    if config.model.source == "tiny":
        return None if config.model.tokenizer == "domain-bpe" else load_tokenizer(config.model.tokenizer)
    return load_tokenizer(config.model.source)


def longest_prompt(env_factory: Any, splits: list[str], tokenizer: Any) -> tuple[int, str, int]:
    """(tokens, task id, tasks measured) of the longest rendered first prompt over ``splits``."""
    from sgcd_jax.models.chat import ChatRenderer

    renderer = ChatRenderer(tokenizer)
    longest, where, count = 0, "", 0
    for split in dict.fromkeys(splits):
        for task in env_factory.tasks(split)[:MAX_TASKS_MEASURED]:
            reset = env_factory.make().reset(task)
            n = len(renderer.prompt_ids(list(reset.messages), list(reset.tools or []), add_generation_prompt=True))
            count += 1
            if n > longest:
                longest, where = n, task.task_id
    return longest, where, count


def check_budget(config: TrainConfig, env_factory: Any, tokenizer: Any) -> dict[str, Any]:
    if not getattr(env_factory, "cheap_reset", True):  # e.g. AppWorld: a reset is a server round trip
        return {}
    splits = [config.env.train_split, config.env.eval_split]
    longest, task_id, count = longest_prompt(env_factory, splits, tokenizer)
    turn, budget = config.rollout.max_new_tokens, config.rollout.max_total_tokens
    if longest + turn > budget:
        suggested = 1024 * math.ceil((longest + 4 * turn) / 1024)  # room for a few turns, not just one
        raise ConfigError(
            f"rollout.max_total_tokens={budget} cannot hold {env_factory.name}'s longest first prompt "
            f"({longest} tokens: system prompt + tool schemas + first user turn, task {task_id}) plus one "
            f"turn (rollout.max_new_tokens={turn}): every such episode would end at reset with reward 0. "
            f"Set --config.rollout.max_total_tokens={suggested} (or at least {longest + turn}).")
    return {"longest_prompt_tokens": longest, "longest_prompt_task": task_id, "tasks_measured": count}
