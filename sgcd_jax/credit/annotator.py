"""The annotator interface, its result type, thread-safe counters and the fallback chain.

Every annotator maps one sibling group to an ``AnnotationResult``; ``reference is None`` means
"no reference": the trainer runs plain GRPO (credit weight 1) for that group and counts ``reason``.
Annotators never raise into the training loop.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Protocol, runtime_checkable

from sgcd_jax.credit.schema import CreditReference
from sgcd_jax.credit.selection import SiblingGroup


@dataclasses.dataclass
class Usage:
    calls: int = 0  # requests this annotation issued (0 for cache hits / offline)
    prompt_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, other: "Usage") -> None:
        self.calls += other.calls
        self.prompt_tokens += other.prompt_tokens
        self.output_tokens += other.output_tokens
        self.cost_usd += other.cost_usd


@dataclasses.dataclass
class AnnotationResult:
    """``reason``: ``ok`` / ``repaired`` / ``cache_hit`` / ``fallback:<why>`` with a reference;
    otherwise why there is none (``not_mixed``, ``http_429``, ``http_500``, ``timeout``,
    ``invalid_json``, ``schema_invalid``, ``empty_candidates``, ``replay_miss``, ``error:<type>``)."""

    group_id: str
    reference: CreditReference | None
    reason: str
    usage: Usage = dataclasses.field(default_factory=Usage)
    latency_s: float = 0.0
    source: str = ""  # which annotator produced the reference
    # identity() of the annotator that produced the reference when it is not the one asked (a
    # fallback's): caches store the reference under that identity, never the asked annotator's.
    identity: str = ""

    @property
    def ok(self) -> bool:
        return self.reference is not None


@runtime_checkable
class Annotator(Protocol):
    name: str

    def identity(self) -> str:
        """What the output depends on besides the input (annotator kind, model, settings): part
        of the cache key."""
        ...

    def annotate(self, group: SiblingGroup) -> AnnotationResult: ...


class AnnotatorStats:
    """Thread-safe totals: results by reason, usage, latency. ``as_metrics`` for the logger."""

    def __init__(self):
        self._lock = threading.Lock()
        self.reasons: collections.Counter[str] = collections.Counter()
        self.usage = Usage()
        self.latency_s = 0.0
        self.results = 0
        self.with_reference = 0

    def record(self, result: AnnotationResult) -> None:
        with self._lock:
            self.reasons[result.reason] += 1
            self.usage.add(result.usage)
            self.latency_s += result.latency_s
            self.results += 1
            self.with_reference += result.reference is not None

    def state(self) -> dict:
        """JSON-able totals (saved in checkpoint meta, so they continue across a resume)."""
        with self._lock:
            return {"reasons": dict(self.reasons), "usage": dataclasses.asdict(self.usage),
                    "latency_s": self.latency_s, "results": self.results, "with_reference": self.with_reference}

    def load(self, state: dict) -> None:
        """Continue from ``state()`` of an earlier run ({}: from zero)."""
        with self._lock:
            self.reasons = collections.Counter({k: int(v) for k, v in state.get("reasons", {}).items()})
            self.usage = Usage(**state.get("usage", {}))
            self.latency_s = float(state.get("latency_s", 0.0))
            self.results = int(state.get("results", 0))
            self.with_reference = int(state.get("with_reference", 0))

    def as_metrics(self, prefix: str = "annotator/") -> dict[str, float]:
        with self._lock:
            out = {f"{prefix}results": float(self.results),
                   f"{prefix}with_reference": float(self.with_reference),
                   f"{prefix}no_reference": float(self.results - self.with_reference),
                   f"{prefix}calls": float(self.usage.calls),
                   f"{prefix}prompt_tokens": float(self.usage.prompt_tokens),
                   f"{prefix}output_tokens": float(self.usage.output_tokens),
                   f"{prefix}cost_usd": self.usage.cost_usd,
                   f"{prefix}mean_latency_s": self.latency_s / max(self.results, 1)}
            out.update({f"{prefix}reason/{k}": float(v) for k, v in sorted(self.reasons.items())})
            return out


def not_mixed_result(group: SiblingGroup, source: str) -> AnnotationResult:
    return AnnotationResult(group.group_id, None, "not_mixed", source=source)


class FallbackAnnotator:
    """Try ``primary``; when it gives no reference, use ``fallback`` (e.g. Gemini → contrast).
    The result's reason becomes ``fallback:<primary reason>`` and usage sums both."""

    def __init__(self, primary: Annotator, fallback: Annotator):
        self.primary, self.fallback = primary, fallback
        self.name = f"{primary.name}|{fallback.name}"

    def identity(self) -> str:
        return f"fallback({self.primary.identity()},{self.fallback.identity()})"

    def annotate(self, group: SiblingGroup) -> AnnotationResult:
        start = time.monotonic()
        first = self.primary.annotate(group)
        if first.reference is not None or first.reason == "not_mixed":
            return first
        second = self.fallback.annotate(group)
        usage = Usage()
        usage.add(first.usage)
        usage.add(second.usage)
        reason = f"fallback:{first.reason}" if second.reference is not None else first.reason
        return AnnotationResult(group.group_id, second.reference, reason, usage,
                                time.monotonic() - start, second.source or self.fallback.name,
                                identity=second.identity or self.fallback.identity())
