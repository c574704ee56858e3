"""End to end on the host side: rollouts → sibling selection → async Gemini annotation (local
server, one group failing) → teacher batch. A group without a reference becomes plain GRPO
(teacher == student, counted); nothing raises."""

import numpy as np
import pytest

from fake_gemini_server import FakeGeminiServer, error, reply
from helpers.credit_fixtures import TOOLS, cancel_group, make_trajectory, render_prompt_ids, valid_reference_json
from sgcd_jax.credit import (AnnotatorStats, AsyncAnnotationQueue, SelectionConfig, build_teacher_batch,
                             select_groups)
from sgcd_jax.credit.gemini import GeminiAnnotator, GeminiConfig

pytestmark = pytest.mark.timeout(60)


def test_failed_annotation_degrades_to_counted_plain_grpo(monkeypatch):
    monkeypatch.setenv("SGCD_TEST_GEMINI_KEY", "AIza-pipeline-test")
    rollouts = (cancel_group("g0").trajectories + cancel_group("g1").trajectories
                + [make_trajectory("g2", i, 0.0, [[]]) for i in range(2)])
    selection = select_groups(rollouts, SelectionConfig(non_mixed="grpo"))
    assert [g.group_id for g in selection.mixed] == ["g0", "g1"]
    assert [g.group_id for g in selection.grpo] == ["g2"]
    with FakeGeminiServer(default=error(500)) as server:
        server.push(reply(valid_reference_json(selection.mixed[0])))
        gemini = GeminiAnnotator(GeminiConfig(
            model="gemini-test", api_key_env="SGCD_TEST_GEMINI_KEY", base_url=server.base_url,
            timeout_s=2.0, max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.05,
            backoff_jitter_s=0.01))
        stats = AnnotatorStats()
        with AsyncAnnotationQueue(gemini, max_workers=1, stats=stats) as queue:
            queue.submit(selection.mixed)  # one worker: g0 gets the good reply, g1 the 500s
            results = queue.collect(timeout_s=30)
        gemini.close()
    assert results["g0"].reference is not None and results["g1"].reference is None
    metrics = stats.as_metrics()
    assert metrics["annotator/no_reference"] == 1 and metrics["annotator/reason/http_500"] == 1
    references = {gid: r.reference for gid, r in results.items()}
    batch = [t for g in selection.mixed + selection.grpo for t in g.trajectories]
    rows = build_teacher_batch(batch, references, render_prompt_ids, TOOLS)
    assert [r.has_context for r in rows] == [True] * 4 + [False] * 6
    for traj, row in zip(batch, rows):
        np.testing.assert_array_equal(row.token_ids[row.teacher_prompt_len:], traj.response_ids)
