"""Issue 17 fault table: one test per row (``test_row_NN_…``), each failing on the code before the fix.

``python scripts/fault_table.py`` runs these and prints the table with the measured numbers.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest


# ---- row 14: a partial trailing metrics.jsonl line (kill -9 mid-write) ----------------------------
def test_row_14_partial_trailing_metrics_line_is_tolerated(tmp_path):
    from sgcd_jax.metrics_log import MetricsLogger, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "phase": "train", "loss": 0.5}) + "\n"
                    + json.dumps({"step": 2, "phase": "train", "loss": 0.25}) + "\n" + '{"step": 3, "pha')
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2]
    logger = MetricsLogger(str(tmp_path), tensorboard=False, resume_step=2)  # the resume path
    logger.log(2, {"loss": 0.125})
    logger.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(str(tmp_path))] == [(1, 0.5), (2, 0.125)]
    # a bad line in the middle is corruption, not a cut: it still raises, naming the line
    path.write_text('{"step": 1}\n{garbage\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(str(tmp_path))


# ---- row 8: a deeply nested / huge <tool_call> is a counted error observation, not a lost batch ----
@pytest.mark.parametrize("payload", ["[" * 1000, '{"name": "get_user_details", "arguments": {"x": ' + "[" * 5000 + "]" * 5000 + "}}",
                                     '{"name": "x", "arguments": {"s": "' + "a" * 100_000 + '"}}'])
def test_row_08_deep_or_huge_tool_call_is_an_error_observation(payload):
    from sgcd_jax.rollout.toolparse import parse_tool_calls

    tools = [{"type": "function", "function": {"name": "get_user_details", "parameters": {"type": "object"}}}]
    turn = parse_tool_calls(f"hi <tool_call>{payload}</tool_call>", tools)
    assert turn.num_calls == 1 and turn.action.tool_calls == ()
    assert [e.kind for e in turn.errors] == ["oversized_call"]
    assert "rejected" in turn.error_observations()[0]["content"]
    # brackets inside strings do not count; a normal call still parses
    ok = parse_tool_calls('<tool_call>{"name": "get_user_details", "arguments": {"q": "' + "[" * 200 + '"}}</tool_call>', tools)
    assert ok.errors == () and ok.action.tool_calls[0].arguments == {"q": "[" * 200}
