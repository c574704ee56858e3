"""Sibling credit: selection, annotators (contrast | Gemini | cache/replay), prompt + schema,
async queue, teacher context. ``GeminiAnnotator`` lives in ``sgcd_jax.credit.gemini`` (imports
google-genai)."""

from sgcd_jax.credit.annotator import (AnnotationResult, Annotator, AnnotatorStats,
                                       FallbackAnnotator, Usage)
from sgcd_jax.credit.async_queue import AsyncAnnotationQueue
from sgcd_jax.credit.cache import CachingAnnotator, ReferenceCache, ReplayAnnotator, cache_key
from sgcd_jax.credit.contrast import ContrastAnnotator, ContrastConfig
from sgcd_jax.credit.factory import AnnotatorConfig, build_annotator
from sgcd_jax.credit.prompt import PROMPT_VERSION, PromptConfig, render_annotation_prompt
from sgcd_jax.credit.schema import CreditReference, SiblingCredit, StepCredit, Verdict, validate_reply
from sgcd_jax.credit.selection import (OversamplingConfig, OversamplingPolicy, SelectionConfig,
                                       SelectionResult, SiblingGroup, select_groups)
from sgcd_jax.credit.teacher import (TeacherInputs, build_sdpo_teacher_batch, build_teacher_batch,
                                     build_teacher_inputs, pad_teacher_batch, render_credit_text)

__all__ = [
    "AnnotationResult", "Annotator", "AnnotatorStats", "FallbackAnnotator", "Usage",
    "AsyncAnnotationQueue", "CachingAnnotator", "ReferenceCache", "ReplayAnnotator", "cache_key",
    "ContrastAnnotator", "ContrastConfig", "AnnotatorConfig", "build_annotator", "PROMPT_VERSION",
    "PromptConfig", "render_annotation_prompt", "CreditReference", "SiblingCredit", "StepCredit",
    "Verdict", "validate_reply", "OversamplingConfig", "OversamplingPolicy", "SelectionConfig",
    "SelectionResult", "SiblingGroup", "select_groups", "TeacherInputs", "build_sdpo_teacher_batch",
    "build_teacher_batch", "build_teacher_inputs", "pad_teacher_batch", "render_credit_text",
]
