"""Teacher context: the credit reference in the prompt, the student's response tokens unchanged."""

import numpy as np
import pytest

from helpers.credit_fixtures import TOOLS, cancel_group, make_trajectory, render_prompt_ids
from sgcd_jax.credit.contrast import ContrastAnnotator
from sgcd_jax.credit.prompt import task_messages
from sgcd_jax.credit.selection import group_siblings
from sgcd_jax.credit.teacher import (CREDIT_HEADER, DEMO_HEADER, build_sdpo_teacher_batch,
                                     build_teacher_batch, messages_with_context,
                                     pad_teacher_batch, render_credit_text)


def batch_with_one_unreferenced_group():
    groups = [cancel_group("g0"), cancel_group("g1")]
    references = {"g0": ContrastAnnotator().reference(groups[0]), "g1": None}
    trajectories = [t for g in groups for t in g.trajectories]
    return groups, references, trajectories


@pytest.mark.parametrize("placement", ["system", "user_prefix"])
def test_teacher_response_ids_identical_for_every_trajectory(placement):
    groups, references, trajectories = batch_with_one_unreferenced_group()
    rows = build_teacher_batch(trajectories, references, render_prompt_ids, TOOLS, placement=placement)
    for traj, row in zip(trajectories, rows):
        np.testing.assert_array_equal(row.token_ids[row.teacher_prompt_len:],
                                      traj.token_ids[traj.prompt_len:])
        np.testing.assert_array_equal(row.loss_mask[row.teacher_prompt_len:],
                                      traj.loss_mask[traj.prompt_len:])
        assert row.loss_mask[: row.teacher_prompt_len].sum() == 0
        assert row.token_ids.dtype == np.int32 and len(row.step_ids) == len(row.token_ids)
    with_ref = [r for t, r in zip(trajectories, rows) if t.group_id == "g0"]
    without = [(t, r) for t, r in zip(trajectories, rows) if t.group_id == "g1"]
    assert all(r.has_context and r.offset > 0 for r in with_ref)
    assert all(not r.has_context and r.offset == 0 and
               r.token_ids.tolist() == t.token_ids.tolist() for t, r in without)


def test_teacher_prompt_is_the_rendered_prompt_with_this_trajectorys_credit():
    group = cancel_group()
    reference = ContrastAnnotator().reference(group)
    traj = group.trajectories[1]
    (row,) = build_teacher_batch([traj], {"g0": reference}, render_prompt_ids, TOOLS)
    text = render_credit_text(reference, traj)
    expected = render_prompt_ids(messages_with_context(task_messages(traj), text), TOOLS)
    assert row.token_ids[: row.teacher_prompt_len].tolist() == expected
    assert CREDIT_HEADER in text and "step 1: fatal" in text and "Your attempt" in text
    assert "Attempt 0" not in text and "Attempt 0" in render_credit_text(reference, traj, scope="all")


def test_context_messages_keep_roles_and_do_not_mutate_the_trajectory():
    traj = cancel_group().trajectories[0]
    original = [dict(m) for m in traj.messages]
    system = messages_with_context(task_messages(traj), "CTX", "system")
    user = messages_with_context(task_messages(traj), "CTX", "user_prefix")
    assert [m["role"] for m in system] == [m["role"] for m in user] == ["system", "user"]
    assert system[0]["content"].endswith("\n\nCTX") and user[1]["content"].startswith("CTX\n\n")
    assert traj.messages == original
    no_system = messages_with_context([{"role": "user", "content": "hi"}], "CTX", "system")
    assert no_system[0] == {"role": "system", "content": "CTX"}


def test_renderer_that_does_not_reproduce_the_prompt_is_rejected():
    group = cancel_group()
    refs = {"g0": ContrastAnnotator().reference(group)}
    other_renderer = lambda messages, tools: [0] + render_prompt_ids(messages, tools)  # noqa: E731
    with pytest.raises(ValueError, match="does not reproduce"):
        build_teacher_batch(group.trajectories, refs, other_renderer, TOOLS)


def test_padded_batch_gathers_student_tokens_through_offset():
    groups, references, trajectories = batch_with_one_unreferenced_group()
    rows = build_teacher_batch(trajectories, references, render_prompt_ids, TOOLS)
    padded = pad_teacher_batch(rows, pad_id=0, length=2048)
    assert padded["token_ids"].shape == (8, 2048)
    for b, traj in enumerate(trajectories):
        student_positions = np.arange(traj.prompt_len, len(traj.token_ids))
        gathered = padded["token_ids"][b, student_positions + padded["offset"][b]]
        np.testing.assert_array_equal(gathered, traj.token_ids[traj.prompt_len:])
    assert padded["has_context"].tolist() == [True] * 4 + [False] * 4
    with pytest.raises(ValueError, match="raise the bucket"):
        pad_teacher_batch(rows, pad_id=0, length=8)


def test_sdpo_teacher_sees_another_successful_sibling():
    group = cancel_group()
    rows = build_sdpo_teacher_batch([group], render_prompt_ids, TOOLS)
    for traj, row in zip(group.trajectories, rows):
        assert row.token_ids[row.teacher_prompt_len:].tolist() == traj.response_ids.tolist()
        assert row.has_context
    # failed sibling 1 sees success 0; success 0 sees success 2 (not itself)
    from sgcd_jax.credit.teacher import choose_demonstration, render_demonstration_text
    assert choose_demonstration(group, group.trajectories[1]).sample_index == 0
    assert choose_demonstration(group, group.trajectories[0]).sample_index == 2
    demo = render_demonstration_text(group.trajectories[0])
    assert DEMO_HEADER in demo and 'cancel_reservation({"reservation_id": "ABC123"})' in demo
    assert "SUCCESS" not in demo and "Verifier" not in demo


def test_sdpo_single_success_has_no_self_demo_unless_allowed():
    lookup = {"reservation_id": "A"}
    from helpers.credit_fixtures import call
    trajs = [make_trajectory("g", 0, 1.0, [[call("get_reservation_details", **lookup)]]),
             make_trajectory("g", 1, 0.0, [[call("get_reservation_details", reservation_id="B")]])]
    group = group_siblings(trajs, 1.0)[0]
    rows = build_sdpo_teacher_batch([group], render_prompt_ids, TOOLS)
    assert [r.has_context for r in rows] == [False, True]
    rows = build_sdpo_teacher_batch([group], render_prompt_ids, TOOLS, allow_self=True)
    assert [r.has_context for r in rows] == [True, True]


def test_verdict_token_codes_follow_step_ids():
    from sgcd_jax.credit.teacher import verdict_token_codes
    group = cancel_group()
    traj = group.trajectories[1]  # verdicts: harmful, fatal, neutral
    codes = verdict_token_codes(ContrastAnnotator().reference(group), traj)
    expected = np.select([traj.step_ids == 0, traj.step_ids == 1], [-1, -2], 0)
    np.testing.assert_array_equal(codes, expected)
    assert not verdict_token_codes(None, traj).any()
