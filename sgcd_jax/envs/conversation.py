"""Shared episode machinery for the tool-calling airline envs (τ³-airline and airline_lite).

One ``ToolConversation`` is one episode: it runs tool calls through an ``AirlineTools`` toolbox,
forwards agent text to a user simulator and tracks how the episode ended. Subclasses add the
task-specific prompt, verifier and ``info``.
"""

from __future__ import annotations

from typing import Any

from sgcd_jax.envs.base import AgentAction, EnvReset, EnvStep, Task
from sgcd_jax.envs.tau_airline.tools import WRITE_TOOLS, AirlineTools, render_result
from sgcd_jax.envs.users import STOP, UserSimulator, user_termination

# Terminations the official evaluator accepts as a proper end (AGENT_STOP / USER_STOP in τ²).
PROPER_ENDS = frozenset({"agent_stop", "user_stop", "transfer", "out_of_scope"})


class ToolConversation:
    name = "tool_conversation"
    compact_observations = False

    def __init__(self, max_turns: int = 30):
        self.max_turns = max_turns
        self.task: Task | None = None
        self.tools: AirlineTools | None = None
        self.user: UserSimulator | None = None
        self.messages: list[dict[str, Any]] = []
        self.agent_texts: list[str] = []
        self.tool_log: list[dict[str, Any]] = []  # {name, arguments, ok, error}
        self.termination = ""
        self.turns = 0
        self.transferred = False

    # -- subclass hooks ------------------------------------------------------------------------
    def _setup(self, task: Task) -> tuple[str, list[dict[str, Any]]]:
        """Set self.tools and self.user for ``task``; return (system prompt, tool schemas)."""
        raise NotImplementedError

    # -- protocol ------------------------------------------------------------------------------
    def reset(self, task: Task) -> EnvReset:
        self.task = task
        self.messages, self.agent_texts, self.tool_log = [], [], []
        self.termination, self.turns, self.transferred = "", 0, False
        system, tools = self._setup(task)
        first = self.user.first_message()
        self.messages = [{"role": "system", "content": system}, {"role": "user", "content": first}]
        return EnvReset(messages=[dict(m) for m in self.messages], tools=tools)

    def step(self, action: AgentAction) -> EnvStep:
        if self.task is None:
            raise RuntimeError("step() before reset(task)")
        if self.termination:
            raise RuntimeError(f"step() after the episode ended ({self.termination}); make a new env")
        self.turns += 1
        self.messages.append({"role": "assistant", "content": action.content,
                              **({"tool_calls": [{"id": c.call_id, "type": "function", "function": {
                                  "name": c.name, "arguments": c.arguments}} for c in action.tool_calls]}
                                 if action.tool_calls else {})})
        if action.content:
            self.agent_texts.append(action.content)
        observations, errors = [], 0
        if action.tool_calls:
            for call in action.tool_calls:
                result, error = self.tools.call(call.name, call.arguments)
                self.tool_log.append({"name": call.name, "arguments": call.arguments, "ok": not error,
                                      "error": error})
                errors += bool(error)
                if not error and call.name == "transfer_to_human_agents":
                    self.transferred = True
                text = f"Error: {error}" if error else render_result(result, self.compact_observations)
                observations.append({"role": "tool", "tool_call_id": call.call_id, "name": call.name,
                                     "content": text})
        elif STOP in action.content:
            self.termination = "agent_stop"
        elif self.transferred:
            # τ²: after a transfer the user simulator answers ###TRANSFER###, which ends the episode.
            self.termination = "transfer"
        else:
            reply = self.user.reply(action.content)
            observations.append({"role": "user", "content": reply})
            self.termination = user_termination(reply)
        if not self.termination and self.turns >= self.max_turns:
            self.termination = "max_turns"
        self.messages.extend(observations)
        return EnvStep(observations=observations, done=bool(self.termination),
                       termination=self.termination, tool_errors=errors)

    # -- helpers for verifiers ------------------------------------------------------------------
    def write_call_counts(self) -> dict[str, int]:
        writes = [c for c in self.tool_log if c["name"] in WRITE_TOOLS]
        return {"write_calls": len(writes), "write_calls_ok": sum(c["ok"] for c in writes),
                "tool_calls": len(self.tool_log), "tool_errors": sum(not c["ok"] for c in self.tool_log)}

    def communicated(self, required: list[str]) -> dict[str, bool]:
        """τ² communicate check: each string, lower-cased, inside some agent text with commas removed."""
        texts = [t.lower().replace(",", "") for t in self.agent_texts]
        return {s: any(s.lower() in t for t in texts) for s in required}
