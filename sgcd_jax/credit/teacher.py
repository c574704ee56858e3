"""Teacher context: the same conversation, with privileged context in the prompt (training only).

The teacher scores the student's *exact* response tokens under a richer prompt::

    teacher_ids = render_prompt_ids(prompt messages + context, tools) + student_ids[prompt_len:]

so teacher position ``t + offset`` holds the student token at position ``t ≥ prompt_len``, with
``offset = teacher_prompt_len - prompt_len``. Chat rendering belongs to the models package; the
caller passes ``render_prompt_ids(messages, tools) -> list[int]``, which must reproduce
``token_ids[:prompt_len]`` for the unchanged prompt messages (checked when ``verify=True``).
SGCD's context is the credit reference; the SDPO baseline's is a successful sibling's
demonstration.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from sgcd_jax.credit.prompt import render_sibling, task_messages
from sgcd_jax.credit.schema import CreditReference
from sgcd_jax.credit.selection import SiblingGroup
from sgcd_jax.rollout.trajectory import Trajectory

RenderPromptIds = Callable[[list[dict[str, Any]], "list[dict[str, Any]] | None"], Sequence[int]]
Placement = Literal["system", "user_prefix"]

CREDIT_HEADER = "Credit reference (training only)"
DEMO_HEADER = "Successful attempt at this task (training only)"
VERDICT_CODES = {"fatal": -2, "harmful": -1, "neutral": 0, "helpful": 1, "decisive": 2}


Style = Literal["full", "compact", "compact_quotes"]
QUOTE_PREFIX = "success:"


def compact_step_line(step: int, verdict: str) -> str:
    """One step of a compact reference (a single added token of the domain tokenizer)."""
    return f"step {step} {verdict}"


def compact_reference_vocabulary(max_steps: int = 16) -> list[str]:
    """Every line a compact reference can contain for ``max_steps`` steps: the domain tokenizer makes
    each one token, so a reference costs one token per step plus the header."""
    return [f"## {CREDIT_HEADER}"] + [compact_step_line(k, v) for k in range(max_steps) for v in VERDICT_CODES]


def render_credit_text(reference: CreditReference, traj: Trajectory, *,
                       scope: Literal["own", "all"] = "own", style: Style = "full") -> str:
    """The reference as the policy reads it: the summary, then per-step verdicts of this
    trajectory (``scope='own'``) or of every sibling (``'all'``). ``style='compact'``: only this
    trajectory's ``step k verdict`` lines, a format a small model can be taught to read in its SFT
    warm-up (``sft.reference_rate``) — the full text is ~400 tokens of prose it has never seen.
    ``style='compact_quotes'``: the same lines, each followed by ``success: <action>`` where the step
    carries a successful sibling's action (``StepCredit.success_action``): content a sibling knew and this
    trajectory may not, which the teacher can only use if it reads the reference."""
    if style in ("compact", "compact_quotes"):
        verdicts = reference.verdicts(traj.sample_index, traj.num_steps)
        quotes = reference.actions(traj.sample_index, traj.num_steps) if style == "compact_quotes" else None
        lines = [f"## {CREDIT_HEADER}"]
        for k, v in enumerate(verdicts):
            lines.append(compact_step_line(k, v.value))
            if quotes and quotes[k]:
                lines.append(f"{QUOTE_PREFIX} {quotes[k]}")
        return "\n".join(lines)
    if style != "full":
        raise ValueError(f"unknown reference style {style!r}: use 'full', 'compact' or 'compact_quotes'")
    lines = [f"## {CREDIT_HEADER}", f"What separates success from failure: {reference.summary}"]
    siblings = reference.siblings if scope == "all" else [
        s for s in reference.siblings if s.sample_index == traj.sample_index]
    for sib in siblings:
        title = "Your attempt" if sib.sample_index == traj.sample_index else f"Attempt {sib.sample_index}"
        lines.append(f"{title}, step by step:")
        lines.extend(f"- step {s.step}: {s.verdict.value} — {s.reason}" for s in sib.steps)
    return "\n".join(lines)


def verdict_token_codes(reference: CreditReference | None, traj: Trajectory) -> np.ndarray:
    """[T] int8 per-token verdict code of the step that generated the token (-2 fatal … 2
    decisive; 0 on non-generated tokens or without a reference): for reports and heatmaps."""
    codes = np.zeros(len(traj.token_ids), np.int8)
    if reference is None:
        return codes
    per_step = np.array([VERDICT_CODES[v.value] for v in reference.verdicts(traj.sample_index,
                                                                            traj.num_steps)]
                        + [0], np.int8)  # the extra 0 serves step_id -1 and unknown steps
    step_ids = np.where((traj.step_ids >= 0) & (traj.step_ids < traj.num_steps), traj.step_ids, -1)
    return per_step[step_ids]


def render_demonstration_text(demo: Trajectory, *, max_observation_chars: int = 400,
                              max_assistant_text_chars: int = 600) -> str:
    body = render_sibling(demo, True, max_observation_chars, max_assistant_text_chars, 0)
    body = body.split("\n", 1)[1] if "\n" in body else ""  # drop the grader-facing title line
    lines = [line for line in body.splitlines() if not line.startswith("Verifier report:")]
    return f"## {DEMO_HEADER}\n" + "\n".join(lines)


def messages_with_context(messages: list[dict[str, Any]], context: str,
                          placement: Placement = "system") -> list[dict[str, Any]]:
    """Copy of the prompt messages with ``context`` appended to the system message (inserting
    one if absent) or prepended to the first user message. Neither adds a turn, so chat
    templates that require strict role alternation still render."""
    out = copy.deepcopy(messages)
    if placement == "system":
        if out and out[0].get("role") == "system":
            out[0]["content"] = f"{out[0].get('content', '')}\n\n{context}"
        else:
            out.insert(0, {"role": "system", "content": context})
        return out
    if placement == "user_prefix":
        for msg in out:
            if msg.get("role") == "user":
                msg["content"] = f"{context}\n\n{msg.get('content', '')}"
                return out
        raise ValueError("placement='user_prefix' needs a user message in the prompt")
    raise ValueError(f"unknown placement {placement!r}: use 'system' or 'user_prefix'")


@dataclasses.dataclass
class TeacherInputs:
    """One teacher row. ``token_ids[teacher_prompt_len:] == student token_ids[prompt_len:]``."""

    token_ids: np.ndarray  # [T_teacher] int32
    loss_mask: np.ndarray  # [T_teacher] int32, student loss_mask shifted by offset
    step_ids: np.ndarray  # [T_teacher] int32, student step_ids shifted, -1 on the prompt
    teacher_prompt_len: int
    student_prompt_len: int
    has_context: bool  # False: no reference for this group — teacher == student (plain GRPO)

    @property
    def offset(self) -> int:
        """teacher index = student index + offset, for student indices ≥ student_prompt_len."""
        return self.teacher_prompt_len - self.student_prompt_len


def build_teacher_inputs(traj: Trajectory, context: str | None, render_prompt_ids: RenderPromptIds,
                         tools: list[dict[str, Any]] | None = None, *,
                         placement: Placement = "system", verify: bool = True) -> TeacherInputs:
    response = traj.token_ids[traj.prompt_len:]
    if context is None:
        prompt_ids = np.asarray(traj.token_ids[: traj.prompt_len], dtype=np.int32)
    else:
        prompt_messages = task_messages(traj)
        if verify:
            student_prompt = list(render_prompt_ids(prompt_messages, tools))
            if student_prompt != traj.token_ids[: traj.prompt_len].tolist():
                raise ValueError(
                    f"render_prompt_ids does not reproduce trajectory {traj.group_id}/"
                    f"{traj.sample_index}'s prompt ({len(student_prompt)} vs {traj.prompt_len} "
                    "tokens): pass the same renderer (chat template, tools, generation prompt) "
                    "the rollout used")
        prompt_ids = np.asarray(render_prompt_ids(messages_with_context(prompt_messages, context,
                                                                        placement), tools),
                                dtype=np.int32)
    pad = np.zeros(len(prompt_ids), np.int32)
    return TeacherInputs(
        token_ids=np.concatenate([prompt_ids, np.asarray(response, np.int32)]),
        loss_mask=np.concatenate([pad, np.asarray(traj.loss_mask[traj.prompt_len:], np.int32)]),
        step_ids=np.concatenate([pad - 1, np.asarray(traj.step_ids[traj.prompt_len:], np.int32)]),
        teacher_prompt_len=len(prompt_ids), student_prompt_len=traj.prompt_len,
        has_context=context is not None)


def build_teacher_batch(trajectories: Sequence[Trajectory],
                        references: Mapping[str, CreditReference | None],
                        render_prompt_ids: RenderPromptIds, tools: list[dict[str, Any]] | None = None,
                        *, placement: Placement = "system", scope: Literal["own", "all"] = "own",
                        style: Style = "full", verify: bool = True) -> list[TeacherInputs]:
    """SGCD teachers: one row per trajectory; groups without a reference (missing or None in
    ``references``, keyed by group_id) get the student's own ids and ``has_context=False``."""
    rows = []
    for traj in trajectories:
        ref = references.get(traj.group_id)
        context = render_credit_text(ref, traj, scope=scope, style=style) if ref is not None else None
        rows.append(build_teacher_inputs(traj, context, render_prompt_ids, tools,
                                         placement=placement, verify=verify))
    return rows


def choose_demonstration(group: SiblingGroup, traj: Trajectory, *,
                         allow_self: bool = False) -> Trajectory | None:
    """The successful sibling an SDPO teacher sees: the lowest-index success other than ``traj``
    (``traj`` itself only when ``allow_self`` and it is the only success)."""
    others = [t for t in group.successful if t.sample_index != traj.sample_index]
    if others:
        return others[0]
    return traj if allow_self and any(t is traj for t in group.successful) else None


def build_sdpo_teacher_batch(groups: Sequence[SiblingGroup], render_prompt_ids: RenderPromptIds,
                             tools: list[dict[str, Any]] | None = None, *,
                             placement: Placement = "system", allow_self: bool = False,
                             verify: bool = True) -> list[TeacherInputs]:
    """SDPO baseline teachers, one row per trajectory in group order."""
    rows = []
    for group in groups:
        for traj in group.trajectories:
            demo = choose_demonstration(group, traj, allow_self=allow_self)
            context = render_demonstration_text(demo) if demo is not None else None
            rows.append(build_teacher_inputs(traj, context, render_prompt_ids, tools,
                                             placement=placement, verify=verify))
    return rows


def pad_teacher_batch(rows: Sequence[TeacherInputs], pad_id: int,
                      length: int | None = None) -> dict[str, np.ndarray]:
    """Right-padded arrays for the jitted score pass: ``token_ids``/``loss_mask``/``step_ids``
    [B, L]; ``offset``/``teacher_prompt_len`` [B]; ``has_context`` [B] bool. ``length``
    (static shapes: use a bucket) must cover the longest row."""
    longest = max(len(r.token_ids) for r in rows)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"pad length {length} < longest teacher row {longest}: raise the bucket")
    batch = len(rows)
    ids = np.full((batch, length), pad_id, np.int32)
    mask = np.zeros((batch, length), np.int32)
    steps = np.full((batch, length), -1, np.int32)
    for b, row in enumerate(rows):
        n = len(row.token_ids)
        ids[b, :n], mask[b, :n], steps[b, :n] = row.token_ids, row.loss_mask, row.step_ids
    return {"token_ids": ids, "loss_mask": mask, "step_ids": steps,
            "offset": np.array([r.offset for r in rows], np.int32),
            "teacher_prompt_len": np.array([r.teacher_prompt_len for r in rows], np.int32),
            "has_context": np.array([r.has_context for r in rows], bool)}
