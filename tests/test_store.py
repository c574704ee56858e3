"""Rollout store: zarr v3 round trips of ragged per-iteration arrays, crash safety, multi-process."""

import json

import numpy as np
import pytest

from sgcd_jax.data import store as rollout_store
from sgcd_jax.rollout.trajectory import Trajectory
from sgcd_jax.data.store import RolloutStore


def _iteration(rng, n=4, width=9):
    lengths = rng.integers(1, width + 1, n)
    lengths[0] = width
    padded = lambda dtype, fill: np.full((n, width), fill, dtype)  # noqa: E731
    tokens = {"token_ids": rng.integers(0, 1000, (n, width)).astype(np.int32),
              "loss_mask": (rng.random((n, width)) < 0.6).astype(np.int8),
              "step_ids": rng.integers(-1, 3, (n, width)).astype(np.int32),
              "student_logprobs": -rng.random((n, width)).astype(np.float32),
              "credit_weights": (0.5 + rng.random((n, width))).astype(np.float32)}
    del padded
    return lengths, tokens


def _append(store, iteration, rng, **kw):
    lengths, tokens = _iteration(rng)
    n = len(lengths)
    store.append(iteration, task_ids=[f"task-{iteration}-{i}-✈" for i in range(n)],
                 group_ids=[f"g{iteration}"] * n, lengths=lengths, tokens=tokens,
                 rewards=rng.random(n), advantages=rng.normal(size=n),
                 attrs={"credit_fn": "credit/sgcd", "step": iteration, **kw})
    return lengths, tokens


def test_ragged_iterations_round_trip_exactly(tmp_path):
    rng = np.random.default_rng(0)
    store = RolloutStore(tmp_path)
    written = {it: _append(store, it, rng) for it in (3, 4)}
    reopened = RolloutStore(tmp_path, create=False)
    assert reopened.iterations == [3, 4] and reopened.num_trajectories == 8
    for it, (lengths, tokens) in written.items():
        rows = reopened.read_iteration(it)
        np.testing.assert_array_equal(rows.lengths, lengths)
        assert rows.task_ids[1] == f"task-{it}-1-✈" and rows.group_ids == [f"g{it}"] * 4
        assert rows.attrs["step"] == it and rows.attrs["padded_length"] == 9
        for name, padded in tokens.items():
            for i, length in enumerate(lengths):
                np.testing.assert_array_equal(rows.tokens[name][i, :length], padded[i, :length])
        assert (rows.tokens["step_ids"][np.arange(9)[None] >= lengths[:, None]] == -1).all()
        assert np.isnan(rows.tokens["teacher_logprobs"]).all()  # never written
        assert "teacher_logprobs" not in rows.attrs["fields"]


def test_arrays_are_zarr_v3(tmp_path):
    store = RolloutStore(tmp_path)
    _append(store, 0, np.random.default_rng(1))
    meta = json.loads((store.path / "tokens" / "token_ids" / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["data_type"] == "int32"
    assert meta["shape"][0] == store.manifest["num_tokens"]


def test_list_rows_and_padded_rows_store_the_same(tmp_path):
    rng = np.random.default_rng(2)
    lengths, tokens = _iteration(rng)
    as_lists = {k: [v[i, :n] for i, n in enumerate(lengths)] for k, v in tokens.items()}
    a, b = RolloutStore(tmp_path / "a"), RolloutStore(tmp_path / "b")
    for s, tok in ((a, tokens), (b, as_lists)):
        s.append(0, task_ids=list("abcd"), group_ids=list("gggg"), lengths=lengths, tokens=tok,
                 rewards=np.zeros(4), attrs={"padded_length": 9} if s is b else None)
    ra, rb = a.read_iteration(0), b.read_iteration(0)
    for name in tokens:
        np.testing.assert_array_equal(ra.tokens[name], rb.tokens[name])


def test_crash_before_manifest_keeps_previous_iteration(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    store = RolloutStore(tmp_path)
    first_lengths, _ = _append(store, 0, rng)

    def crash():
        raise OSError("disk full")

    monkeypatch.setattr(store, "_write_manifest", crash)
    with pytest.raises(OSError):
        _append(store, 1, rng)
    reopened = RolloutStore(tmp_path, create=False)
    assert reopened.iterations == [0]
    np.testing.assert_array_equal(reopened.read_iteration(0).lengths, first_lengths)
    _append(reopened, 1, rng)  # the half-written arrays are overwritten, not appended after
    assert reopened.manifest["num_trajectories"] == 8


def test_duplicate_iteration_and_bad_shapes_are_rejected(tmp_path):
    rng = np.random.default_rng(4)
    store = RolloutStore(tmp_path)
    _append(store, 0, rng)
    with pytest.raises(ValueError, match="already"):
        _append(store, 0, rng)
    lengths, tokens = _iteration(rng)
    tokens["token_ids"] = tokens["token_ids"][:, :2]
    with pytest.raises(ValueError, match="token_ids"):
        store.append(5, task_ids=list("abcd"), group_ids=list("abcd"), lengths=lengths,
                     tokens=tokens, rewards=np.zeros(4))
    with pytest.raises(ValueError, match="missing"):
        store.append(5, task_ids=list("abcd"), group_ids=list("abcd"), lengths=lengths,
                     tokens={"token_ids": tokens["token_ids"]}, rewards=np.zeros(4))
    with pytest.raises(FileNotFoundError, match="rollout store"):
        RolloutStore(tmp_path / "nothing", create=False)


def test_per_process_stores_are_read_in_process_order(tmp_path):
    rng = np.random.default_rng(5)
    for process in (1, 0):
        store = RolloutStore(tmp_path, process_index=process)
        _append(store, 0, rng)
        _append(store, 1, rng)
    order = [(r.process_index, r.iteration) for r in rollout_store.iter_segments(tmp_path)]
    assert order == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_append_trajectories_keeps_trajectory_fields(tmp_path):
    trajectories = []
    for i, length in enumerate((5, 3)):
        trajectories.append(Trajectory(
            task_id=f"t{i}", group_id="g", sample_index=i,
            token_ids=np.arange(length, dtype=np.int32) + 10 * i,
            loss_mask=np.array([0, 1, 1, 0, 1][:length], np.int32),
            step_ids=np.array([-1, 0, 0, -1, 1][:length], np.int32),
            sampler_logprobs=np.linspace(-1, 0, length, dtype=np.float32), prompt_len=1,
            messages=[], steps=[], reward=float(i)))
    teacher = np.full((2, 6), -0.25, np.float32)
    store = RolloutStore(tmp_path)
    store.append_trajectories(7, trajectories, scores={"teacher_logprobs": teacher},
                              advantages=[-1.0, 1.0], attrs={"step": 7})
    rows = store.read_iteration(7)
    assert rows.attrs["padded_length"] == 6
    np.testing.assert_array_equal(rows.tokens["token_ids"][1, :3], [10, 11, 12])
    np.testing.assert_array_equal(rows.trajectories["reward"], [0.0, 1.0])
    np.testing.assert_array_equal(rows.trajectories["prompt_len"], [1, 1])
    np.testing.assert_allclose(rows.tokens["sampler_logprobs"][0, :5], trajectories[0].sampler_logprobs)
    assert rows.tokens["teacher_logprobs"][1, 2] == -0.25 and np.isnan(rows.tokens["teacher_logprobs"][1, 3])
