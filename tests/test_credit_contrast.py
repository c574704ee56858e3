"""ContrastAnnotator on hand-built siblings: the verdicts a careful human would give."""

from helpers.credit_fixtures import call, cancel_group, make_trajectory
from sgcd_jax.credit.contrast import (ContrastAnnotator, ContrastConfig, _Call, edit_alignment,
                                      normalise_call)
from sgcd_jax.credit.schema import Verdict
from sgcd_jax.credit.selection import group_siblings

D, H, N, X, F = Verdict.DECISIVE, Verdict.HELPFUL, Verdict.NEUTRAL, Verdict.HARMFUL, Verdict.FATAL


def verdicts(reference, group):
    return {t.sample_index: reference.verdicts(t.sample_index, t.num_steps) for t in group.trajectories}


def test_marks_decisive_write_fatal_wrong_write_and_fatal_omission():
    group = cancel_group()
    result = ContrastAnnotator().annotate(group)
    assert result.reason == "ok"
    assert verdicts(result.reference, group) == {
        0: [H, D, N],  # lookup shared with successes, the cancel all successes made, closing text
        1: [X, F, N],  # looked up the wrong reservation, cancelled it (irreversible write)
        2: [H, N, D, N],
        3: [H, F],  # right lookup, then stopped without the cancel every success made
    }
    reasons = {s.step: s.reason for s in result.reference.for_sibling(1).steps}
    assert "XYZ999" in reasons[1] and "ABC123" in reasons[1]  # names what it did and should have
    assert "cancel_reservation" in result.reference.summary


def test_write_tools_config_decides_fatal_versus_harmful():
    group = cancel_group()
    ref = ContrastAnnotator(ContrastConfig(write_tools=frozenset())).reference(group)
    got = verdicts(ref, group)
    assert got[1] == [X, X, N] and got[0] == [H, H, N] and got[3] == [H, X]


def test_read_shared_with_every_sibling_is_helpful_and_extra_success_read_neutral():
    lookup = call("get_user_details", user_id="u1")
    book = call("book_reservation", flight="HAT001")
    trajs = [make_trajectory("g", 0, 1.0, [[lookup], [call("search_flights", date="05-01")], [book]]),
             make_trajectory("g", 1, 1.0, [[lookup], [book]]),
             make_trajectory("g", 2, 0.0, [[lookup], [call("book_reservation", flight="HAT002")]])]
    group = group_siblings(trajs, 1.0)[0]
    got = verdicts(ContrastAnnotator().reference(group), group)
    assert got == {0: [H, N, D], 1: [H, D], 2: [H, F]}


def test_parse_error_step_is_harmful():
    lookup = call("get_reservation_details", reservation_id="A")
    trajs = [make_trajectory("g", 0, 1.0, [[lookup], "done"]),
             make_trajectory("g", 1, 0.0, [[lookup], "<tool_call>{bad", "done"],
                             parse_errors={1: "invalid JSON in tool call"})]
    group = group_siblings(trajs, 1.0)[0]
    assert verdicts(ContrastAnnotator().reference(group), group)[1] == [H, X, N]


def test_reference_is_deterministic_and_order_independent():
    group = cancel_group()
    again = group_siblings(list(reversed(group.trajectories)), 1.0)[0]
    first = ContrastAnnotator().reference(group).canonical_json()
    assert first == ContrastAnnotator().reference(again).canonical_json()


def test_non_mixed_group_gives_no_reference():
    group = cancel_group()
    group.successes = [False] * 4
    result = ContrastAnnotator().annotate(group)
    assert result.reference is None and result.reason == "not_mixed"


def test_normalise_call_ignores_case_spacing_and_integral_floats():
    a = call("Cancel_Reservation", reservation_id=" ABC123 ", nights=2.0)
    b = call("cancel_reservation", nights=2, reservation_id="abc123")
    assert normalise_call(a) == normalise_call(b)
    assert normalise_call(a) != normalise_call(call("cancel_reservation", reservation_id="ABC124"))


def _calls(*specs):
    return [_Call(0, key, key.split("(")[0], key, False) for key in specs]


def test_edit_alignment_matches_levenshtein_with_same_tool_substitution():
    a, b = _calls("x(1)", "y(1)", "z(1)"), _calls("x(1)", "z(1)")
    cost, pairs = edit_alignment(a, b)
    assert cost == 1 and pairs == [(0, 0), (1, None), (2, 1)]
    # same tool, other args: one substitution (cost 1), not delete+insert
    a, b = _calls("x(1)", "y(1)"), _calls("x(1)", "y(2)")
    assert edit_alignment(a, b) == (1, [(0, 0), (1, 1)])
    # different tools: cost 2 either way
    assert edit_alignment(_calls("p(1)"), _calls("q(1)"))[0] == 2
    assert edit_alignment([], _calls("q(1)")) == (1, [(None, 0)])


def test_same_calls_but_a_failing_reply_marks_the_reply_step():
    """The quickstart's decisive step: every sibling made the same lookup, the failed one then ended
    without the answer. Its reply step is harmful (with the verifier's reason and the success's
    reply beside it), the successes' reply steps are helpful; a call-level failure is left alone."""
    lookup = call("get_flight_status", flight_number="HAT185", date="2024-05-15")
    trajs = [make_trajectory("g", 0, 1.0, [[lookup], "Flight HAT185 on 2024-05-15 is on time."]),
             make_trajectory("g", 1, 0.0, [[lookup], "###STOP###"],
                             info={"fail_reasons": ["missing info: on time"]}),
             make_trajectory("g", 2, 0.0, [[call("get_flight_status", flight_number="HAT158", date="2024-05-15")],
                                           "Flight HAT158 on 2024-05-15 is delayed."]),
             make_trajectory("g", 3, 1.0, [[lookup], "Flight HAT185 on 2024-05-15 is on time."])]
    group = group_siblings(trajs, 1.0)[0]
    reference = ContrastAnnotator().reference(group)
    assert verdicts(reference, group) == {0: [H, H], 1: [H, X], 2: [X, N], 3: [H, H]}
    why = reference.for_sibling(1).steps[1].reason
    assert '"###STOP###"' in why and "is on time." in why and "missing info: on time" in why
    assert "[1]" in reference.for_sibling(0).steps[1].reason  # names the sibling that failed at the reply
    assert "Sibling 1 made the same calls but its reply at step 1 failed (missing info: on time)" in reference.summary
    # without a reply-level failure nothing changes: the last steps stay neutral
    only_calls = group_siblings([trajs[0], trajs[2]], 1.0)[0]
    assert verdicts(ContrastAnnotator().reference(only_calls), only_calls) == {0: [H, N], 2: [X, N]}


def test_success_action_quotes_what_a_successful_sibling_did_instead():
    """Each failing verdict carries the better action a success took there (compact_quotes renders it):
    a substituted call gets the success's call, a failed reply the success's reply, an omission the omitted
    call; a success's decisive write quotes itself; matched steps carry nothing."""
    lookup = call("get_flight_status", flight_number="HAT185", date="2024-05-15")
    wrong = call("get_flight_status", flight_number="HAT158", date="2024-05-15")
    good_reply = "Flight HAT185 on 2024-05-15 is on time."
    trajs = [make_trajectory("g", 0, 1.0, [[lookup], good_reply]),
             make_trajectory("g", 1, 0.0, [[lookup], "###STOP###"]),
             make_trajectory("g", 2, 0.0, [[wrong], "Flight HAT158 on 2024-05-15 is delayed."]),
             make_trajectory("g", 3, 0.0, ["Flight HAT185 is on time."])]
    group = group_siblings(trajs, 1.0)[0]
    ref = ContrastAnnotator().reference(group)
    actions = {t.sample_index: ref.actions(t.sample_index, t.num_steps) for t in group.trajectories}
    assert actions[1] == ["", good_reply]  # same call, the reply failed: the success's reply
    assert actions[2][0].startswith("get_flight_status(") and "HAT185" in actions[2][0]  # the success's call
    assert "HAT185" in actions[3][0] and actions[3][0].startswith("get_flight_status(")  # omitted lookup
    assert actions[0] == ["", good_reply]  # the success's deciding reply quotes itself
    cancel = cancel_group()
    cref = ContrastAnnotator().reference(cancel)
    assert "ABC123" in cref.actions(0, 3)[1] and cref.actions(0, 3)[0] == ""  # decisive write; shared read
    assert "ABC123" in cref.actions(1, 2)[1]  # the wrong cancel: the success's cancel instead
