"""The credit reference: a validated, stepwise judgement of a sibling group.

Per sibling (``sample_index``) and per step (assistant turn index) a verdict and a short reason,
plus a task-level summary of what separates success from failure. The same pydantic models are
the Gemini ``response_schema`` and the validator; ``validate_reply`` applies one deterministic
repair pass (fenced/embedded JSON, verdict synonyms, missing/out-of-range steps) and otherwise
rejects with a named reason.
"""

from __future__ import annotations

import enum
import json
import re
from typing import Any

import pydantic
from pydantic import BaseModel, Field

from sgcd_jax.credit.selection import SiblingGroup

MAX_REASON_CHARS = 300
MAX_ACTION_CHARS = 200
MAX_SUMMARY_CHARS = 1200


class Verdict(str, enum.Enum):
    DECISIVE = "decisive"  # the step that made the task succeed
    HELPFUL = "helpful"  # needed groundwork, shared with successes
    NEUTRAL = "neutral"  # no effect on what the verifier checks
    HARMFUL = "harmful"  # a wrong lookup/argument/claim that moved toward failure
    FATAL = "fatal"  # an irreversible wrong write / the step that sealed the failure


# Ordered by how much a step tells the teacher; used to pick one verdict for a multi-call step.
VERDICT_PRIORITY = {Verdict.FATAL: 4, Verdict.HARMFUL: 3, Verdict.DECISIVE: 2, Verdict.HELPFUL: 1,
                    Verdict.NEUTRAL: 0}

_VERDICT_SYNONYMS = {"critical": "fatal", "catastrophic": "fatal", "bad": "harmful",
                     "wrong": "harmful", "negative": "harmful", "good": "helpful",
                     "positive": "helpful", "useful": "helpful", "key": "decisive",
                     "crucial": "decisive", "irrelevant": "neutral", "none": "neutral"}


class StepCredit(BaseModel):
    step: int = Field(ge=0, description="assistant turn index, starting at 0")
    verdict: Verdict
    reason: str = Field(description="one sentence tied to what the verifier checks")
    success_action: str = Field(default="", description=(
        "what a successful sibling did at this point (its tool call or reply, verbatim and short); "
        "empty when it did nothing different"))


class SiblingCredit(BaseModel):
    sample_index: int = Field(ge=0)
    steps: list[StepCredit]


class CreditReference(BaseModel):
    """What the annotator returns. ``summary``: what separates success from failure."""

    summary: str
    siblings: list[SiblingCredit]

    def for_sibling(self, sample_index: int) -> SiblingCredit | None:
        return next((s for s in self.siblings if s.sample_index == sample_index), None)

    def _per_step(self, sample_index: int, num_steps: int, field: str, default: Any) -> list[Any]:
        out = [default] * num_steps
        sib = self.for_sibling(sample_index)
        for step in sib.steps if sib else []:
            if step.step < num_steps:
                out[step.step] = getattr(step, field)
        return out

    def verdicts(self, sample_index: int, num_steps: int) -> list[Verdict]:
        """Per-step verdicts of one sibling (neutral where unannotated)."""
        return self._per_step(sample_index, num_steps, "verdict", Verdict.NEUTRAL)

    def actions(self, sample_index: int, num_steps: int) -> list[str]:
        """Per-step ``success_action`` of one sibling ("" where unannotated or empty)."""
        return self._per_step(sample_index, num_steps, "success_action", "")

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


class ValidationOutcome(BaseModel):
    reference: CreditReference | None
    reason: str  # "ok" | "repaired" | "invalid_json" | "schema_invalid" | "empty_reply"
    repairs: list[str] = []
    detail: str = ""  # the validator message, for a re-ask


def _extract_json_text(text: str) -> str | None:
    """The JSON object in ``text``: as is, inside a ```json fence, or first '{' to last '}'."""
    stripped = text.strip()
    fence = re.search(r"```(?:json)?\s*(\{.*\})\s*```", stripped, re.DOTALL)
    candidates = [stripped] + ([fence.group(1)] if fence else [])
    if "{" in stripped and "}" in stripped:
        candidates.append(stripped[stripped.index("{"): stripped.rindex("}") + 1])
    for candidate in candidates:
        try:
            json.loads(candidate)
            return candidate
        except ValueError:
            continue
    return None


def _repair_raw(raw: Any, repairs: list[str]) -> Any:
    """Deterministic fixes on the decoded JSON before model validation."""
    if not isinstance(raw, dict):
        return raw
    for sib in raw.get("siblings") or []:
        if not isinstance(sib, dict):
            continue
        for step in sib.get("steps") or []:
            if isinstance(step, dict) and isinstance(step.get("verdict"), str):
                v = step["verdict"].strip().lower()
                v = _VERDICT_SYNONYMS.get(v, v)
                if v != step["verdict"]:
                    repairs.append(f"verdict {step['verdict']!r}->{v!r}")
                    step["verdict"] = v
    return raw


def _one_line(text: str, limit: int, repair: str, repairs: list[str]) -> str:
    """``text`` with its whitespace collapsed, cut to ``limit`` characters ending in "…" (noting ``repair``)."""
    text = " ".join(text.split())
    if len(text) > limit:
        repairs.append(repair)
        return text[: limit - 1] + "…"
    return text


def _conform_to_group(ref: CreditReference, group: SiblingGroup, repairs: list[str]) -> CreditReference | str:
    """Keep only real siblings/steps, one verdict per step, neutral for unannotated steps.
    Returns an error string when nothing usable is left."""
    num_steps = {t.sample_index: t.num_steps for t in group.trajectories}
    by_index: dict[int, dict[int, StepCredit]] = {}
    for sib in ref.siblings:
        if sib.sample_index not in num_steps:
            repairs.append(f"dropped unknown sibling {sib.sample_index}")
            continue
        if sib.sample_index in by_index:
            repairs.append(f"dropped duplicate sibling {sib.sample_index}")
            continue
        steps = by_index.setdefault(sib.sample_index, {})
        for step in sib.steps:
            if step.step >= num_steps[sib.sample_index] or step.step in steps:
                repairs.append(f"dropped step {step.step} of sibling {sib.sample_index}")
                continue
            steps[step.step] = StepCredit(
                step=step.step, verdict=step.verdict,
                reason=_one_line(step.reason, MAX_REASON_CHARS, "truncated a reason", repairs),
                success_action=_one_line(step.success_action, MAX_ACTION_CHARS, "truncated a success_action", repairs))
    annotated = sum(len(s) for s in by_index.values())
    if annotated == 0:
        return "no step of any sibling in the group was annotated"
    siblings = []
    for index, n in num_steps.items():
        steps = by_index.get(index, {})
        for missing in sorted(set(range(n)) - set(steps)):
            steps[missing] = StepCredit(step=missing, verdict=Verdict.NEUTRAL, reason="not annotated")
        if index not in by_index:
            repairs.append(f"filled missing sibling {index} with neutral steps")
        siblings.append(SiblingCredit(sample_index=index, steps=[steps[k] for k in sorted(steps)]))
    summary = _one_line(ref.summary, MAX_SUMMARY_CHARS, "truncated the summary", repairs)
    if not summary:
        return "empty summary"
    return CreditReference(summary=summary, siblings=siblings)


def validate_reply(text: str | None, group: SiblingGroup) -> ValidationOutcome:
    """Parse an annotator reply and conform it to ``group``. Never raises."""
    if text is None or not text.strip():
        return ValidationOutcome(reference=None, reason="empty_reply")
    repairs: list[str] = []
    json_text = _extract_json_text(text)
    if json_text is None:
        return ValidationOutcome(reference=None, reason="invalid_json",
                                 detail="the reply is not a JSON object")
    if json_text != text.strip():
        repairs.append("extracted JSON from surrounding text")
    raw = _repair_raw(json.loads(json_text), repairs)
    try:
        ref = CreditReference.model_validate(raw)
    except pydantic.ValidationError as err:
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()[:5])
        return ValidationOutcome(reference=None, reason="schema_invalid", detail=detail)
    conformed = _conform_to_group(ref, group, repairs)
    if isinstance(conformed, str):
        return ValidationOutcome(reference=None, reason="schema_invalid", detail=conformed)
    return ValidationOutcome(reference=conformed, reason="repaired" if repairs else "ok",
                             repairs=repairs)
