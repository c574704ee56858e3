"""GeminiAnnotator: credit references from Gemini through the google-genai client.

Structured output (``response_mime_type='application/json'`` + ``response_schema=CreditReference``),
temperature 0, a per-call timeout, retries with exponential backoff and jitter on 408/429/5xx and
transport timeouts (google-genai's ``HttpRetryOptions``, which drives ``tenacity``), a semaphore
bounding concurrent requests, token and cost counters. An invalid reply gets one deterministic
repair and, if still invalid, one re-ask quoting the validation error. Every failure becomes an
``AnnotationResult`` with ``reference=None`` and a named reason; the API key lives only inside the
client and is scrubbed from anything logged.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time

from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from sgcd_jax.credit.annotator import AnnotationResult, Usage, not_mixed_result
from sgcd_jax.credit.prompt import PROMPT_VERSION, PromptConfig, render_annotation_prompt
from sgcd_jax.credit.schema import CreditReference, validate_reply
from sgcd_jax.credit.selection import SiblingGroup

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = (408, 429, 500, 502, 503, 504)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GeminiConfig:
    """Holds the *name* of the API-key variable, never the key. ``base_url`` points the client at
    a proxy or a local test server. Vertex: ``vertexai=True`` with ``project``/``location`` (or
    GOOGLE_CLOUD_PROJECT / GOOGLE_CLOUD_LOCATION) and application-default credentials.
    ``api_version`` None means v1beta on AI Studio and the library default on Vertex. Prices are
    USD per million tokens (thinking tokens billed as output)."""

    model: str = "gemini-2.5-flash"
    api_key_env: str = "GEMINI_API_KEY"
    base_url: str | None = None
    api_version: str | None = None
    vertexai: bool = False
    project: str | None = None
    location: str | None = None
    timeout_s: float = 60.0
    max_attempts: int = 4  # including the first request
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    backoff_jitter_s: float = 1.0
    max_concurrency: int = 8
    max_output_tokens: int = 8192
    thinking_budget: int | None = None
    reask_on_invalid: bool = True
    price_input_per_mtok: float = 0.30
    price_output_per_mtok: float = 2.50
    prompt: PromptConfig = PromptConfig()

    @property
    def resolved_api_version(self) -> str | None:
        # google-genai 3.x defaults AI Studio to v1; structured output is documented on v1beta.
        return self.api_version or (None if self.vertexai else "v1beta")

    def __post_init__(self):
        if self.timeout_s <= 0 or self.max_attempts < 1 or self.max_concurrency < 1:
            raise ValueError("GeminiConfig needs timeout_s > 0, max_attempts ≥ 1, max_concurrency ≥ 1")


def _client_from_config(config: GeminiConfig) -> tuple[genai.Client, str | None]:
    http_options = types.HttpOptions(
        base_url=config.base_url, api_version=config.resolved_api_version,
        timeout=max(1, int(config.timeout_s * 1000)),  # milliseconds
        retry_options=types.HttpRetryOptions(
            attempts=config.max_attempts, initial_delay=config.initial_backoff_s,
            max_delay=config.max_backoff_s, exp_base=2.0, jitter=config.backoff_jitter_s,
            http_status_codes=list(RETRYABLE_STATUS)))
    if config.vertexai:
        project = config.project or os.environ.get("GOOGLE_CLOUD_PROJECT")
        location = config.location or os.environ.get("GOOGLE_CLOUD_LOCATION", "us-central1")
        if not project:
            raise ValueError("GeminiConfig.vertexai=True needs GeminiConfig.project or the "
                             "GOOGLE_CLOUD_PROJECT environment variable")
        return genai.Client(vertexai=True, project=project, location=location,
                            http_options=http_options), None
    api_key = os.environ.get(config.api_key_env, "")
    if not api_key:
        raise ValueError(f"GeminiAnnotator needs an API key in the environment variable "
                         f"{config.api_key_env} (or set GeminiConfig.vertexai=True); "
                         "keys are never read from config files")
    return genai.Client(api_key=api_key, http_options=http_options), api_key


class GeminiAnnotator:
    name = "gemini"

    def __init__(self, config: GeminiConfig, client: genai.Client | None = None):
        self.config = config
        if client is None:
            self._client, secret = _client_from_config(config)
        else:
            self._client, secret = client, None
        self._secrets = [s for s in (secret,) if s]
        self._slots = threading.BoundedSemaphore(config.max_concurrency)

    def identity(self) -> str:
        return f"gemini:{self.config.model}:{PROMPT_VERSION}:t0:reask={self.config.reask_on_invalid}"

    def close(self) -> None:
        self._client.close()

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _generation_config(self) -> types.GenerateContentConfig:
        thinking = (types.ThinkingConfig(thinking_budget=self.config.thinking_budget)
                    if self.config.thinking_budget is not None else None)
        return types.GenerateContentConfig(
            temperature=0.0, response_mime_type="application/json",
            response_schema=CreditReference, max_output_tokens=self.config.max_output_tokens,
            thinking_config=thinking)

    def _usage_of(self, response: types.GenerateContentResponse) -> Usage:
        meta = response.usage_metadata
        prompt = (meta.prompt_token_count or 0) if meta else 0
        output = ((meta.candidates_token_count or 0) + (meta.thoughts_token_count or 0)) if meta else 0
        cost = (prompt * self.config.price_input_per_mtok
                + output * self.config.price_output_per_mtok) / 1e6
        return Usage(calls=1, prompt_tokens=prompt, output_tokens=output, cost_usd=cost)

    def _call(self, contents: list[types.Content], usage: Usage) -> tuple[str | None, str]:
        """One logical request (the client retries inside). Returns (reply text, failure reason)."""
        try:
            with self._slots:
                response = self._client.models.generate_content(
                    model=self.config.model, contents=contents, config=self._generation_config())
        except genai_errors.APIError as err:
            usage.calls += 1
            return None, f"http_{err.code}"
        except Exception as err:  # transport errors must not reach the trainer
            usage.calls += 1
            name = type(err).__name__
            timeout = "timeout" in name.lower() or isinstance(err, TimeoutError)
            return None, "timeout" if timeout else f"error:{name}"
        usage.add(self._usage_of(response))
        if not response.candidates:
            feedback = response.prompt_feedback
            block = feedback.block_reason if feedback and feedback.block_reason else None
            return None, f"blocked:{block}" if block else "empty_candidates"
        text = "".join(part.text for part in (response.candidates[0].content.parts or [])
                       if part.text and not part.thought) if response.candidates[0].content else ""
        if not text:
            finish = response.candidates[0].finish_reason
            return None, f"empty_reply:{finish}" if finish else "empty_reply"
        return text, ""

    def annotate(self, group: SiblingGroup) -> AnnotationResult:
        start = time.monotonic()
        if not group.is_mixed:
            return not_mixed_result(group, self.name)
        usage = Usage()
        try:
            reference, reason = self._annotate(group, usage)
        except Exception as err:  # a bug here must still not stop training
            reference, reason = None, f"error:{type(err).__name__}"
            logger.warning("gemini annotation of group %s crashed: %s", group.group_id,
                           self.scrub(repr(err)))
        if reference is None:
            logger.warning("gemini gave no credit reference for group %s: %s", group.group_id, reason)
        return AnnotationResult(group.group_id, reference, reason, usage,
                                time.monotonic() - start, self.name)

    def _annotate(self, group: SiblingGroup, usage: Usage) -> tuple[CreditReference | None, str]:
        prompt = render_annotation_prompt(group, self.config.prompt)
        if prompt.over_budget:
            logger.warning("annotation prompt for group %s is %d tokens (over budget %d) even "
                           "with observations removed; sending it anyway", group.group_id,
                           prompt.estimated_tokens, self.config.prompt.max_prompt_tokens)
        contents = [types.Content(role="user", parts=[types.Part(text=prompt.text)])]
        text, failure = self._call(contents, usage)
        if text is None:
            return None, failure
        outcome = validate_reply(text, group)
        if outcome.reference is not None or not self.config.reask_on_invalid:
            return outcome.reference, outcome.reason
        logger.info("group %s: reply %s (%s); re-asking once", group.group_id, outcome.reason,
                    outcome.detail)
        contents += [types.Content(role="model", parts=[types.Part(text=text[:20_000])]),
                     types.Content(role="user", parts=[types.Part(text=(
                         f"Your reply was rejected: {outcome.reason}: {outcome.detail}. Reply "
                         "again with one JSON object that matches the schema, nothing else."))])]
        text, failure = self._call(contents, usage)
        if text is None:
            return None, failure
        second = validate_reply(text, group)
        return second.reference, second.reason
