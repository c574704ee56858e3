"""User simulators: the other side of the conversation in τ³-airline and airline_lite.

All simulators are single-episode objects with two calls: ``first_message()`` and
``reply(agent_text)``. A reply containing ``###STOP###`` / ``###TRANSFER###`` / ``###OUT-OF-SCOPE###``
ends the episode (τ² semantics: user stop, counted as a proper end for the verifier).

- ``ScriptedUser``: deterministic rules over the task's user scenario (tests, airline_lite, floors).
- ``GeminiUser``: an LLM user through google-genai; model from config, API key from an env var.
- ``LocalModelUser``: any ``generate(messages) -> str`` callable (e.g. the project's own sampler).

No simulator ends a conversation because a turn count passed: as in τ², the env's ``max_turns``
ends it, with termination ``max_turns``, which the verifier scores 0. (An earlier scripted user said
STOP after 10 turns, so an agent repeating one sentence scored the do-nothing floor.)

What the scripted user can and cannot do, versus an LLM user (``env.user='gemini'``):
- can: open with the scenario's reason for calling (+ known info); give its known info once when
  asked for an id/name; answer a scenario ``facts`` regex with its canned answer; say yes to anything
  that looks like a confirmation question; say STOP when the agent wraps up ("anything else",
  "have a nice day", ...) or says STOP itself.
- cannot: understand the agent's message (it matches keywords: any question containing "confirm"
  gets a yes, even a wrong proposal); reveal ``unknown_info`` / refuse per ``task_instructions``;
  negotiate, change its mind, or pick among options the agent offers; notice that its goal was not
  met (it stops on a polite closing whatever happened). Scores against it are a smoke test and a
  floor, not τ³ numbers; report τ³ results with an LLM user.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Callable, Protocol

STOP, TRANSFER, OUT_OF_SCOPE = "###STOP###", "###TRANSFER###", "###OUT-OF-SCOPE###"
STOP_TOKENS = {STOP: "user_stop", TRANSFER: "transfer", OUT_OF_SCOPE: "out_of_scope"}

log = logging.getLogger(__name__)
_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """Log a fallback once per process (the first text of each kind); the count lives in metrics."""
    kind = message.split("(")[0].split("$")[0]
    if kind not in _WARNED:
        _WARNED.add(kind)
        log.warning(message)


def user_termination(text: str) -> str:
    """'' when ``text`` does not end the episode, else the EnvStep.termination it maps to."""
    for token, reason in STOP_TOKENS.items():
        if token in text:
            return reason
    return ""


class UserSimulator(Protocol):
    def first_message(self) -> str: ...

    def reply(self, agent_text: str) -> str: ...


UserFactory = Callable[[dict[str, Any]], UserSimulator]  # scenario dict -> fresh simulator

_CLOSING = re.compile(r"anything else|have a (great|good|nice) day|is there anything|goodbye|"
                      r"\bdone\b|all set|transferred to a human", re.I)
_CONFIRM = re.compile(r"confirm|proceed|shall i|should i|would you like|do you want|\(yes\)|yes/no", re.I)
_ASK_ID = re.compile(r"user id|your id|user_id|your name|identify|verify|reservation id|booking id", re.I)


class ScriptedUser:
    """Deterministic user: opens with the reason for calling, gives its known info when the agent
    asks for an id, says yes to confirmations, stops when the agent wraps up (never because of a
    turn count: the env's ``max_turns`` ends a conversation that goes nowhere, scoring 0).

    ``scenario`` keys (τ² ``user_scenario.instructions`` names): ``reason_for_call``, ``known_info``,
    optional ``task_instructions``, ``opening`` (verbatim first message), ``facts`` ({keyword regex:
    answer}, checked before the generic rules).
    """

    def __init__(self, scenario: dict[str, Any]):
        self.scenario = scenario
        self.turns = 0
        self.gave_known_info = False

    def first_message(self) -> str:
        if self.scenario.get("opening"):
            return self.scenario["opening"]
        reason = " ".join(str(self.scenario.get("reason_for_call", "")).split())
        known = " ".join(str(self.scenario.get("known_info", "") or "").split())
        return f"Hi! {reason} {known}".strip()

    def reply(self, agent_text: str) -> str:
        self.turns += 1
        if STOP in agent_text:
            return f"Thank you, bye. {STOP}"
        for pattern, answer in (self.scenario.get("facts") or {}).items():
            if re.search(pattern, agent_text, re.I):
                return answer
        if _ASK_ID.search(agent_text) and not self.gave_known_info and self.scenario.get("known_info"):
            self.gave_known_info = True
            return " ".join(str(self.scenario["known_info"]).split())
        if _CONFIRM.search(agent_text):
            return "Yes, please proceed."
        if _CLOSING.search(agent_text) or self.scenario.get("stop_on_any_reply"):
            return f"No, that's all. Thank you! {STOP}"
        return "Could you please help me with my request?"


def tau_user_system_prompt(scenario: dict[str, Any]) -> str:
    """τ²-style user-simulator instructions for LLM users."""
    parts = [f"{k.replace('_', ' ').capitalize()}: {v}" for k, v in scenario.items()
             if k in ("reason_for_call", "known_info", "unknown_info", "task_instructions") and v]
    return (
        "You are a customer talking to an airline customer-service agent. Play the user described "
        "below; write only the user's next message, short and natural. Do not invent information "
        "that is not given; if asked for something you do not know, say you do not know.\n"
        f"When your goal is achieved or cannot be achieved, reply with exactly '{STOP}'. If you are "
        f"transferred to a human agent, reply with '{TRANSFER}'. If the scenario does not cover what "
        f"the agent asks, reply '{OUT_OF_SCOPE}'.\n\n" + "\n".join(parts))


class _ChatUser:
    """Shared history handling for model-backed users (the agent is 'user' from their side)."""

    def __init__(self, scenario: dict[str, Any]):
        self.scenario = scenario
        self.system = tau_user_system_prompt(scenario)
        self.history: list[dict[str, str]] = []  # role is from the simulator's point of view
        self.turns = 0
        self.failures = 0
        self._fallback = ScriptedUser(scenario)

    def _generate(self) -> str:
        raise NotImplementedError

    def _ask(self) -> str:
        try:
            text = self._generate().strip()
            if not text:
                raise ValueError("empty reply")
        except Exception as exc:  # noqa: BLE001 - any backend failure falls back, never kills the episode
            self.failures += 1  # envs report it per episode (info 'user_fallbacks' → metrics)
            _warn_once(f"{type(self).__name__} failed ({type(exc).__name__}: {exc}); using the scripted "
                       "user for this turn (further fallbacks are counted in the 'user_fallbacks' "
                       "metric, not logged)")
            opening = len(self.history) == 1
            text = self._fallback.first_message() if opening else self._fallback.reply(self.history[-1]["content"])
        self.history.append({"role": "assistant", "content": text})
        return text

    def first_message(self) -> str:
        self.history.append({"role": "user", "content": "Hi! How can I help you today?"})
        return self._ask()

    def reply(self, agent_text: str) -> str:
        self.turns += 1
        self.history.append({"role": "user", "content": agent_text})
        return self._ask()


class LocalModelUser(_ChatUser):
    """``generate(messages) -> str`` with chat messages (system first); inject the project's sampler."""

    def __init__(self, scenario: dict[str, Any], generate: Callable[[list[dict[str, str]]], str]):
        super().__init__(scenario)
        self.generate = generate

    def _generate(self) -> str:
        return self.generate([{"role": "system", "content": self.system}, *self.history])


class GeminiUser(_ChatUser):
    """google-genai user. The key is read from ``api_key_env`` at construction and never logged;
    without it every turn uses the scripted fallback (``failures`` counts them)."""

    def __init__(self, scenario: dict[str, Any], model: str = "gemini-2.5-flash",
                 api_key_env: str = "GEMINI_API_KEY", temperature: float = 0.0, client: Any = None):
        super().__init__(scenario)
        self.model, self.temperature = model, temperature
        self.client = client
        if self.client is None and os.environ.get(api_key_env):
            from google import genai
            self.client = genai.Client(api_key=os.environ[api_key_env])
        if self.client is None:
            _warn_once(f"GeminiUser: ${api_key_env} is not set; falling back to the scripted user")

    def _generate(self) -> str:
        if self.client is None:
            raise RuntimeError("no google-genai client (API key env var unset)")
        from google.genai import types
        contents = [types.Content(role="model" if m["role"] == "assistant" else "user",
                                  parts=[types.Part(text=m["content"])]) for m in self.history]
        response = self.client.models.generate_content(
            model=self.model, contents=contents,
            config=types.GenerateContentConfig(system_instruction=self.system,
                                               temperature=self.temperature))
        return response.text or ""


def make_user_factory(kind: str = "scripted", **kwargs: Any) -> UserFactory:
    """``kind``: scripted | gemini | local (``generate=`` callable required for local)."""
    if kind == "scripted":
        return lambda scenario: ScriptedUser(scenario, **kwargs)
    if kind == "gemini":
        return lambda scenario: GeminiUser(scenario, **kwargs)
    if kind == "local":
        if "generate" not in kwargs:
            raise ValueError("user kind 'local' needs generate=<callable(messages) -> str>, "
                             "e.g. the sampler engine's chat generate function")
        return lambda scenario: LocalModelUser(scenario, **kwargs)
    raise ValueError(f"unknown user simulator {kind!r}; choose scripted | gemini | local")
