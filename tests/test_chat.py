"""Chat rendering: hermes tool format for SmolLM2's template, native tools, continuation == full re-render."""

import json

import pytest

from sgcd_jax.models import load_tokenizer
from sgcd_jax.models.chat import ChatRenderer, format_tool_call, to_hermes_messages

TOOLS = [{"type": "function", "function": {
    "name": "get_user_details", "description": "Get a user's profile.",
    "parameters": {"type": "object", "properties": {"user_id": {"type": "string"}}, "required": ["user_id"]}}}]
SYSTEM = {"role": "system", "content": "You are an airline agent."}
USER = {"role": "user", "content": "Hi, I'm mia_li_3668."}
CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"type": "function", "function": {"name": "get_user_details", "arguments": {"user_id": "mia_li_3668"}}}]}
RESULTS = [{"role": "tool", "content": '{"name": "Mia Li"}'}, {"role": "tool", "content": '{"tier": "gold"}'}]


@pytest.fixture(scope="module")
def smollm2_renderer():
    return ChatRenderer(load_tokenizer("smollm2-135m-instruct"))


def test_smollm2_template_has_no_tool_support_so_hermes_is_used(smollm2_renderer):
    assert not smollm2_renderer.native_tools
    assert smollm2_renderer.end_of_turn_id == 2 and 2 in smollm2_renderer.stop_token_ids()


def test_hermes_lists_tools_in_the_system_prompt(smollm2_renderer):
    text = smollm2_renderer.render_text([SYSTEM, USER], TOOLS, add_generation_prompt=True)
    system_turn = text.split("<|im_end|>")[0]
    assert system_turn.startswith("<|im_start|>system\nYou are an airline agent.")
    assert json.dumps(TOOLS[0]) in system_turn and "<tool_call>" in system_turn
    assert text.endswith("<|im_start|>assistant\n")


def test_hermes_renders_calls_and_tool_results_as_one_user_turn():
    messages = to_hermes_messages([USER, CALL, *RESULTS], tools=None)
    assert messages[1] == {"role": "assistant",
                           "content": format_tool_call("get_user_details", {"user_id": "mia_li_3668"})}
    assert messages[2]["role"] == "user" and messages[2]["content"] == (
        '<tool_response>\n{"name": "Mia Li"}\n</tool_response>\n<tool_response>\n{"tier": "gold"}\n</tool_response>')
    assert len(messages) == 3


def test_continuation_appended_to_generated_ids_equals_full_rerender(smollm2_renderer):
    r = smollm2_renderer
    prompt = r.prompt_ids([SYSTEM, USER], TOOLS)
    # what the policy generates for the call, ending with the end-of-turn token (as the sampler stops on it)
    generated = r.encode(format_tool_call("get_user_details", {"user_id": "mia_li_3668"})) + [r.end_of_turn_id]
    continuation = r.continuation_ids([SYSTEM, USER, CALL], RESULTS, TOOLS)
    reply = {"role": "assistant", "content": "You are gold tier."}
    generated_2 = r.encode(reply["content"]) + [r.end_of_turn_id]
    continuation_2 = r.continuation_ids([SYSTEM, USER, CALL, *RESULTS, reply], [{"role": "user", "content": "Thanks"}],
                                        TOOLS)
    full = r.prompt_ids([SYSTEM, USER, CALL, *RESULTS, reply, {"role": "user", "content": "Thanks"}], TOOLS)
    assert prompt + generated + continuation + generated_2 + continuation_2 == full


def test_continuation_after_truncated_generation_prepends_end_of_turn(smollm2_renderer):
    r = smollm2_renderer
    ids = r.continuation_ids([USER, {"role": "assistant", "content": "cut off"}], [{"role": "user", "content": "?"}],
                             generated_ended_with_end_of_turn=False)
    assert ids[0] == r.end_of_turn_id and r.tokenizer.decode(ids[1:]).startswith("\n<|im_start|>user\n?")


NATIVE_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS:{{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_native_template_receives_tools_and_tool_messages_unchanged():
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    tokenizer.chat_template = NATIVE_TEMPLATE
    r = ChatRenderer(tokenizer)
    assert r.native_tools
    text = r.render_text([USER, CALL, RESULTS[0]], TOOLS)
    assert '"get_user_details"' in text.split("<|im_end|>")[0]
    assert "CALL get_user_details" in text and "<|im_start|>tool\n" in text and "<tool_response>" not in text
    full = r.prompt_ids([USER, CALL, RESULTS[0]], TOOLS, add_generation_prompt=False)
    head = r.encode(r.render_text([USER, CALL], TOOLS).rstrip("\n"))
    assert head + r.continuation_ids([USER, CALL], [RESULTS[0]], TOOLS, add_generation_prompt=False) == full


def test_renderer_rejects_unknown_tool_format(smollm2_renderer):
    with pytest.raises(ValueError, match="tool_format"):
        ChatRenderer(smollm2_renderer.tokenizer, tool_format="xml")
