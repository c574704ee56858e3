"""Build the configured annotator stack: base (contrast | gemini | replay) → fallback → cache."""

from __future__ import annotations

import dataclasses
from typing import Literal

from sgcd_jax.credit.annotator import Annotator, FallbackAnnotator
from sgcd_jax.credit.cache import CachingAnnotator, ReplayAnnotator
from sgcd_jax.credit.contrast import ContrastAnnotator, ContrastConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class AnnotatorConfig:
    """``kind='contrast'`` is the offline default. ``fallback='contrast'`` answers with the
    contrast reference when Gemini gives none (``'none'``: plain GRPO for that group).
    ``cache_dir`` enables the content-addressed cache; ``kind='replay'`` serves only from it and
    needs ``replay_identity`` (the ``identity()`` of the annotator that filled it)."""

    kind: Literal["contrast", "gemini", "replay"] = "contrast"
    fallback: Literal["contrast", "none"] = "contrast"
    cache_dir: str | None = None
    replay_identity: str | None = None
    contrast: ContrastConfig = ContrastConfig()
    gemini: "object | None" = None  # a GeminiConfig; typed loosely to keep google-genai lazy

    def __post_init__(self):
        if self.kind == "replay" and (self.cache_dir is None or self.replay_identity is None):
            raise ValueError("AnnotatorConfig(kind='replay') needs cache_dir and replay_identity")


def build_annotator(config: AnnotatorConfig) -> Annotator:
    if config.kind == "replay":
        return ReplayAnnotator(config.cache_dir, config.replay_identity)
    annotator: Annotator = ContrastAnnotator(config.contrast)
    if config.kind == "gemini":
        from sgcd_jax.credit.gemini import GeminiAnnotator, GeminiConfig

        gemini = GeminiAnnotator(config.gemini or GeminiConfig())
        annotator = (FallbackAnnotator(gemini, annotator) if config.fallback == "contrast"
                     else gemini)
    if config.cache_dir is not None:
        annotator = CachingAnnotator(annotator, config.cache_dir)
    return annotator
