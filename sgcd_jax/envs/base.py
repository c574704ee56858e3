"""The environment protocol every env implements, and the small value types that cross it.

Data flow: the rollout driver calls ``reset(task)`` once per episode, renders the returned messages
with the chat template, lets the policy generate an assistant turn, parses it into an
``AgentAction`` and calls ``step(action)`` until ``EnvStep.done``. ``reward()`` and ``info()`` are
read after the episode ends. Environments are single-episode objects made by a factory, so many
can run concurrently in threads without sharing mutable state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable


@dataclasses.dataclass(frozen=True)
class Task:
    """One task: a stable id, the env it belongs to and the env-specific payload."""

    task_id: str
    env_name: str
    payload: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False, compare=False)


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    call_id: str = ""


@dataclasses.dataclass(frozen=True)
class AgentAction:
    """One parsed assistant turn: free text for the user and/or tool calls."""

    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()


@dataclasses.dataclass
class EnvReset:
    """``messages``: chat messages before the first assistant turn (system incl. policy, first user
    message). ``tools``: JSON-schema tool specs in the OpenAI/HF ``tools=`` format."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]


@dataclasses.dataclass
class EnvStep:
    """What the agent sees next: tool results (role ``tool``) and/or a user reply (role ``user``).

    ``tool_errors`` counts calls the env rejected (unknown tool, bad arguments, failed call);
    ``termination`` is set when ``done``: ``agent_stop`` | ``user_stop`` | ``transfer`` |
    ``out_of_scope`` | ``max_turns`` | ``error``.
    """

    observations: list[dict[str, Any]]
    done: bool = False
    termination: str = ""
    tool_errors: int = 0


@runtime_checkable
class Env(Protocol):
    name: str

    def reset(self, task: Task) -> EnvReset: ...

    def step(self, action: AgentAction) -> EnvStep: ...

    def reward(self) -> float: ...

    def info(self) -> dict[str, Any]:
        """What the verifier checked and why it failed; JSON-serialisable."""
        ...


class EnvFactory(Protocol):
    """Makes fresh single-episode envs and lists tasks. Thread-safe."""

    name: str

    def make(self) -> Env: ...

    def tasks(self, split: str) -> list[Task]: ...
