"""Hermes tool-call parser: valid, multiple, malformed, unknown tool, wrong argument types."""

from sgcd_jax.rollout.toolparse import parse_tool_calls, schema_errors

TOOLS = [
    {"type": "function", "function": {
        "name": "get_user_details", "description": "look up a user",
        "parameters": {"type": "object", "properties": {"user_id": {"type": "string"}},
                       "required": ["user_id"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "book", "description": "book a flight",
        "parameters": {"type": "object", "properties": {
            "passengers": {"type": "array", "items": {"type": "object", "properties": {"age": {"type": "integer"}},
                                                      "required": ["age"]}},
            "cabin": {"type": "string", "enum": ["economy", "business"]},
            "insurance": {"type": "boolean"}}, "required": ["passengers", "cabin"]}}},
]


def test_single_valid_call_and_surrounding_text():
    text = 'Let me check.\n<tool_call>\n{"name": "get_user_details", "arguments": {"user_id": "mia_1"}}\n</tool_call>'
    turn = parse_tool_calls(text, TOOLS)
    assert turn.errors == ()
    assert turn.action.content == "Let me check."
    assert [(c.name, c.arguments) for c in turn.action.tool_calls] == [("get_user_details", {"user_id": "mia_1"})]


def test_multiple_calls_keep_order():
    text = ('<tool_call>{"name": "get_user_details", "arguments": {"user_id": "a"}}</tool_call>\n'
            '<tool_call>{"name": "book", "arguments": {"passengers": [{"age": 3}], "cabin": "economy"}}</tool_call>')
    turn = parse_tool_calls(text, TOOLS)
    assert [c.name for c in turn.action.tool_calls] == ["get_user_details", "book"]
    assert turn.num_calls == 2 and turn.action.content == ""


def test_no_tool_call_is_a_message_for_the_user():
    turn = parse_tool_calls("<think>hmm</think>Your flight is booked.", TOOLS)
    assert turn.action.tool_calls == () and turn.action.content == "Your flight is booked."


def test_malformed_json_becomes_error_observation():
    turn = parse_tool_calls('<tool_call>{"name": "book", "arguments": {"cabin": }</tool_call>', TOOLS)
    assert turn.action.tool_calls == ()
    assert [e.kind for e in turn.errors] == ["malformed_json"]
    obs = turn.error_observations()
    assert obs[0]["role"] == "tool" and "could not parse" in obs[0]["content"]


def test_unclosed_block_is_still_parsed():
    turn = parse_tool_calls('<tool_call>{"name": "get_user_details", "arguments": {"user_id": "x"}}', TOOLS)
    assert len(turn.action.tool_calls) == 1


def test_unknown_tool_lists_available_ones():
    turn = parse_tool_calls('<tool_call>{"name": "cancel", "arguments": {}}</tool_call>', TOOLS)
    assert turn.errors[0].kind == "unknown_tool"
    assert "book" in turn.errors[0].message and "get_user_details" in turn.errors[0].message


def test_wrong_argument_types_are_rejected_with_path():
    text = ('<tool_call>{"name": "book", "arguments": {"passengers": [{"age": "three"}], '
            '"cabin": "first", "insurance": 1}}</tool_call>')
    turn = parse_tool_calls(text, TOOLS)
    assert turn.action.tool_calls == ()
    message = turn.errors[0].message
    assert "arguments.passengers[0].age should be integer" in message
    assert "arguments.cabin must be one of" in message
    assert "arguments.insurance should be boolean" in message


def test_missing_required_and_extra_key():
    text = '<tool_call>{"name": "get_user_details", "arguments": {"uid": "x"}}</tool_call>'
    message = parse_tool_calls(text, TOOLS).errors[0].message
    assert "arguments.user_id is required" in message and "arguments.uid is not a parameter" in message


def test_valid_and_invalid_calls_in_one_turn_are_separated():
    text = ('<tool_call>{"name": "get_user_details", "arguments": {"user_id": "a"}}</tool_call>'
            '<tool_call>{"name": "nope", "arguments": {}}</tool_call>')
    turn = parse_tool_calls(text, TOOLS)
    assert len(turn.action.tool_calls) == 1 and len(turn.errors) == 1 and turn.num_calls == 2


def test_schema_bool_is_not_integer_and_int_is_number():
    assert schema_errors(True, {"type": "integer"}, "x")
    assert not schema_errors(3, {"type": "number"}, "x")
    assert not schema_errors(None, {"anyOf": [{"type": "string"}, {"type": "null"}]}, "x")
