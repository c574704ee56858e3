"""User simulators: scripted determinism, stop tokens, model-backed users and their fallbacks."""

from __future__ import annotations

import logging

import pytest

from sgcd_jax.envs import make_factory
from sgcd_jax.envs.base import AgentAction
from sgcd_jax.envs.users import (GeminiUser, LocalModelUser, ScriptedUser, make_user_factory,
                                 user_termination)

SCENARIO = {"reason_for_call": "You want to cancel reservation EHGLP3.",
            "known_info": "You are Emma Kim.\nYour user id is emma_kim_9957."}


def test_scripted_user_is_deterministic_and_answers_from_the_scenario():
    def run():
        user = ScriptedUser(SCENARIO, max_turns=5)
        return [user.first_message(), user.reply("Could you give me your user id?"),
                user.reply("Shall I proceed with the cancellation?"), user.reply("Is there anything else?")]
    first, second = run(), run()
    assert first == second
    assert "EHGLP3" in first[0] and "emma_kim_9957" in first[1]
    assert first[2] == "Yes, please proceed." and "###STOP###" in first[3]


def test_scripted_user_stops_after_max_turns():
    user = ScriptedUser(SCENARIO, max_turns=3)
    replies = [user.reply("Hmm.") for _ in range(3)]
    assert "###STOP###" not in replies[0] and "###STOP###" in replies[-1]


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


def test_gemini_user_without_key_falls_back_to_scripted(monkeypatch, caplog):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    with caplog.at_level(logging.WARNING):
        user = GeminiUser(SCENARIO)
        first = user.first_message()
    assert first == ScriptedUser(SCENARIO).first_message() and user.failures == 1
    assert "GEMINI_API_KEY" in caplog.text


def test_gemini_user_api_failure_falls_back_and_never_logs_the_key(monkeypatch, caplog):
    monkeypatch.setenv("GEMINI_API_KEY", "sk-secret-value-123")

    class Broken:
        class models:
            @staticmethod
            def generate_content(**_):
                raise ConnectionError("503 unavailable")

    with caplog.at_level(logging.WARNING):
        user = GeminiUser(SCENARIO, client=Broken())
        user.first_message()
        reply = user.reply("Is there anything else?")
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
