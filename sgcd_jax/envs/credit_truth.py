"""Ground truth for credit: which assistant turns decided a finished episode's outcome.

The airline envs know the task's gold plan, so after an episode they can say where it went wrong
(or, for a success, which turn delivered the outcome). The credit-localization metric
(``sgcd_jax.credit.localization``) scores credit weights against this, so it must be what the
verifier actually checks, never a guess from the policy's text.

Reported in ``info["credit_truth"]`` as ``{"decisive": [{"turn", "kind", "detail"}], "num_turns"}``;
``turn`` counts the assistant turns the env received (``env.step`` calls), from 0. ``turn ==
num_turns`` means "the turn after the last one the env saw" (the episode was cut before the agent
acted). Kinds, for a failure (first of each; several can apply):
  ``wrong_write``    first write call (accepted or rejected) that is not the next gold write (extra,
                     wrong tool or arguments)
  ``shortcut``       a write made before a required lookup (guessed id / payment), or an answer
                     given without any lookup
  ``wrong_id``       a required lookup never made with the gold arguments: the first call of that
                     tool with other arguments
  ``missing_call``   a gold write never made: the turn that ended the episode instead
  ``missing_read``   a required lookup never made and no wrong-id call to blame: the turn that acted
                     (first write) or replied instead
  ``reply_missing_info``  the final reply (or stop) that omits required ``communicate_info``
  ``no_stop``        all gold calls done but the episode never ended with a reply: the first turn after
                     the last gold call that is not a reply (else the last turn)
For a success, ``helpful`` marks the turn that delivered the outcome the verifier checks: the first
reply that communicates all required info, else the turn of the last gold write.
"""

from __future__ import annotations

import json
from typing import Any

from sgcd_jax.envs.tau_airline.schemas import validate_arguments
from sgcd_jax.envs.tau_airline.tools import WRITE_TOOLS


def call_key(name: str, arguments: Any) -> str:
    """A call's identity for comparing with gold: tool name + validated, key-sorted arguments."""
    try:
        arguments = validate_arguments(name, arguments)
    except (ValueError, KeyError, TypeError):
        pass
    return name + json.dumps(arguments, sort_keys=True, default=str)


def env_turns(messages: list[dict[str, Any]], tool_log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per assistant turn the env received: {"calls": [{"name", "key", "ok"}], "text"}.

    ``messages`` is the env's chat (assistant turns carry ``tool_calls``); ``tool_log`` lists the
    calls' outcomes in call order (``ToolConversation.tool_log``)."""
    turns, log = [], iter(tool_log)
    for message in messages:
        if message.get("role") != "assistant":
            continue
        calls = []
        for call in message.get("tool_calls") or []:
            outcome = next(log)
            fn = call["function"]
            calls.append({"name": fn["name"], "key": call_key(fn["name"], fn["arguments"]), "ok": outcome["ok"]})
        turns.append({"calls": calls, "text": message.get("content") or ""})
    return turns


def _communicates(text: str, required: list[str]) -> bool:
    text = text.lower().replace(",", "")  # the τ² communicate rule (ToolConversation.communicated)
    return all(s.lower() in text for s in required)


def decisive_turns(turns: list[dict[str, Any]], gold_actions: list[dict[str, Any]], communicate_info: list[str],
                   reward: float, ended_by_stop: bool, required_reads: list[int] | None = None) -> dict[str, Any]:
    """The decisive turns of one finished episode (module docstring).

    ``required_reads``: indices into ``gold_actions`` of the lookups that must succeed before the first
    write (airline_lite); None = every gold read (τ³, whose gold lists only the reads it needs)."""
    n = len(turns)
    gold = [{"name": a["name"], "key": call_key(a["name"], a.get("arguments", {}))} for a in gold_actions]
    gold_writes = [g for g in gold if g["name"] in WRITE_TOOLS]
    reads = [gold[i] for i in required_reads] if required_reads is not None else \
        [g for g in gold if g["name"] not in WRITE_TOOLS]
    replies = [k for k, t in enumerate(turns) if not t["calls"]]
    gold_keys = {g["key"] for g in gold}
    last_gold = max((k for k, t in enumerate(turns) for c in t["calls"] if c["key"] in gold_keys), default=-1)
    # the episode's last word to the user; with no reply, the turn that should have been one
    final = replies[-1] if replies else min(last_gold + 1, n)
    decisive: list[dict[str, Any]] = []

    def add(turn: int, kind: str, detail: str) -> None:
        decisive.append({"turn": int(turn), "kind": kind, "detail": detail})

    if reward > 0:
        informs = [k for k in replies if communicate_info and _communicates(turns[k]["text"], communicate_info)]
        done_writes = [k for k, t in enumerate(turns) for c in t["calls"] if c["ok"] and c["name"] in WRITE_TOOLS]
        if informs:
            add(informs[0], "helpful", "reply that communicates " + ", ".join(communicate_info))
        elif done_writes:
            add(done_writes[-1], "helpful", "last gold write")
        elif replies:
            add(replies[0], "helpful", "reply")
        return {"decisive": decisive, "num_turns": n}

    # writes against the gold write sequence; lookups done (ok) before the first successful write
    first_write = next((k for k, t in enumerate(turns) for c in t["calls"] if c["ok"] and c["name"] in WRITE_TOOLS), n)
    reads_before = {c["key"] for t in turns[:first_write] for c in t["calls"] if c["ok"]}
    reads_any = {c["key"] for t in turns for c in t["calls"] if c["ok"]}
    write_index = 0
    for k, turn in enumerate(turns):
        for call in turn["calls"]:
            if call["name"] not in WRITE_TOOLS:
                continue  # a rejected write (e.g. an invented payment id) diverges as much as a wrong one
            expected = gold_writes[write_index]["key"] if write_index < len(gold_writes) else None
            if call["key"] != expected:
                add(k, "wrong_write", f"{call['name']} is not the next gold write")
                break
            write_index += 1
        if any(d["kind"] == "wrong_write" for d in decisive):
            break
    wrong_write = any(d["kind"] == "wrong_write" for d in decisive)
    for read in reads:
        if read["key"] in (reads_before if first_write < n else reads_any):
            continue
        wrong = next((k for k, t in enumerate(turns) for c in t["calls"]
                      if c["name"] == read["name"] and c["key"] != read["key"]), None)
        if wrong is not None:
            add(wrong, "wrong_id", f"{read['name']} with other arguments than the gold lookup")
        elif first_write < n and read["key"] in reads_any:
            add(first_write, "shortcut", f"write before the required lookup {read['name']}")
        elif first_write < n:
            add(first_write, "shortcut", f"write without the required lookup {read['name']}")
        elif not any(t["calls"] for t in turns[:final]):
            add(min(final, n), "shortcut", "answered without any lookup")
        else:
            add(min(final, n), "missing_read", f"acted without the required lookup {read['name']}")
    if write_index < len(gold_writes) and not wrong_write:
        add(final, "missing_call", f"gold write {gold_writes[write_index]['name']} never made")
    if communicate_info and not any(_communicates(turns[k]["text"], communicate_info) for k in replies):
        add(final, "reply_missing_info", "no reply communicates " + ", ".join(communicate_info))
    if not ended_by_stop and not decisive:
        done = {c["key"] for t in turns for c in t["calls"] if c["ok"]}
        after = next((k for k in range(last_gold + 1, n) if turns[k]["calls"]), None)
        if all(g["key"] in done for g in gold) and after is not None:
            add(after, "no_stop", "kept calling tools after the gold calls instead of replying")
        else:
            add(max(n - 1, 0), "no_stop", "the episode never ended with a stop")
    seen, unique = set(), []
    for d in sorted(decisive, key=lambda d: d["turn"]):
        if (d["turn"], d["kind"]) not in seen:
            seen.add((d["turn"], d["kind"]))
            unique.append(d)
    return {"decisive": unique, "num_turns": n}


def conversation_truth(env: Any, gold_actions: list[dict[str, Any]], communicate_info: list[str], reward: float,
                       ended_by_stop: bool, required_reads: list[int] | None = None) -> dict[str, Any]:
    """``decisive_turns`` of a finished ``ToolConversation`` env (its messages and tool log)."""
    turns = env_turns(env.messages, env.tool_log)
    return decisive_turns(turns, gold_actions, communicate_info, reward, ended_by_stop, required_reads)

