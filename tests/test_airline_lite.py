"""airline_lite: oracle solves everything, every shortcut is rejected, generation is seeded."""

from __future__ import annotations

import json

import pytest

from sgcd_jax.envs import make_factory
from sgcd_jax.envs.airline_lite import demo_conversation, oracle_actions, oracle_demos, shortcut_actions
from sgcd_jax.envs.airline_lite.generator import FAMILIES, TOOLS
from sgcd_jax.envs.airline_lite.oracle import SHORTCUTS, play
from sgcd_jax.envs.base import AgentAction, ToolCall


@pytest.fixture(scope="module")
def mixed():
    return make_factory("airline_lite", difficulty="mixed", num_tasks=500, seed=3)


def test_oracle_scores_one_on_500_generated_tasks(mixed):
    tasks = mixed.tasks("train")
    assert len(tasks) == 500 and {t.payload["family"] for t in tasks} == set(FAMILIES["mixed"])
    failures = []
    for task in tasks:
        reward, info, _ = play(mixed.make(), task, oracle_actions(task))
        if reward != 1.0:
            failures.append((task.task_id, info["fail_reasons"]))
    assert not failures, failures[:5]


@pytest.mark.parametrize("kind", SHORTCUTS)
def test_each_shortcut_scores_zero(mixed, kind):
    applicable = [(t, a) for t in mixed.tasks("train") if (a := shortcut_actions(t, kind)) is not None]
    assert len(applicable) >= 20, f"shortcut {kind} applies to too few tasks to test"
    rewards = [play(mixed.make(), task, actions)[0] for task, actions in applicable]
    assert sum(rewards) == 0.0


def test_shortcut_failures_name_the_reason(mixed):
    task = next(t for t in mixed.tasks("train") if shortcut_actions(t, "guess_id") is not None)
    _, info, _ = play(mixed.make(), task, shortcut_actions(task, "guess_id"))
    assert info["db_match"] and not all(info["required_reads"].values())
    assert any("lookup skipped" in r for r in info["fail_reasons"])
    task = next(t for t in mixed.tasks("train") if shortcut_actions(t, "cancel_nonrefundable") is not None)
    _, info, _ = play(mixed.make(), task, shortcut_actions(task, "cancel_nonrefundable"))
    assert not info["db_match"] and info["write_calls"] == info["write_calls_ok"] == 1


def test_generation_is_deterministic_per_seed_and_differs_across_seeds_and_splits():
    def dump(seed, split):
        return json.dumps([t.payload for t in make_factory("airline_lite", difficulty="mixed", num_tasks=40,
                                                           seed=seed).tasks(split)], sort_keys=True)
    assert dump(7, "train") == dump(7, "train")
    assert dump(7, "train") != dump(8, "train")
    assert dump(7, "train") != dump(7, "test")


@pytest.mark.parametrize("difficulty,max_calls", [("easy", 2), ("medium", 3), ("hard", 8)])
def test_difficulty_levels_bound_tool_calls_and_tools(difficulty, max_calls):
    factory = make_factory("airline_lite", difficulty=difficulty, num_tasks=60, seed=0)
    tasks = factory.tasks("train")
    calls = [len(t.payload["actions"]) for t in tasks]
    assert max(calls) <= max_calls and min(calls) >= 1
    env = factory.make()
    names = [s["function"]["name"] for s in env.reset(tasks[0]).tools]
    assert names == list(TOOLS[difficulty])


def test_easy_prompts_are_templated_and_observations_compact():
    factory = make_factory("airline_lite", difficulty="easy", num_tasks=30, seed=0)
    for task in factory.tasks("train"):
        assert task.payload["opening"].split()[0] in ("What", "Please")
        demo = demo_conversation(factory, task)
        assert demo["reward"] == 1.0
        for message in demo["messages"]:
            if message["role"] == "tool":
                assert len(message["content"]) < 600 and ": " not in message["content"]


def test_write_call_counts_in_info():
    factory = make_factory("airline_lite", difficulty="medium", num_tasks=20, seed=0)
    task = next(t for t in factory.tasks("train") if t.payload["family"] == "baggage")
    bad = AgentAction(tool_calls=(ToolCall("update_reservation_baggages", {
        "reservation_id": "NOPE00", "total_baggages": 1, "nonfree_baggages": 1, "payment_id": "x"}, "b"),))
    _, info, _ = play(factory.make(), task, [bad] + oracle_actions(task))
    assert info["write_calls"] == 2 and info["write_calls_ok"] == 1 and info["tool_errors"] == 1
    assert info["reward"] == 1.0  # a failed write changes nothing, so the episode can still succeed


def test_tool_outside_the_difficulty_subset_is_an_error():
    factory = make_factory("airline_lite", difficulty="easy", num_tasks=3, seed=0)
    env = factory.make()
    env.reset(factory.tasks("train")[0])
    step = env.step(AgentAction(tool_calls=(ToolCall("send_certificate", {"user_id": "a", "amount": 1}),)))
    assert step.tool_errors == 1 and "not found" in step.observations[0]["content"]


def test_talking_before_acting_ends_the_episode_with_zero():
    factory = make_factory("airline_lite", difficulty="easy", num_tasks=3, seed=0)
    env = factory.make()
    task = factory.tasks("train")[0]
    env.reset(task)
    step = env.step(AgentAction(content="Sure, let me check that."))
    assert step.done and step.termination == "user_stop" and env.reward() == 0.0


def test_oracle_demos_are_full_successful_conversations():
    factory = make_factory("airline_lite", difficulty="easy", num_tasks=10, seed=0)
    demos = oracle_demos(factory, "train", 4)
    assert len(demos) == 4
    for demo in demos:
        roles = [m["role"] for m in demo["messages"]]
        assert roles[:2] == ["system", "user"] and "assistant" in roles and "tool" in roles
        assert demo["reward"] == 1.0 and demo["tools"]


def test_train_and_test_splits_share_no_entities():
    factory = make_factory("airline_lite", difficulty="mixed", num_tasks=100, seed=0)

    def entities(split):
        found = set()
        for task in factory.tasks(split):
            for action in task.payload["actions"]:
                args = action["arguments"]
                found.update(str(args[k]) for k in ("user_id", "reservation_id") if k in args)
        return found
    assert entities("train") and not entities("train") & entities("test")


def test_tasks_per_db_spreads_a_split_over_many_databases():
    """tasks_per_db=k: every k tasks get a fresh DB, so ids seen in one shard do not repeat in the others
    (what makes SFT demos teach copying ids rather than memorising 30 users), and the oracle still wins."""
    import re

    one_db = make_factory("airline_lite", difficulty="mixed", num_tasks=96, seed=5).tasks("train")
    sharded_factory = make_factory("airline_lite", difficulty="mixed", num_tasks=96, seed=5, tasks_per_db=8)
    sharded = sharded_factory.tasks("train")
    assert len(sharded) == 96 and len({t.task_id for t in sharded}) == 96
    assert len({t.payload["db_split"] for t in one_db}) == 1
    assert len({t.payload["db_split"] for t in sharded}) == 12
    assert [t.payload["index"] for t in sharded] == list(range(96))

    def user_ids(tasks):
        found = {m for t in tasks for m in re.findall(r"\b[a-z]+_[a-z]+_\d{4}\b", json.dumps(t.payload))}
        return {m for m in found if not m.startswith(("credit_card", "gift_card"))}
    assert len(user_ids(one_db)) <= 30 < 2 * 30 < len(user_ids(sharded))  # one DB holds 30 users
    for task in sharded:
        reward, info, _ = play(sharded_factory.make(), task, oracle_actions(task))
        assert reward == 1.0, (task.task_id, info["fail_reasons"])
    assert make_factory("airline_lite", num_tasks=10, seed=5, tasks_per_db=3).tasks("x")[9].payload["db_split"] == "x#3"
    with pytest.raises(ValueError, match="tasks_per_db"):
        make_factory("airline_lite", tasks_per_db=-1)


def test_imperfect_demonstrator_plays_the_shortcut_on_a_seeded_fraction():
    """sft.demo_shortcut: a seeded ~rate of the demos the shortcut applies to are the shortcut's own
    conversation (kept with its true reward 0); tasks it does not apply to stay oracle demos."""
    factory = make_factory("airline_lite", difficulty="easy", num_tasks=120, seed=0)
    clean = oracle_demos(factory, "train", 120)
    noisy = oracle_demos(factory, "train", 120, shortcut="silent", shortcut_rate=0.5, seed=0)
    silent = [d for d in noisy if d.get("shortcut") == "silent"]
    families = {t.task_id: t.payload["family"] for t in factory.tasks("train")}
    assert all(families[d["task_id"]] in ("status", "membership") for d in silent)  # cancel_ok: nothing to say
    eligible = sum(families[d["task_id"]] != "cancel_ok" for d in noisy)
    assert 0.35 * eligible < len(silent) < 0.65 * eligible
    for demo in silent:
        assert demo["reward"] == 0.0 and demo["messages"][-1]["content"] == "###STOP###"
        assert any(r.startswith("missing info") for r in demo["info"]["fail_reasons"])
    for clean_demo, demo in zip(clean, noisy):
        assert clean_demo["task_id"] == demo["task_id"]
        if "shortcut" not in demo:
            assert demo["messages"] == clean_demo["messages"] and demo["reward"] == 1.0
    # seeded per task: a shorter prefix picks the same tasks, another seed other ones
    prefix = oracle_demos(factory, "train", 40, shortcut="silent", shortcut_rate=0.5, seed=0)
    assert [d.get("shortcut") for d in prefix] == [d.get("shortcut") for d in noisy[:40]]
    other = oracle_demos(factory, "train", 120, shortcut="silent", shortcut_rate=0.5, seed=1)
    assert [d.get("shortcut") for d in other] != [d.get("shortcut") for d in noisy]
    assert all("shortcut" in d for d in oracle_demos(factory, "train", 30, shortcut="silent", shortcut_rate=1.0)
               if families[d["task_id"]] != "cancel_ok")
    with pytest.raises(ValueError, match="unknown demo shortcut"):
        oracle_demos(factory, "train", 4, shortcut="lazy", shortcut_rate=0.5)
    with pytest.raises(ValueError, match="rate"):
        oracle_demos(factory, "train", 4, shortcut="silent", shortcut_rate=1.5)
