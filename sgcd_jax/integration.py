"""Thin adapters from the trainer's config to the other packages' objects: model + tokenizer, chat
renderer, env factory, rollout engine, demonstrations, eval runner, HF export.

Kept in one place so the trainer reads the same whatever the packages' constructor signatures are.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from sgcd_jax.config import EnvSpec, ModelSpec, TrainConfig
from sgcd_jax.envs.base import EnvFactory, Task
from sgcd_jax.rollout.trajectory import Trajectory


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

    def remember_tools(self, env_name: str, tools: list[dict[str, Any]]) -> None:
        self._tools[env_name] = tools

    def tools_of(self, traj: Trajectory) -> list[dict[str, Any]] | None:
        tools = traj.info.get("tools") if isinstance(traj.info, dict) else None
        if tools is None and self._tools:
            tools = next(iter(self._tools.values()))
        return tools

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Per-token display strings (byte-level BPE markers decoded per token)."""
        return [self.tokenizer.decode([int(i)]) for i in ids]


def build_model(spec: ModelSpec, *, seed: int) -> tuple[nnx.Module, Any]:
    """``tiny``: a random-init Decoder on ``spec.tokenizer``'s vocabulary; else ``load_model``."""
    from sgcd_jax.models import Decoder, ModelConfig, load_model, load_tokenizer

    if spec.source != "tiny":
        return load_model(spec.source, dtype=spec.dtype, param_dtype=spec.param_dtype)
    tokenizer = load_tokenizer(spec.tokenizer)
    cfg = ModelConfig(vocab_size=len(tokenizer), hidden_size=spec.hidden_size,
                      intermediate_size=spec.intermediate_size, num_layers=spec.num_layers,
                      num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                      max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=True,
                      param_dtype=spec.param_dtype, dtype=spec.dtype, rope_theta=10000.0,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id)
    return Decoder(cfg, rngs=nnx.Rngs(seed)), tokenizer


def build_env(spec: EnvSpec) -> EnvFactory:
    if spec.name == "airline_lite":
        from sgcd_jax.envs.airline_lite import AirlineLiteFactory

        return AirlineLiteFactory(difficulty=spec.difficulty, num_tasks=spec.num_tasks, max_turns=spec.max_turns)
    if spec.name == "tau3_airline":
        from sgcd_jax.envs.tau_airline.env import TauAirlineFactory

        return TauAirlineFactory(user=spec.user, max_turns=spec.max_turns)
    from sgcd_jax.envs.appworld import AppWorldFactory  # noqa: F401 (accelerator-scale recipe)

    return AppWorldFactory()


def export_model(model: nnx.Module, tokenizer: Any, out_dir: str) -> str:
    from sgcd_jax.models.export import export_hf

    export_hf(model, out_dir, tokenizer=tokenizer)
    return out_dir


def rollout(model: nnx.Module, chat: ChatAdapter, env_factory: EnvFactory, tasks: Sequence[Task], group_size: int,
            rng: jax.Array, config: TrainConfig, *, group_prefix: str = "") -> list[Trajectory]:
    raise NotImplementedError("waiting for sgcd_jax.rollout engine")


def demonstrations(env_factory: EnvFactory, chat: ChatAdapter, config: TrainConfig) -> list[Trajectory]:
    raise NotImplementedError("waiting for airline_lite oracle")


def evaluate(model: nnx.Module, chat: ChatAdapter, env_factory: EnvFactory, tasks: Sequence[Task],
             config: TrainConfig) -> dict[str, float]:
    raise NotImplementedError("waiting for envs.metrics evaluate()")


_ = np
