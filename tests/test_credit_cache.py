"""Content-addressed reference cache: reuse, replay, keying and concurrent writers."""

import threading

import pytest

from helpers.credit_fixtures import cancel_group, make_trajectory
from sgcd_jax.credit.annotator import AnnotationResult
from sgcd_jax.credit.async_queue import AsyncAnnotationQueue
from sgcd_jax.credit.cache import (CachingAnnotator, ReferenceCache, ReplayAnnotator, cache_key)
from sgcd_jax.credit.contrast import ContrastAnnotator
from sgcd_jax.credit.factory import AnnotatorConfig, build_annotator


class CountingAnnotator:
    """Contrast references, counting calls (stands in for a paid external annotator)."""

    name = "counting"

    def __init__(self):
        self.calls = 0
        self._inner = ContrastAnnotator()
        self._lock = threading.Lock()

    def identity(self):
        return "counting-v1"

    def annotate(self, group):
        with self._lock:
            self.calls += 1
        return self._inner.annotate(group)


def test_second_run_makes_zero_calls_and_identical_references(tmp_path):
    groups = [cancel_group(f"g{i}") for i in range(3)]
    first_inner, second_inner = CountingAnnotator(), CountingAnnotator()
    first = [CachingAnnotator(first_inner, tmp_path).annotate(g) for g in groups]
    second_cache = CachingAnnotator(second_inner, tmp_path)  # a fresh process would look like this
    second = [second_cache.annotate(g) for g in groups]
    assert first_inner.calls == 3 and second_inner.calls == 0
    assert [r.reason for r in second] == ["cache_hit"] * 3
    assert [r.reference.canonical_json() for r in first] == [r.reference.canonical_json() for r in second]
    assert second_cache.as_metrics()["credit_cache/hits"] == 3


def test_replay_only_serves_hits_and_reports_misses_without_calls(tmp_path):
    group, unseen = cancel_group("g0"), cancel_group("g1")
    unseen.trajectories[0].reward = 0.99  # different input → different key
    CachingAnnotator(CountingAnnotator(), tmp_path).annotate(group)
    replay = ReplayAnnotator(tmp_path, identity="counting-v1")
    assert replay.annotate(group).reason == "cache_hit"
    miss = replay.annotate(unseen)
    assert miss.reference is None and miss.reason == "replay_miss"
    built = build_annotator(AnnotatorConfig(kind="replay", cache_dir=str(tmp_path),
                                            replay_identity="counting-v1"))
    assert built.annotate(group).reason == "cache_hit"


def test_key_depends_on_identity_prompt_version_and_input():
    group = cancel_group()
    base = cache_key(group, "a")
    assert base == cache_key(cancel_group(), "a")  # same content, rebuilt objects
    assert base != cache_key(group, "b") and base != cache_key(group, "a", prompt_version="v0")
    changed = cancel_group()
    changed.trajectories[1].steps[0].observations[0]["content"] = '{"status": "error"}'
    assert cache_key(changed, "a") != base


def test_group_id_and_token_ids_do_not_change_the_key():
    # the reference depends on what the annotator sees, not on the iteration's bookkeeping
    first, second = cancel_group("iter1-t7", task_id="t7"), cancel_group("iter2-t7", task_id="t7")
    assert first.trajectories[0].token_ids.tolist() != second.trajectories[0].token_ids.tolist()
    assert cache_key(first, "a") == cache_key(second, "a")
    assert cache_key(first, "a") != cache_key(cancel_group("iter1-t7", task_id="t8"), "a")


def test_failed_annotations_are_not_cached(tmp_path):
    class Failing:
        name = "failing"

        def identity(self):
            return "failing"

        def annotate(self, group):
            return AnnotationResult(group.group_id, None, "http_500")

    cache = CachingAnnotator(Failing(), tmp_path)
    assert cache.annotate(cancel_group()).reason == "http_500"
    assert cache.writes == 0 and not list(tmp_path.rglob("*.json"))


def test_corrupt_entry_is_a_miss_and_gets_rewritten(tmp_path):
    group = cancel_group()
    inner = CountingAnnotator()
    cache = CachingAnnotator(inner, tmp_path)
    path = cache.cache.path(cache_key(group, inner.identity()))
    path.parent.mkdir(parents=True)
    path.write_text('{"reference": {"summary": ')  # what a torn write would leave
    assert cache.annotate(group).reason == "ok" and inner.calls == 1
    assert cache.annotate(group).reason == "cache_hit"


def test_concurrent_writers_and_readers_never_see_a_partial_entry(tmp_path):
    reference = ContrastAnnotator().reference(cancel_group())
    keys = [f"{i:02x}" + "0" * 62 for i in range(4)]
    store = ReferenceCache(tmp_path)
    for key in keys:
        store.put(key, reference, {"annotator": "t"})
    stop, torn = threading.Event(), []

    def writer(seed):
        own = ReferenceCache(tmp_path)  # separate instances, as separate workers would have
        for n in range(60):
            own.put(keys[(seed + n) % 4], reference, {"annotator": "t"})

    def reader():
        own = ReferenceCache(tmp_path)
        while not stop.is_set():
            for key in keys:
                got = own.get(key)
                if got is None or got.canonical_json() != reference.canonical_json():
                    torn.append(key)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(s,)) for s in range(4)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join(timeout=30)
    stop.set()
    for t in readers:
        t.join(timeout=30)
    assert torn == []
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".json"]  # no temps


def test_async_queue_with_cache_and_a_raising_annotator(tmp_path):
    class Broken:
        name = "broken"

        def identity(self):
            return "broken"

        def annotate(self, group):
            raise RuntimeError("annotator bug")

    with AsyncAnnotationQueue(Broken(), max_workers=2) as queue:
        queue.submit([cancel_group("g0")])
        assert queue.collect()["g0"].reason == "error:RuntimeError"
    with AsyncAnnotationQueue(CachingAnnotator(CountingAnnotator(), tmp_path)) as queue:
        ids = queue.submit([cancel_group("g0"), cancel_group("g0"), cancel_group("g1")])
        assert ids == ["g0", "g0", "g1"] and queue.num_pending == 2
        results = queue.collect(["g1", "g0"])
        assert set(results) == {"g0", "g1"} and all(r.ok for r in results.values())
        with pytest.raises(KeyError, match="never submitted"):
            queue.collect(["g0"])


def test_build_annotator_default_stack_is_contrast_with_cache(tmp_path):
    annotator = build_annotator(AnnotatorConfig(cache_dir=str(tmp_path)))
    trajs = cancel_group().trajectories + [make_trajectory("solo", 0, 1.0, [[]])]
    from sgcd_jax.credit.selection import group_siblings
    mixed, solo = group_siblings(trajs, 1.0)
    assert annotator.annotate(mixed).reason == "ok" and annotator.annotate(mixed).reason == "cache_hit"
    assert annotator.annotate(solo).reason == "not_mixed"
