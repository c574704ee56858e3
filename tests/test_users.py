"""User simulators: scripted determinism, stop tokens, model-backed users and their fallbacks."""

from __future__ import annotations

import logging

import pytest

from sgcd_jax.envs import make_factory
from sgcd_jax.envs import users
from sgcd_jax.envs.base import AgentAction
from sgcd_jax.envs.users import (GeminiUser, LocalModelUser, ScriptedUser, make_user_factory,
                                 user_termination)

SCENARIO = {"reason_for_call": "You want to cancel reservation EHGLP3.",
            "known_info": "You are Emma Kim.\nYour user id is emma_kim_9957."}


def test_scripted_user_is_deterministic_and_answers_from_the_scenario():
    def run():
        user = ScriptedUser(SCENARIO)
        return [user.first_message(), user.reply("Could you give me your user id?"),
                user.reply("Shall I proceed with the cancellation?"), user.reply("Is there anything else?")]
    first, second = run(), run()
    assert first == second
    assert "EHGLP3" in first[0] and "emma_kim_9957" in first[1]
    assert first[2] == "Yes, please proceed." and "###STOP###" in first[3]


def test_scripted_user_never_stops_on_a_turn_count_and_max_turns_scores_zero():
    user = ScriptedUser(SCENARIO)
    assert not any("###STOP###" in user.reply("Hmm.") for _ in range(50))
    # τ³: an agent that repeats one sentence ends by max_turns (not a proper end) and scores 0, even on
    # a refusal task where ending properly without acting scores 1.
    factory = make_factory("tau3_airline", user="scripted", max_turns=12)
    task = next(t for t in factory.tasks("base") if t.task_id == "0")
    env = factory.make()
    env.reset(task)
    steps = [env.step(AgentAction(content="I understand.")) for _ in range(12)]
    assert [s.done for s in steps] == [False] * 11 + [True] and steps[-1].termination == "max_turns"
    assert env.reward() == 0.0
    env = factory.make()
    env.reset(task)
    assert env.step(AgentAction(content="###STOP###")).termination == "agent_stop" and env.reward() == 1.0


@pytest.mark.parametrize("text,reason", [("ok ###STOP###", "user_stop"), ("###TRANSFER###", "transfer"),
                                         ("###OUT-OF-SCOPE###", "out_of_scope"), ("thanks", "")])
def test_stop_tokens(text, reason):
    assert user_termination(text) == reason


def test_local_model_user_sees_role_flipped_history_and_can_end_the_episode():
    seen = []

    def generate(messages):
        seen.append(messages)
        return "I want to cancel EHGLP3." if len(seen) == 1 else "###OUT-OF-SCOPE###"

    factory = make_factory("tau3_airline", user="local", user_kwargs={"generate": generate})
    env = factory.make()
    task = next(t for t in factory.tasks("base") if t.task_id == "0")
    reset = env.reset(task)
    assert reset.messages[1]["content"] == "I want to cancel EHGLP3."
    step = env.step(AgentAction(content="How can I help?"))
    assert step.done and step.termination == "out_of_scope"
    assert seen[1][0]["role"] == "system" and "emma_kim_9957" in seen[1][0]["content"]
    assert seen[1][-1] == {"role": "user", "content": "How can I help?"}
    assert env.reward() == 1.0  # task 0 is a refusal task: doing nothing and ending properly is right


def test_gemini_user_without_key_falls_back_to_scripted_warns_once_and_counts(monkeypatch, caplog):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.setattr(users, "_WARNED", set())
    with caplog.at_level(logging.WARNING):
        user = GeminiUser(SCENARIO)
        first = user.first_message()
        for _ in range(3):
            user.reply("Could you give me your user id?")
        GeminiUser(SCENARIO).first_message()
    assert first == ScriptedUser(SCENARIO).first_message() and user.failures == 4
    assert "GEMINI_API_KEY" in caplog.text
    assert len(caplog.records) == 2  # the missing key once, the per-turn fallback once; not per turn
    # The env reports the episode's fallbacks (→ the 'user_fallbacks' metric).
    factory = make_factory("tau3_airline", user="gemini", max_turns=5)
    env = factory.make()
    env.reset(next(t for t in factory.tasks("base") if t.task_id == "0"))
    env.step(AgentAction(content="Hello, how can I help?"))
    assert env.info()["user_fallbacks"] == 2


def test_gemini_user_api_failure_falls_back_and_never_logs_the_key(monkeypatch, caplog):
    monkeypatch.setenv("GEMINI_API_KEY", "sk-secret-value-123")

    class Broken:
        class models:
            @staticmethod
            def generate_content(**_):
                raise ConnectionError("503 unavailable")

    monkeypatch.setattr(users, "_WARNED", set())
    with caplog.at_level(logging.WARNING):
        user = GeminiUser(SCENARIO, client=Broken())
        user.first_message()
        reply = user.reply("Is there anything else?")  # the scripted fallback answers the closing
    assert "###STOP###" in reply and user.failures == 2
    assert "sk-secret-value-123" not in caplog.text and "503" in caplog.text


def test_gemini_user_uses_client_reply():
    class Response:
        text = "Hello, I need help with EHGLP3."

    class Client:
        class models:
            @staticmethod
            def generate_content(model, contents, config):
                assert model == "gemini-test" and "emma_kim_9957" in config.system_instruction
                return Response()

    user = GeminiUser(SCENARIO, model="gemini-test", client=Client())
    assert user.first_message() == "Hello, I need help with EHGLP3." and user.failures == 0


def test_local_user_factory_requires_a_generate_callable():
    with pytest.raises(ValueError, match="generate"):
        make_user_factory("local")
    with pytest.raises(ValueError, match="unknown user simulator"):
        make_user_factory("telepathy")
    assert isinstance(make_user_factory("local", generate=lambda m: "hi")(SCENARIO), LocalModelUser)
