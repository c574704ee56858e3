"""GeminiAnnotator with the real google-genai client against a local Gemini-compatible server.

Every failure mode must end in a valid reference or an explicit, counted ``None`` — never an
exception into the trainer — and the API key must never leak.
"""

import dataclasses
import json
import logging
import time

import pytest

from fake_gemini_server import Action, FakeGeminiServer, empty_candidates, error, hang, reply
from helpers.credit_fixtures import cancel_group, valid_reference_json
from sgcd_jax.credit.annotator import AnnotatorStats, FallbackAnnotator
from sgcd_jax.credit.async_queue import AsyncAnnotationQueue
from sgcd_jax.credit.cache import CachingAnnotator
from sgcd_jax.credit.contrast import ContrastAnnotator
from sgcd_jax.credit.gemini import GeminiAnnotator, GeminiConfig
from sgcd_jax.credit.schema import Verdict

SECRET = "AIzaTEST-sgcd-secret-9f8e7d6c5b4a"
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def server():
    with FakeGeminiServer() as srv:
        yield srv


@pytest.fixture
def make_annotator(server, monkeypatch):
    monkeypatch.setenv("SGCD_TEST_GEMINI_KEY", SECRET)
    made = []

    def make(**overrides):
        cfg = dict(model="gemini-test", api_key_env="SGCD_TEST_GEMINI_KEY", base_url=server.base_url,
                   timeout_s=2.0, max_attempts=3, initial_backoff_s=0.02, max_backoff_s=0.1,
                   backoff_jitter_s=0.02, price_input_per_mtok=1.0, price_output_per_mtok=4.0)
        cfg.update(overrides)
        annotator = GeminiAnnotator(GeminiConfig(**cfg))
        made.append(annotator)
        return annotator

    yield make
    for annotator in made:
        annotator.close()


def test_good_reply_gives_reference_usage_and_cost(server, make_annotator):
    group = cancel_group()
    server.push(reply(valid_reference_json(group), prompt_tokens=1500, output_tokens=250))
    result = make_annotator().annotate(group)
    assert result.reason == "ok" and result.reference is not None
    assert result.reference.verdicts(1, 3)[1] == Verdict.FATAL
    assert result.usage.calls == 1
    assert (result.usage.prompt_tokens, result.usage.output_tokens) == (1500, 250)
    assert result.usage.cost_usd == pytest.approx((1500 * 1.0 + 250 * 4.0) / 1e6)
    (request,) = server.requests
    assert request["path"] == "/v1beta/models/gemini-test:generateContent"
    gen = request["body"]["generationConfig"]
    assert gen["temperature"] == 0 and gen["responseMimeType"] == "application/json"
    enum = gen["responseSchema"]["properties"]["siblings"]["items"]["properties"]["steps"]["items"][
        "properties"]["verdict"]["enum"]
    assert set(enum) == {v.value for v in Verdict}
    assert request["headers"].get("x-goog-api-key") == SECRET  # the key was really used
    prompt = request["body"]["contents"][0]["parts"][0]["text"]
    assert "cancel_reservation" in prompt and "sample_index=3: FAILURE" in prompt


def test_429_is_retried_then_succeeds(server, make_annotator):
    group = cancel_group()
    server.push(error(429), reply(valid_reference_json(group)))
    result = make_annotator().annotate(group)
    assert result.reference is not None and result.reason == "ok"
    assert len(server.requests) == 2


def test_persistent_500_gives_counted_none_then_fallback(server, make_annotator):
    group = cancel_group()
    server.default = error(500)
    gemini = make_annotator(max_attempts=3)
    result = gemini.annotate(group)
    assert result.reference is None and result.reason == "http_500"
    assert len(server.requests) == 3  # attempts include the first request
    with_fallback = FallbackAnnotator(gemini, ContrastAnnotator()).annotate(group)
    assert with_fallback.reference is not None
    assert with_fallback.reason == "fallback:http_500" and with_fallback.source == "contrast"


def test_4xx_other_than_429_is_not_retried(server, make_annotator):
    server.push(error(400))
    result = make_annotator().annotate(cancel_group())
    assert (result.reference, result.reason, len(server.requests)) == (None, "http_400", 1)


def test_hang_past_timeout_is_bounded(server, make_annotator):
    server.default = hang(8.0)
    start = time.monotonic()
    result = make_annotator(timeout_s=0.3, max_attempts=2).annotate(cancel_group())
    elapsed = time.monotonic() - start
    assert result.reference is None and result.reason == "timeout"
    assert len(server.requests) == 2 and elapsed < 4.0


def test_malformed_json_is_reasked_once_then_rejected(server, make_annotator):
    server.push(reply("{not json"), reply("still { not json"))
    result = make_annotator().annotate(cancel_group())
    assert result.reference is None and result.reason == "invalid_json"
    assert len(server.requests) == 2 and result.usage.calls == 2
    reask = server.requests[1]["body"]["contents"]
    assert [c["role"] for c in reask] == ["user", "model", "user"]
    assert "invalid_json" in reask[2]["parts"][0]["text"]


def test_malformed_then_valid_reply_recovers_on_reask(server, make_annotator):
    group = cancel_group()
    server.push(reply("oops"), reply(valid_reference_json(group)))
    result = make_annotator().annotate(group)
    assert result.reference is not None and len(server.requests) == 2


def test_schema_invalid_reply_is_rejected(server, make_annotator):
    bad = json.dumps({"summary": "x", "siblings": [{"sample_index": 0, "steps": [
        {"step": 0, "verdict": "excellent", "reason": "?"}]}]})
    server.push(reply(bad), reply(json.dumps({"siblings": []})))
    result = make_annotator().annotate(cancel_group())
    assert result.reference is None and result.reason == "schema_invalid"


def test_schema_invalid_without_reask_makes_one_call(server, make_annotator):
    server.push(reply(json.dumps({"summary": "only a summary"})))
    result = make_annotator(reask_on_invalid=False).annotate(cancel_group())
    assert (result.reference, result.reason, len(server.requests)) == (None, "schema_invalid", 1)


def test_repairable_reply_is_fixed_deterministically(server, make_annotator):
    group = cancel_group()
    payload = json.loads(valid_reference_json(group))
    payload["siblings"][0]["steps"][1]["verdict"] = "Crucial"  # synonym of decisive
    del payload["siblings"][3]  # a whole sibling missing: filled with neutral steps
    server.push(reply("```json\n" + json.dumps(payload) + "\n```"))
    result = make_annotator().annotate(group)
    assert result.reason == "repaired" and len(server.requests) == 1
    assert result.reference.verdicts(0, 3)[1] == Verdict.DECISIVE
    assert result.reference.verdicts(3, 2) == [Verdict.NEUTRAL, Verdict.NEUTRAL]


def test_empty_candidates_is_counted_none(server, make_annotator):
    server.push(empty_candidates())
    result = make_annotator().annotate(cancel_group())
    assert result.reference is None and result.reason == "empty_candidates"
    assert result.usage.prompt_tokens == 1000  # still billed


def test_non_mixed_group_makes_no_call(server, make_annotator):
    group = cancel_group()
    group.successes = [True] * 4
    result = make_annotator().annotate(group)
    assert (result.reference, result.reason, len(server.requests)) == (None, "not_mixed", 0)


def test_async_queue_bounds_concurrency_and_overlaps(server, make_annotator):
    groups = [cancel_group(f"g{i}") for i in range(4)]
    server.default = reply(valid_reference_json(groups[0]), delay_s=0.3)
    stats = AnnotatorStats()
    with AsyncAnnotationQueue(make_annotator(max_concurrency=2), max_workers=4, stats=stats) as queue:
        start = time.monotonic()
        queue.submit(groups)
        submit_s = time.monotonic() - start
        results = queue.collect(timeout_s=20)
    assert submit_s < 0.2  # submit does not wait for the network
    assert all(r.reference is not None for r in results.values()) and len(results) == 4
    assert server.max_in_flight == 2
    metrics = stats.as_metrics()
    assert metrics["annotator/with_reference"] == 4 and metrics["annotator/calls"] == 4


def test_async_queue_deadline_gives_queue_timeout(server, make_annotator):
    server.push(reply("{}", delay_s=0.8))
    annotator = make_annotator(timeout_s=5.0, max_attempts=1, reask_on_invalid=False)
    with AsyncAnnotationQueue(annotator, max_workers=1) as queue:
        queue.submit([cancel_group()])
        (result,) = queue.collect(timeout_s=0.2).values()
    assert result.reference is None and result.reason == "queue_timeout"


def test_api_key_never_leaks(server, make_annotator, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    group = cancel_group()
    server.push(error(429), reply(valid_reference_json(group)), error(500), error(500), error(500),
                hang(8.0), hang(8.0), reply("{bad"), reply("{bad"), empty_candidates(),
                Action("raw", status=500, text=f"<html>{'x' * 50}</html>"))
    gemini = make_annotator(timeout_s=0.3, max_attempts=3)
    cached = CachingAnnotator(gemini, tmp_path / "cache")
    results = [cached.annotate(group)]
    results += [gemini.annotate(group) for _ in range(5)]
    assert results[0].reference is not None
    config_path = tmp_path / "run_config.json"
    config_path.write_text(json.dumps(dataclasses.asdict(gemini.config), default=str))
    written = "".join(p.read_text() for p in tmp_path.rglob("*") if p.is_file())
    assert (tmp_path / "cache").exists() and "summary" in written
    texts = [caplog.text, written, repr(gemini.config), gemini.identity(),
             *(r.reason for r in results)]
    assert all(SECRET not in text for text in texts)
    assert len(caplog.records) > 5  # the failures were logged (by us, google-genai, httpx)
    assert all(r["headers"].get("x-goog-api-key") == SECRET for r in server.requests)


def test_missing_key_or_vertex_project_is_a_clear_config_error(monkeypatch):
    monkeypatch.delenv("SGCD_TEST_MISSING_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    with pytest.raises(ValueError, match="SGCD_TEST_MISSING_KEY"):
        GeminiAnnotator(GeminiConfig(api_key_env="SGCD_TEST_MISSING_KEY"))
    with pytest.raises(ValueError, match="GOOGLE_CLOUD_PROJECT"):
        GeminiAnnotator(GeminiConfig(vertexai=True))
