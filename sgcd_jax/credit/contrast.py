"""ContrastAnnotator: an offline, deterministic credit reference from sibling tool-call contrast.

Each failed sibling's normalised tool-call sequence is aligned (edit distance; a same-tool
substitution costs 1, a different-tool one 2, an insertion/deletion 1) to its closest successful
sibling. Failure calls matched by the alignment (or made by some success elsewhere) are
``helpful``; calls no success made are ``harmful``, or ``fatal`` when they change state; the step
where a success's call is missing gets ``harmful`` ("omitted …"). In successful siblings, a
state-changing call made by every success and missed by some failure is ``decisive``, calls
shared with other successes or with all failures are ``helpful``, the rest ``neutral``.

A failed sibling whose calls all match its closest success (nothing ``harmful``/``fatal``) failed in
what it said: its last step is ``harmful`` with its reply beside the success's and the verifier's
reasons (``info["fail_reasons"]``, e.g. "missing info: landed"), and the successes' last steps are
``helpful`` ("the reply gave what the user asked"). Without this the step that decided such a group
(e.g. a reply that ends the chat without the answer) read "neutral".

Each verdict that points at a sibling's better action carries it as ``success_action``: a substituted
call gets the success's call, an omission the omitted call, a reply that failed the success's reply,
and a success's own decisive write or deciding reply itself (``reference_format="compact_quotes"``
renders it under the step line).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from sgcd_jax.credit.annotator import AnnotationResult, not_mixed_result
from sgcd_jax.credit.prompt import format_call
from sgcd_jax.credit.schema import (MAX_ACTION_CHARS, MAX_REASON_CHARS, VERDICT_PRIORITY, CreditReference,
                                    SiblingCredit, StepCredit, Verdict)
from sgcd_jax.credit.selection import SiblingGroup
from sgcd_jax.envs.base import ToolCall
from sgcd_jax.rollout.trajectory import Trajectory

DEFAULT_WRITE_PREFIXES = ("book", "cancel", "update", "create", "delete", "modify", "send",
                          "transfer", "add", "remove", "set", "pay", "refund", "change",
                          "exchange", "return", "post", "put", "write", "submit")


def _normalise_value(value: Any) -> Any:
    if isinstance(value, str):
        return " ".join(value.strip().lower().split())
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {str(k).strip().lower(): _normalise_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise_value(v) for v in value]
    return value


def normalise_call(call: ToolCall) -> str:
    """Canonical key of a call: lower-cased name + sorted, case/space-normalised arguments."""
    args = json.dumps(_normalise_value(call.arguments), sort_keys=True, separators=(",", ":"),
                      default=str)
    return f"{call.name.strip().lower()}{args}"


@dataclasses.dataclass(frozen=True)
class _Call:
    step: int
    key: str
    name: str
    text: str
    is_write: bool


def edit_alignment(a: list[_Call], b: list[_Call]) -> tuple[int, list[tuple[int | None, int | None]]]:
    """Minimum-cost alignment of call sequences ``a`` and ``b``: (cost, pairs) where a pair is
    (i, j) for a match/substitution, (i, None) for a call only in ``a``, (None, j) only in ``b``."""
    n, m = len(a), len(b)

    def sub_cost(i: int, j: int) -> int:
        return 0 if a[i].key == b[j].key else (1 if a[i].name == b[j].name else 2)

    dist = [[0] * (m + 1) for _ in range(n + 1)]  # [n+1, m+1]
    for i in range(1, n + 1):
        dist[i][0] = i
    for j in range(1, m + 1):
        dist[0][j] = j
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            dist[i][j] = min(dist[i - 1][j - 1] + sub_cost(i - 1, j - 1),
                             dist[i - 1][j] + 1, dist[i][j - 1] + 1)
    pairs: list[tuple[int | None, int | None]] = []
    i, j = n, m
    while i > 0 or j > 0:  # deterministic tie order: diagonal, then a-only, then b-only
        if i > 0 and j > 0 and dist[i][j] == dist[i - 1][j - 1] + sub_cost(i - 1, j - 1):
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif i > 0 and dist[i][j] == dist[i - 1][j] + 1:
            pairs.append((i - 1, None))
            i -= 1
        else:
            pairs.append((None, j - 1))
            j -= 1
    return dist[n][m], pairs[::-1]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ContrastConfig:
    """``write_tools``: names of state-changing tools; when None, a name starting with one of
    ``write_prefixes`` counts as a write (fits τ-airline: book_/cancel_/update_/send_/transfer_)."""

    write_tools: frozenset[str] | None = None
    write_prefixes: tuple[str, ...] = DEFAULT_WRITE_PREFIXES


class ContrastAnnotator:
    name = "contrast"

    def __init__(self, config: ContrastConfig = ContrastConfig()):
        self.config = config

    def identity(self) -> str:
        writes = sorted(self.config.write_tools) if self.config.write_tools is not None else None
        return f"contrast-v3:{json.dumps([writes, list(self.config.write_prefixes)])}"

    def is_write(self, tool_name: str) -> bool:
        if self.config.write_tools is not None:
            return tool_name in self.config.write_tools
        return tool_name.strip().lower().startswith(self.config.write_prefixes)

    def _calls(self, traj: Trajectory) -> list[_Call]:
        return [_Call(step.index, normalise_call(c), c.name.strip().lower(), format_call(c),
                      self.is_write(c.name))
                for step in traj.steps for c in step.tool_calls]

    def annotate(self, group: SiblingGroup) -> AnnotationResult:
        start = time.monotonic()
        if not group.is_mixed:
            return not_mixed_result(group, self.name)
        reference = self.reference(group)
        return AnnotationResult(group.group_id, reference, "ok", latency_s=time.monotonic() - start,
                                source=self.name)

    def reference(self, group: SiblingGroup) -> CreditReference:
        successes, failures = group.successful, group.failed
        calls = {t.sample_index: self._calls(t) for t in group.trajectories}
        success_keys = {t.sample_index: {c.key for c in calls[t.sample_index]} for t in successes}
        failure_keys = {t.sample_index: {c.key for c in calls[t.sample_index]} for t in failures}
        any_success_key = set().union(*success_keys.values())
        notes, marks = _SummaryNotes(), {}
        for traj in failures:
            marks[traj.sample_index] = self._mark_failure(traj, calls, successes, any_success_key, notes)
        for traj in successes:
            marks[traj.sample_index] = self._mark_success(traj, calls[traj.sample_index], success_keys,
                                                          failure_keys, notes)
        if notes.replies:  # some failure matched a success call for call: its reply decided it
            failed = [idx for idx, _, _ in notes.replies]
            for traj in successes:
                if traj.steps:
                    marks[traj.sample_index].setdefault(traj.steps[-1].index, []).append(
                        (Verdict.HELPFUL, f"the reply {_said(traj)} gave what the user asked; failed "
                                          f"siblings {failed} made the same calls and did not", reply_text(traj)))
        siblings = [SiblingCredit(sample_index=t.sample_index, steps=_steps_from_marks(t, marks[t.sample_index]))
                    for t in group.trajectories]
        return CreditReference(summary=notes.render(group), siblings=siblings)

    def _mark_success(self, traj, own_calls, success_keys, failure_keys, notes) -> dict:
        marks: dict[int, list[tuple[Verdict, str, str]]] = {}
        others = [keys for idx, keys in success_keys.items() if idx != traj.sample_index]
        for call in own_calls:
            in_all_successes = all(call.key in keys for keys in success_keys.values())
            missed_by = [idx for idx, keys in failure_keys.items() if call.key not in keys]
            action = ""
            if call.is_write and in_all_successes and missed_by:
                verdict, why = Verdict.DECISIVE, (f"state change {call.text} made by every successful "
                                                  f"sibling and missed by failed siblings {missed_by}")
                action = call.text
                notes.decisive.setdefault(call.text, None)
            elif not missed_by:
                verdict, why = Verdict.HELPFUL, f"{call.text} is groundwork every sibling did"
            elif in_all_successes or any(call.key in keys for keys in others):
                verdict, why = Verdict.HELPFUL, f"{call.text} is shared with the successful siblings"
            else:
                verdict, why = Verdict.NEUTRAL, f"{call.text} is not needed by other successes"
            marks.setdefault(call.step, []).append((verdict, why, action))
        return marks

    def _mark_failure(self, traj, calls, successes, any_success_key, notes) -> dict:
        own = calls[traj.sample_index]
        best_cost, best_pairs, best_ref = None, [], None
        for success in successes:  # closest success; ties go to the lower sample_index
            cost, pairs = edit_alignment(own, calls[success.sample_index])
            if best_cost is None or cost < best_cost:
                best_cost, best_pairs, best_ref = cost, pairs, success
        ref_calls = calls[best_ref.sample_index]
        marks: dict[int, list[tuple[Verdict, str, str]]] = {}
        pending_omissions: list[_Call] = []
        for i, j in best_pairs:
            if i is None:
                pending_omissions.append(ref_calls[j])
                continue
            call = own[i]
            if pending_omissions:  # the step that went on without the missing call
                self._omitted(marks, call.step, pending_omissions, best_ref, notes, traj)
                pending_omissions = []
            action = ""
            if j is not None and ref_calls[j].key == call.key:
                verdict, why = Verdict.HELPFUL, (f"{call.text} matches successful sibling "
                                                 f"{best_ref.sample_index}")
            elif call.key in any_success_key:
                verdict, why = Verdict.HELPFUL, f"{call.text} was also made by a successful sibling"
            else:
                instead = f" instead of {ref_calls[j].text}" if j is not None else ""
                verdict = Verdict.FATAL if call.is_write else Verdict.HARMFUL
                kind = "state change" if call.is_write else "call"
                why = f"{kind} {call.text}{instead} was made by no successful sibling"
                action = ref_calls[j].text if j is not None else ""
                notes.divergences.append((traj.sample_index, call.step, call.text, verdict))
            marks.setdefault(call.step, []).append((verdict, why, action))
        if pending_omissions and traj.steps:  # ended without the missing calls
            self._omitted(marks, traj.steps[-1].index, pending_omissions, best_ref, notes, traj)
        bad = any(v in (Verdict.HARMFUL, Verdict.FATAL) for step in marks.values() for v, _, _ in step)
        if not bad and traj.steps and not any(s.parse_error for s in traj.steps):
            verifier = "; ".join(str(r) for r in traj.info.get("fail_reasons", [])[:2])
            why = (f"made the same calls as successful sibling {best_ref.sample_index}, but the reply "
                   f"{_said(traj)} did not give what its reply {_said(best_ref)} did"
                   + (f" (verifier: {verifier})" if verifier else ""))
            marks.setdefault(traj.steps[-1].index, []).append((Verdict.HARMFUL, why, reply_text(best_ref)))
            notes.replies.append((traj.sample_index, traj.steps[-1].index, verifier))
        return marks

    def _omitted(self, marks, step, omitted, ref, notes, traj) -> None:
        shown = ", ".join(c.text for c in omitted[:2]) + (" …" if len(omitted) > 2 else "")
        verdict = Verdict.FATAL if any(c.is_write for c in omitted) and step == traj.steps[-1].index \
            else Verdict.HARMFUL
        why = f"went on without {shown} that successful sibling {ref.sample_index} made"
        marks.setdefault(step, []).append((verdict, why, omitted[0].text))
        notes.omissions.append((traj.sample_index, step, shown))


def _said(traj: Trajectory, limit: int = 80) -> str:
    """The last step's text, quoted and cut ("(no reply)" when it only called tools)."""
    last = traj.steps[-1] if traj.steps else None
    text = (last.text or "").strip() if last is not None and not last.tool_calls else ""
    if not text:
        return "(no reply)"
    return json.dumps(text if len(text) <= limit else text[:limit] + "…", ensure_ascii=False)


def reply_text(traj: Trajectory) -> str:
    """The last step's reply text in full ("" when that step called tools or said nothing)."""
    last = traj.steps[-1] if traj.steps else None
    return " ".join((last.text or "").split()) if last is not None and not last.tool_calls else ""


def _steps_from_marks(traj: Trajectory, marks: dict[int, list[tuple[Verdict, str, str]]]) -> list[StepCredit]:
    steps = []
    for step in traj.steps:
        candidates = list(marks.get(step.index, []))
        if step.parse_error:
            candidates.append((Verdict.HARMFUL, "the tool call could not be parsed", ""))
        if not candidates:
            candidates = [(Verdict.NEUTRAL, "no tool call the verifier depends on", "")]
        verdict, why, action = max(candidates, key=lambda c: VERDICT_PRIORITY[c[0]])  # first of the top
        steps.append(StepCredit(step=step.index, verdict=verdict, reason=why[:MAX_REASON_CHARS],
                                success_action=action[:MAX_ACTION_CHARS]))
    return steps


@dataclasses.dataclass
class _SummaryNotes:
    decisive: dict[str, None] = dataclasses.field(default_factory=dict)  # ordered set
    divergences: list[tuple[int, int, str, Verdict]] = dataclasses.field(default_factory=list)
    omissions: list[tuple[int, int, str]] = dataclasses.field(default_factory=list)
    replies: list[tuple[int, int, str]] = dataclasses.field(default_factory=list)  # failed in what it said

    def render(self, group: SiblingGroup) -> str:
        ok = [t.sample_index for t in group.successful]
        bad = [t.sample_index for t in group.failed]
        parts = [f"Siblings {ok} succeeded and {bad} failed."]
        if self.decisive:
            parts.append("Successes all made " + "; ".join(list(self.decisive)[:3]) + ".")
        for idx, step, text, verdict in self.divergences[:3]:
            parts.append(f"Sibling {idx} step {step}: {text} ({verdict.value}).")
        for idx, step, shown in self.omissions[:3]:
            parts.append(f"Sibling {idx} step {step} went on without {shown}.")
        for idx, step, verifier in self.replies[:3]:
            parts.append(f"Sibling {idx} made the same calls but its reply at step {step} failed"
                         + (f" ({verifier})." if verifier else "."))
        return " ".join(parts)[:1200]
