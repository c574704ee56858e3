"""Credit-reference validation/repair and the annotation prompt's token budget."""

import json

from helpers.credit_fixtures import call, cancel_group, make_trajectory, valid_reference_json
from sgcd_jax.credit.prompt import (PROMPT_VERSION, PromptConfig, estimate_tokens,
                                    render_annotation_prompt)
from sgcd_jax.credit.schema import Verdict, validate_reply
from sgcd_jax.credit.selection import group_siblings


def test_valid_reply_passes_unchanged():
    group = cancel_group()
    outcome = validate_reply(valid_reference_json(group), group)
    assert outcome.reason == "ok" and outcome.repairs == []
    assert outcome.reference.verdicts(0, 3) == [Verdict.NEUTRAL, Verdict.DECISIVE, Verdict.NEUTRAL]


def test_repair_drops_unknown_siblings_out_of_range_and_duplicate_steps():
    group = cancel_group()
    payload = json.loads(valid_reference_json(group))
    payload["siblings"].append({"sample_index": 9, "steps": []})
    payload["siblings"][1]["steps"] += [{"step": 7, "verdict": "fatal", "reason": "x"},
                                        {"step": 0, "verdict": "decisive", "reason": "dup"}]
    payload["siblings"][2]["steps"] = payload["siblings"][2]["steps"][:1]  # steps 1..3 missing
    outcome = validate_reply("Here you go: " + json.dumps(payload) + " — hope it helps", group)
    assert outcome.reason == "repaired"
    ref = outcome.reference
    assert [s.sample_index for s in ref.siblings] == [0, 1, 2, 3]
    assert [s.step for s in ref.for_sibling(1).steps] == [0, 1, 2]
    assert ref.for_sibling(1).steps[0].verdict == Verdict.NEUTRAL  # first answer kept, dup dropped
    assert [s.reason for s in ref.for_sibling(2).steps][1:] == ["not annotated"] * 3


def test_unrepairable_replies_are_rejected_with_named_reasons():
    group = cancel_group()
    assert validate_reply("", group).reason == "empty_reply"
    assert validate_reply(None, group).reason == "empty_reply"
    assert validate_reply("[1, 2", group).reason == "invalid_json"
    no_steps = json.dumps({"summary": "s", "siblings": [{"sample_index": 0, "steps": []}]})
    assert validate_reply(no_steps, group).reason == "schema_invalid"
    bad_verdict = json.loads(valid_reference_json(group))
    bad_verdict["siblings"][0]["steps"][0]["verdict"] = "superb"
    outcome = validate_reply(json.dumps(bad_verdict), group)
    assert outcome.reason == "schema_invalid" and "verdict" in outcome.detail
    empty_summary = json.loads(valid_reference_json(group))
    empty_summary["summary"] = "   "
    assert validate_reply(json.dumps(empty_summary), group).reason == "schema_invalid"


def test_prompt_shows_task_siblings_outcomes_and_verifier_report():
    group = cancel_group()
    group.trajectories[1].info = {"db_match": False, "missing": "reservation ABC123 still active"}
    text = render_annotation_prompt(group).text
    assert "Please cancel reservation ABC123." in text and "## Task task-g0" in text
    assert text.count("### Sibling") == 4 and "sample_index=1: FAILURE" in text
    assert 'call: cancel_reservation({"reservation_id": "XYZ999"})' in text
    assert "reservation ABC123 still active" in text
    assert PROMPT_VERSION.startswith("sgcd-credit-")


def test_budget_truncates_observations_first_and_never_calls():
    long_obs = json.dumps({"flights": ["HAT%03d" % i for i in range(2000)]})
    calls = [[call("search_direct_flight", origin="JFK", destination=f"D{k}", date="2024-05-01")]
             for k in range(6)]
    trajs = [make_trajectory("g", i, float(i == 0), calls, obs_text=long_obs) for i in range(2)]
    group = group_siblings(trajs, 1.0)[0]
    unlimited = render_annotation_prompt(group, PromptConfig(max_prompt_tokens=10**7,
                                                             max_observation_chars=10**6))
    assert long_obs in unlimited.text
    tight = render_annotation_prompt(group, PromptConfig(max_prompt_tokens=3000))
    assert not tight.over_budget and tight.estimated_tokens <= 3000
    assert tight.observation_chars < 1500 and long_obs not in tight.text
    for k in range(6):
        assert f'"destination": "D{k}"' in tight.text
    impossible = render_annotation_prompt(group, PromptConfig(max_prompt_tokens=50))
    assert impossible.over_budget and all(f'"D{k}"' in impossible.text for k in range(6))
    assert estimate_tokens("abcd" * 10) == 10


def test_success_action_is_optional_normalised_and_cut():
    group = cancel_group()
    raw = json.loads(valid_reference_json(group))
    raw["siblings"][1]["steps"][1]["success_action"] = "cancel_reservation(\n  ABC123 )" + " x" * 200
    out = validate_reply(json.dumps(raw), group)
    steps = out.reference.for_sibling(1).steps
    assert steps[1].success_action.startswith("cancel_reservation( ABC123 ) x") and len(steps[1].success_action) == 200
    assert "truncated a success_action" in out.repairs
    assert steps[0].success_action == "" and out.reference.actions(1, 3)[1] == steps[1].success_action
    assert "success_action" in render_annotation_prompt(group, PromptConfig()).text  # the annotator is asked for it
