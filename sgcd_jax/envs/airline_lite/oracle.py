"""Oracle and shortcut policies for airline_lite.

``oracle_actions`` solves every task (gold tool calls, one per turn, then the templated final message);
``demo_conversation`` plays it through a fresh env and returns the full chat for SFT warm-up.
``shortcut_actions`` are the tempting wrong policies the verifier must reject (tests).
"""

from __future__ import annotations

import random
from typing import Any

from sgcd_jax.envs.base import AgentAction, Env, EnvFactory, Task, ToolCall

SHORTCUTS = ("cancel_nonrefundable", "guess_id", "guess_payment", "silent", "no_stop", "no_lookup")


def _turns(calls: list[dict[str, Any]], final: str | None) -> list[AgentAction]:
    actions = [AgentAction(tool_calls=(ToolCall(c["name"], dict(c["arguments"]), f"call_{i}"),))
               for i, c in enumerate(calls)]
    return actions + ([AgentAction(content=final)] if final is not None else [])


def oracle_actions(task: Task) -> list[AgentAction]:
    return _turns(task.payload["actions"], task.payload["final_message"])


def shortcut_actions(task: Task, kind: str) -> list[AgentAction] | None:
    """The shortcut policy's actions for ``task``, or None when it does not apply to the task."""
    p = task.payload
    writes = [a for a in p["actions"] if a["name"] in ("cancel_reservation", "update_reservation_baggages",
                                                       "book_reservation")]
    if kind == "cancel_nonrefundable":  # cancel although the policy forbids it
        if "cannot be cancelled" not in p["communicate_info"]:
            return None
        rid = p["actions"][p["required_reads"][-1]]["arguments"]["reservation_id"]
        calls = p["actions"] + [{"name": "cancel_reservation", "arguments": {"reservation_id": rid}}]
        return _turns(calls, f"Reservation {rid} is cancelled.")
    if kind == "guess_id":  # act on the right id without looking it up first
        if not writes:
            return None
        return _turns(writes, p["final_message"])
    if kind == "guess_payment":  # invent a payment id instead of reading the profile
        pays = [a for a in writes if "payment_id" in a["arguments"] or "payment_methods" in a["arguments"]]
        if not pays:
            return None
        calls = []
        for action in p["actions"]:
            action = {"name": action["name"], "arguments": dict(action["arguments"])}
            if "payment_id" in action["arguments"]:
                action["arguments"]["payment_id"] = "credit_card_1234567"
            if "payment_methods" in action["arguments"]:
                action["arguments"]["payment_methods"] = [
                    {**m, "payment_id": "gift_card_1234567"} for m in action["arguments"]["payment_methods"]]
            calls.append(action)
        return _turns(calls, p["final_message"])
    if kind == "silent":  # right tool calls, but never tell the user what was found
        if not p["communicate_info"]:
            return None
        return _turns(p["actions"], "###STOP###")
    if kind == "no_stop":  # right tool calls, then keeps calling tools until the turn limit
        return _turns(p["actions"], None)
    if kind == "no_lookup":  # answer at once, calling no tool (even when the words happen to be right)
        return _turns([], p["final_message"])
    raise ValueError(f"unknown shortcut {kind!r}; choose one of {SHORTCUTS}")


_PAD = AgentAction(tool_calls=(ToolCall("get_flight_status", {"flight_number": "HAT000",
                                                             "date": "2024-05-15"}, "pad"),))


def play(env: Env, task: Task, actions: list[AgentAction]) -> tuple[float, dict[str, Any], dict[str, Any]]:
    """Run ``actions`` until the episode ends (padding with a failing read up to the turn limit when
    they run out); (reward, info, {"messages", "tools"})."""
    reset = env.reset(task)
    for action in actions:
        if env.step(action).done:
            break
    while not env.termination:
        env.step(_PAD)
    return env.reward(), env.info(), {"messages": [dict(m) for m in env.messages], "tools": reset.tools}


def demo_conversation(factory: EnvFactory, task: Task) -> dict[str, Any]:
    """{"messages", "tools", "reward", "info"}: the oracle's full chat, for SFT warm-up demonstrations."""
    reward, info, chat = play(factory.make(), task, oracle_actions(task))
    return {**chat, "reward": reward, "info": info}


def oracle_demos(factory: EnvFactory, split: str = "train", num_demos: int | None = None, *,
                 shortcut: str = "", shortcut_rate: float = 0.0, seed: int = 0) -> list[dict[str, Any]]:
    """Demonstrations for the first ``num_demos`` tasks of ``split`` (SFT warm-up data): the oracle's
    conversations, or an imperfect demonstrator's. With ``shortcut`` set, each task the shortcut applies
    to is played by that shortcut policy instead, with probability ``shortcut_rate`` (seeded per task:
    the same tasks at any ``num_demos``); those demos keep their true reward (0) and
    ``"shortcut": kind``."""
    if shortcut and shortcut not in SHORTCUTS:
        raise ValueError(f"unknown demo shortcut {shortcut!r}; choose one of {SHORTCUTS}")
    if not 0.0 <= shortcut_rate <= 1.0:
        raise ValueError(f"demo shortcut rate must be in [0, 1], got {shortcut_rate}")
    out = []
    for task in factory.tasks(split)[:num_demos]:
        actions = None
        if shortcut and random.Random(f"demo-shortcut-{seed}-{task.task_id}").random() < shortcut_rate:
            actions = shortcut_actions(task, shortcut)
        if actions is None:
            demo = demo_conversation(factory, task)
        else:
            reward, info, chat = play(factory.make(), task, actions)
            demo = {**chat, "reward": reward, "info": info, "shortcut": shortcut}
        out.append({**demo, "task_id": task.task_id})
    return out


def oracle_policy(env: Env, task: Task) -> None:
    """A ``metrics.evaluate`` policy that plays the oracle (eval smoke tests, upper bound)."""
    env.reset(task)
    for action in oracle_actions(task):
        if env.step(action).done:
            return
