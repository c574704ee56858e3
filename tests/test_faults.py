"""Issue 17 fault table: one test per row (``test_row_NN_…``), each failing on the code before the fix.

``python scripts/fault_table.py`` runs these and prints the table with the measured numbers.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest


# ---- row 14: a partial trailing metrics.jsonl line (kill -9 mid-write) ----------------------------
def test_row_14_partial_trailing_metrics_line_is_tolerated(tmp_path):
    from sgcd_jax.metrics_log import MetricsLogger, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "phase": "train", "loss": 0.5}) + "\n"
                    + json.dumps({"step": 2, "phase": "train", "loss": 0.25}) + "\n" + '{"step": 3, "pha')
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2]
    logger = MetricsLogger(str(tmp_path), tensorboard=False, resume_step=2)  # the resume path
    logger.log(2, {"loss": 0.125})
    logger.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(str(tmp_path))] == [(1, 0.5), (2, 0.125)]
    # a bad line in the middle is corruption, not a cut: it still raises, naming the line
    path.write_text('{"step": 1}\n{garbage\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(str(tmp_path))


# ---- row 8: a deeply nested / huge <tool_call> is a counted error observation, not a lost batch ----
@pytest.mark.parametrize("payload", ["[" * 1000, '{"name": "get_user_details", "arguments": {"x": ' + "[" * 5000 + "]" * 5000 + "}}",
                                     '{"name": "x", "arguments": {"s": "' + "a" * 100_000 + '"}}'])
def test_row_08_deep_or_huge_tool_call_is_an_error_observation(payload):
    from sgcd_jax.rollout.toolparse import parse_tool_calls

    tools = [{"type": "function", "function": {"name": "get_user_details", "parameters": {"type": "object"}}}]
    turn = parse_tool_calls(f"hi <tool_call>{payload}</tool_call>", tools)
    assert turn.num_calls == 1 and turn.action.tool_calls == ()
    assert [e.kind for e in turn.errors] == ["oversized_call"]
    assert "rejected" in turn.error_observations()[0]["content"]
    # brackets inside strings do not count; a normal call still parses
    ok = parse_tool_calls('<tool_call>{"name": "get_user_details", "arguments": {"q": "' + "[" * 200 + '"}}</tool_call>', tools)
    assert ok.errors == () and ok.action.tool_calls[0].arguments == {"q": "[" * 200}


# ---- row 5: annotation-cache entries are checked against their key; nested JSON is a miss ---------
def test_row_05_swapped_or_nested_annotation_cache_entries_are_rejected_and_rewritten(tmp_path):
    from helpers.credit_fixtures import cancel_group
    from sgcd_jax.credit.cache import CachingAnnotator, cache_key
    from sgcd_jax.credit.contrast import ContrastAnnotator

    first, second = cancel_group("g0"), cancel_group("g1")
    second.trajectories[0].reward = 0.75  # another input → another key and another reference
    calls = []

    class Counting(ContrastAnnotator):
        def annotate(self, group):
            calls.append(group.group_id)
            return super().annotate(group)

    caching = CachingAnnotator(Counting(), tmp_path)
    caching.annotate(first), caching.annotate(second)
    ident = caching.identity()
    path_a, path_b = (caching.cache.path(cache_key(g, ident)) for g in (first, second))
    text_a, text_b = path_a.read_text(), path_b.read_text()
    path_a.write_text(text_b), path_b.write_text(text_a)  # swap the two entries
    fresh = CachingAnnotator(Counting(), tmp_path)
    assert fresh.annotate(first).reason != "cache_hit" and fresh.annotate(second).reason != "cache_hit"
    assert fresh.as_metrics()["credit_cache/rejected"] == 2
    assert json.loads(path_a.read_text())["key"] == cache_key(first, ident)  # rewritten correctly
    # an edited reference (its stored hash no longer matches) is rejected too
    entry = json.loads(path_a.read_text())
    entry["reference"]["summary"] = "tampered " + str(entry["reference"].get("summary", ""))
    path_a.write_text(json.dumps(entry))
    assert CachingAnnotator(Counting(), tmp_path).annotate(first).reason != "cache_hit"
    # a deeply nested entry: a counted miss that gets rewritten, not a RecursionError forever
    path_b.write_text("[" * 100_000 + "]" * 100_000)
    third = CachingAnnotator(Counting(), tmp_path)
    assert third.annotate(second).reference is not None and third.as_metrics()["credit_cache/rejected"] == 1
    assert CachingAnnotator(Counting(), tmp_path).annotate(second).reason == "cache_hit"


# ---- row 6: a fallback reference is cached under the fallback's identity ---------------------------
def test_row_06_fallback_reference_is_not_cached_under_the_primary_identity(tmp_path):
    from helpers.credit_fixtures import cancel_group
    from sgcd_jax.credit.annotator import AnnotationResult, FallbackAnnotator
    from sgcd_jax.credit.cache import CachingAnnotator, ReplayAnnotator
    from sgcd_jax.credit.contrast import ContrastAnnotator

    class Primary:  # stands in for Gemini: fails (run 1), then answers (run 2)
        name = "primary"

        def __init__(self, healthy):
            self.healthy, self.calls = healthy, 0

        def identity(self):
            return "primary-v1"

        def annotate(self, group):
            self.calls += 1
            if not self.healthy:
                return AnnotationResult(group.group_id, None, "http_500", source=self.name)
            result = ContrastAnnotator().annotate(group)
            return AnnotationResult(group.group_id, result.reference, "ok", source=self.name)

    group = cancel_group("g0")
    down = Primary(healthy=False)
    first = CachingAnnotator(FallbackAnnotator(down, ContrastAnnotator()), tmp_path).annotate(group)
    assert first.reason == "fallback:http_500" and first.reference is not None
    up = Primary(healthy=True)
    second = CachingAnnotator(FallbackAnnotator(up, ContrastAnnotator()), tmp_path).annotate(group)
    assert up.calls == 1 and second.reason == "ok"  # the healthy primary is asked, not served the fallback
    # the fallback's answer is replayable under the fallback's own identity
    assert ReplayAnnotator(tmp_path, ContrastAnnotator().identity()).annotate(group).reason == "cache_hit"


# ---- row 7: one config timeout bounds annotation; a hung annotator thread cannot pin exit ----------
def test_row_07_annotator_timeout_and_base_url_come_from_config(tmp_path):
    from sgcd_jax.config import AnnotationSpec, ConfigError
    from sgcd_jax.trainer.teacher_context import build_annotation_queue

    os.environ.setdefault("GEMINI_API_KEY", "test-key-not-real")
    queue = build_annotation_queue(AnnotationSpec(name="gemini", timeout_s=7.5, base_url="http://127.0.0.1:9/"),
                                   str(tmp_path))
    try:
        gemini = queue.annotator.inner.primary
        assert gemini.config.timeout_s == 7.5 and gemini.config.base_url == "http://127.0.0.1:9/"
        assert gemini._client._api_client._http_options.base_url == "http://127.0.0.1:9/"
        assert gemini._client._api_client._http_options.timeout == 7500  # ms, per HTTP request
    finally:
        queue.close(wait=False)
    with pytest.raises(ConfigError, match="annotation.timeout_s"):
        AnnotationSpec(timeout_s=float("inf"))
    with pytest.raises(ConfigError, match="annotation.base_url"):
        AnnotationSpec(base_url="127.0.0.1:8080")


HUNG_ANNOTATOR = """
import sys, time
sys.path.insert(0, {tests!r})
from helpers.credit_fixtures import cancel_group
from sgcd_jax.credit.async_queue import AsyncAnnotationQueue

class Hung:
    name = "hung"
    def identity(self): return "hung"
    def annotate(self, group): time.sleep(3600)

queue = AsyncAnnotationQueue(Hung())
queue.submit([cancel_group()])
print(list(queue.collect(timeout_s=0.5).values())[0].reason, flush=True)
queue.close(wait=False)
"""


def test_row_07_hung_annotator_thread_does_not_hold_process_exit():
    import subprocess
    import sys
    import time

    tests = os.path.dirname(os.path.abspath(__file__))
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", HUNG_ANNOTATOR.format(tests=tests)], capture_output=True, text=True,
                         timeout=120, cwd=os.path.dirname(tests))
    elapsed = time.monotonic() - started
    assert out.returncode == 0 and out.stdout.strip() == "queue_timeout", out.stderr[-2000:]
    assert elapsed < 30, f"exit took {elapsed:.1f} s after a 0.5 s deadline: a hung thread held it"
    print(f"\nhung annotator (sleeps 3600 s), credit deadline 0.5 s: whole process done in {elapsed:.1f} s")


# ---- row 9: an env call that never returns ends its episode and cannot hold the process ------------
HUNG_ENV = """
import sys, time
sys.path.insert(0, {tests!r})
import jax
import test_rollout as tr
from sgcd_jax.envs.base import Task
from sgcd_jax.rollout.engine import RolloutConfig, RolloutEngine

class Forever(tr.WeatherEnv):
    def step(self, action):
        time.sleep(3600)

class F(tr.Factory):
    def make(self): return Forever()

renderer = tr.ChatRenderer(tr.load_tokenizer("smollm2-135m-instruct"))
engine = RolloutEngine(tr.ScriptedPolicy(tr.scripted_turns(renderer)), renderer,
                       RolloutConfig(env_timeout_s=0.5, max_turns=3))
trajs = engine.run([Task("t", "weather")], F(), group_size=2, rng=jax.random.key(0))
print(",".join(t.termination for t in trajs), flush=True)
print("returned_at", time.monotonic(), flush=True)
"""


def test_row_09_hung_env_thread_does_not_hold_process_exit():
    import subprocess
    import sys
    import time

    tests = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", HUNG_ENV.format(tests=tests)], capture_output=True, text=True,
                         timeout=180, cwd=os.path.dirname(tests))
    exited = time.monotonic()
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and lines[0] == "env_timeout,env_timeout", out.stderr[-2000:]
    after_run = exited - float(lines[1].split()[1])  # CLOCK_MONOTONIC is system-wide on Linux
    assert after_run < 10, f"process exit took {after_run:.1f} s after the rollout returned"
    print(f"\nhung env call (sleeps 3600 s), env timeout 0.5 s: process exited {after_run:.2f} s after the rollout returned")


def test_row_09_env_timeout_is_a_config_key():
    from sgcd_jax.config import ConfigError, RolloutSpec, TrainConfig
    from sgcd_jax.integration import make_engine

    class Chat:
        class renderer:  # noqa: N801
            @staticmethod
            def stop_token_ids():
                return [0]

    import jax.numpy as jnp
    from flax import nnx

    from sgcd_jax.models import Decoder, ModelConfig

    model = Decoder(ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                                num_kv_heads=1, head_dim=8, max_position_embeddings=64, dtype=jnp.float32),
                    rngs=nnx.Rngs(0))
    engine = make_engine(model, Chat(), TrainConfig(rollout=RolloutSpec(env_timeout_s=2.5)))
    assert engine.config.env_timeout_s == 2.5
    with pytest.raises(ConfigError, match="rollout.env_timeout_s"):
        RolloutSpec(env_timeout_s=0.0)


# ---- row 10: a NaN reward is scored 0 and counted at the env boundary -------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "1.0x"])
def test_row_10_non_finite_reward_is_rejected_at_the_env_boundary(bad):
    import jax

    import test_rollout as tr
    from sgcd_jax.envs.base import Task
    from sgcd_jax.rollout.engine import RolloutConfig, RolloutEngine

    class BadReward(tr.WeatherEnv):
        def reward(self):
            return bad

    class F(tr.Factory):
        def make(self):
            return BadReward()

    renderer = tr.ChatRenderer(tr.load_tokenizer("smollm2-135m-instruct"))
    engine = RolloutEngine(tr.ScriptedPolicy(tr.scripted_turns(renderer)), renderer, RolloutConfig(max_turns=5))
    trajs = engine.run([Task("t", "weather")], F(), group_size=2, rng=jax.random.key(0))
    assert [t.reward for t in trajs] == [0.0, 0.0]
    assert all(t.metrics["reward_errors"] == 1.0 for t in trajs)
    assert all(np.isfinite(t.reward) for t in trajs)


# ---- row 11: the update guard rejects non-finite updated params; bad learning rates rejected -----
def test_row_11_update_guard_rejects_finite_grads_that_make_non_finite_params():
    import jax
    import optax

    import jax.numpy as jnp
    from flax import nnx

    from test_train_step import VOCAB, spec, trajectories
    from sgcd_jax.learner.scoring import pack, to_device
    from sgcd_jax.learner.train_step import Learner, StepInputs
    from sgcd_jax.models import Decoder, ModelConfig

    # One layer, four trajectories, no scoring pass (π_old = 0, advantage 1 on every target): the guard's
    # behaviour does not depend on size, the compile time does.
    model = Decoder(ModelConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                                num_kv_heads=1, tie_word_embeddings=True), rngs=nnx.Rngs(0))
    batch = to_device(pack(trajectories(n=4), None, rows_multiple=4, length_multiple=16))
    zeros = jnp.zeros(batch.target_mask.shape, jnp.float32)
    inputs = StepInputs(batch, batch.target_mask.astype(jnp.float32), zeros, zeros, zeros)
    learner = Learner(model, optax.sgd(float("inf")), spec())  # finite loss and grads, inf step
    before = jax.tree.map(np.array, learner.params)
    metrics = learner.update(inputs)
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
    assert metrics["skipped"] == 1.0
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(learner.params)):
        np.testing.assert_array_equal(a, np.asarray(b))


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 1e30])
def test_row_11_bad_learning_rates_are_rejected(bad):
    from sgcd_jax.config import ConfigError, OptimSpec, SFTSpec
    from sgcd_jax.learner.train_step import make_optimizer

    with pytest.raises(ConfigError, match="optim.learning_rate"):
        OptimSpec(learning_rate=bad)
    with pytest.raises(ConfigError, match="sft.learning_rate"):
        SFTSpec(learning_rate=bad)
    with pytest.raises(ValueError, match="learning rate"):
        make_optimizer(OptimSpec(), 10, learning_rate=bad)


# ---- rows 2, 3: checkpoints verified on restore, corrupt latest → previous intact one ------------
def _ckpt_state(seed=0):
    import jax
    import jax.numpy as jnp
    import optax

    params = {"w": jax.random.normal(jax.random.key(seed), (64, 64)), "b": jnp.arange(64.0) + seed}
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    return {"params": params, "opt_state": opt_state, "rng": jax.random.key(seed + 7)}


def _data_files(step_dir):
    files = [os.path.join(root, name) for root, _, names in os.walk(step_dir) for name in names]
    return sorted((f for f in files if "/d/" in f), key=os.path.getsize, reverse=True)


def _two_checkpoints(tmp_path):
    from sgcd_jax.trainer.checkpoint import TrainCheckpointer

    ckpt = TrainCheckpointer(str(tmp_path), keep=3)
    for step in (1, 2):
        assert ckpt.save(step, _ckpt_state(step), {"iteration": step}, force=True)
    ckpt.close()
    return TrainCheckpointer(str(tmp_path), keep=3)


def test_row_02_random_bytes_in_a_checkpoint_data_file_are_detected_and_the_previous_one_used(tmp_path):
    import jax

    from sgcd_jax.trainer.checkpoint import CorruptCheckpoint

    ckpt = _two_checkpoints(tmp_path)
    target = _data_files(os.path.join(ckpt.directory, "2"))[0]
    size = os.path.getsize(target)
    with open(target, "r+b") as f:  # 4 KB of random bytes in the middle, size unchanged
        f.seek(max(size // 2 - 2048, 0))
        f.write(np.random.default_rng(0).bytes(min(4096, size)))
    assert os.path.getsize(target) == size
    with pytest.raises(CorruptCheckpoint, match=r"checkpoints/2"):
        ckpt.restore(2, _ckpt_state(9))
    step, state, meta = ckpt.restore_latest(_ckpt_state(9))
    assert step == 1 and meta == {"iteration": 1}
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.asarray(_ckpt_state(1)["params"]["w"]))
    assert os.path.isdir(os.path.join(ckpt.directory, "corrupt-2")) and ckpt.latest_step() == 1
    assert ckpt.save(2, _ckpt_state(2), {"iteration": 2}, force=True)  # step 2 is written again, not skipped
    ckpt.wait()
    assert ckpt.restore_latest(_ckpt_state(9))[0] == 2
    ckpt.close()
    del jax


def test_row_02_swapped_values_that_still_decode_are_caught_by_the_fingerprint(tmp_path):
    import jax.numpy as jnp

    from sgcd_jax.trainer.checkpoint import CorruptCheckpoint, TrainCheckpointer

    # Same bytes, other order: the decoder cannot notice, only a content check can. Saved through a
    # second checkpointer whose arrays are the first's with two elements swapped, then its meta
    # (holding the fingerprint of the original arrays) replaced by the original's.
    original = _ckpt_state(1)
    swapped = dict(original, params=dict(original["params"], b=jnp.asarray(original["params"]["b"]).at[0].set(2.0).at[2].set(1.0)))
    a, b = TrainCheckpointer(str(tmp_path / "a")), TrainCheckpointer(str(tmp_path / "b"))
    a.save(1, original, {"iteration": 1}, force=True), b.save(1, swapped, {"iteration": 1}, force=True)
    a.close(), b.close()
    import shutil
    shutil.copy(os.path.join(a.directory, "1", "meta", "metadata"), os.path.join(b.directory, "1", "meta", "metadata"))
    with pytest.raises(CorruptCheckpoint, match="fingerprint"):
        TrainCheckpointer(str(tmp_path / "b")).restore(1, _ckpt_state(9))


def test_row_02_fingerprint_of_leaves_on_different_device_sets_matches_their_host_copy():
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from sgcd_jax.trainer import integrity

    if jax.device_count() < 2:
        pytest.skip("needs several (virtual) devices")
    # what a one-process resume restores: mesh-sharded params beside a single-device PRNG key
    mesh = Mesh(np.array(jax.devices()), ("data",))
    values = np.arange(jax.device_count() * 4, dtype=np.float32).reshape(jax.device_count(), 4)
    sharded = jax.device_put(values, NamedSharding(mesh, PartitionSpec("data")))
    key = jax.random.key(3)
    assert integrity.fingerprint({"w": sharded, "rng": key}) == integrity.fingerprint({"w": jnp.asarray(values), "rng": key})


@pytest.mark.parametrize("damage", ["truncate_meta", "garbage_meta", "truncate_data", "delete_data"])
def test_row_03_truncated_or_garbage_latest_falls_back_naming_the_bad_path(tmp_path, damage, caplog):
    ckpt = _two_checkpoints(tmp_path)
    step_dir = os.path.join(ckpt.directory, "2")
    meta_file = os.path.join(step_dir, "meta", "metadata")
    data = _data_files(step_dir)[0]
    if damage == "truncate_meta":
        open(meta_file, "r+b").truncate(5)
    elif damage == "garbage_meta":
        open(meta_file, "wb").write(b"\x00\xffnot json")
    elif damage == "truncate_data":
        open(data, "r+b").truncate(os.path.getsize(data) // 3)
    else:
        os.remove(data)
    with caplog.at_level("ERROR"):
        step, _, meta = ckpt.restore_latest(_ckpt_state(9))
    assert step == 1 and meta["iteration"] == 1
    assert any(step_dir in r.getMessage() for r in caplog.records)
    ckpt.close()


def test_row_02_non_finite_state_is_never_saved_and_never_rotates_out_a_good_one(tmp_path):
    import jax.numpy as jnp

    from sgcd_jax.trainer.checkpoint import TrainCheckpointer

    ckpt = TrainCheckpointer(str(tmp_path), keep=1)
    assert ckpt.save(1, _ckpt_state(1), {"iteration": 1}, force=True)
    bad = _ckpt_state(2)
    bad["params"]["w"] = bad["params"]["w"].at[3, 3].set(jnp.nan)
    assert not ckpt.save(2, bad, {"iteration": 2}, force=True)
    ckpt.save_best(2, bad, {"iteration": 2}, 0.9)
    ckpt.wait()
    assert ckpt.latest_step() == 1 and ckpt.best_step() is None
    assert ckpt.restore_latest(_ckpt_state(9))[0] == 1
    ckpt.close()


# ---- row 4: SFT-cache entries verified on restore -------------------------------------------------
def test_row_04_corrupt_or_misplaced_sft_cache_entry_is_recomputed_not_a_hit(tmp_path):
    import shutil

    import jax
    import jax.numpy as jnp

    from sgcd_jax.trainer.sft_cache import cached_sft

    calls = []

    def warm_up():
        calls.append(1)
        return {"w": jax.random.normal(jax.random.key(len(calls)), (128, 64))}, {"sft/nll_last": 0.5}

    start = {"w": jnp.zeros((128, 64))}
    cached_sft(start, "k", str(tmp_path), warm_up)
    target = _data_files(str(tmp_path / "k" / "params"))[0]
    size = os.path.getsize(target)
    with open(target, "r+b") as f:  # random bytes, size unchanged
        f.seek(max(size // 2 - 2048, 0))
        f.write(np.random.default_rng(1).bytes(min(4096, size)))
    params, metrics = cached_sft(start, "k", str(tmp_path), warm_up)
    assert metrics["sft/cache_hit"] == 0.0 and len(calls) == 2
    assert np.isfinite(np.asarray(params["w"])).all()
    # an intact entry copied under another key is not that key's warm-up
    shutil.copytree(tmp_path / "k", tmp_path / "other")
    _, metrics = cached_sft(start, "other", str(tmp_path), warm_up)
    assert metrics["sft/cache_hit"] == 0.0 and len(calls) == 3
    assert cached_sft(start, "k", str(tmp_path), warm_up)[1]["sft/cache_hit"] == 1.0  # the rewritten entry hits

    def nan_warm_up():
        return {"w": jnp.full((128, 64), jnp.nan)}, {}

    cached_sft(start, "nan", str(tmp_path), nan_warm_up)
    assert not os.path.exists(tmp_path / "nan")  # non-finite warm-ups are never cached


# ---------------------------------------------------------------------------------- trainer level
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code_or_args, timeout=240, env_extra=None, **popen):
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=REPO, **(env_extra or {}))
    env.pop("GEMINI_API_KEY", None) if env_extra is None or "GEMINI_API_KEY" not in env_extra else None
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else list(code_or_args)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env,
                          **popen)


# ---- row 1: one run dir, one run -------------------------------------------------------------------
def test_row_01_second_run_on_a_locked_dir_fails_at_once_naming_the_holder(tmp_path):
    import socket
    import time

    from sgcd_jax.trainer.run_lock import RunDirLock, RunDirLocked

    run_dir = tmp_path / "runs" / "r"
    with RunDirLock(str(run_dir)):
        with pytest.raises(RunDirLocked, match=rf"pid {os.getpid()} on host {socket.gethostname()}"):
            RunDirLock(str(run_dir)).acquire()
        started = time.monotonic()  # the CLI: a second `python -m sgcd_jax.train` on the same dir
        out = _python(["-m", "sgcd_jax.train", f"--config.run.workdir={tmp_path / 'runs'}", "--config.run.name=r"])
        elapsed = time.monotonic() - started
        assert out.returncode == 1 and f"in use by pid {os.getpid()}" in out.stderr, out.stderr[-2000:]
        assert not (run_dir / "config.json").exists()  # it wrote nothing into the held dir
        print(f"\nsecond run on a locked dir: exit {out.returncode} after {elapsed:.1f} s: {out.stderr.strip()}")
    RunDirLock(str(run_dir)).acquire().release()  # released: free again


def test_row_01_lock_of_a_killed_run_is_stale_and_taken_over(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from sgcd_jax.trainer.run_lock import RunDirLock

    code = ("import sys, time; from sgcd_jax.trainer.run_lock import RunDirLock; lock = RunDirLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.stdout.readline().strip() == "held"
    from sgcd_jax.trainer.run_lock import RunDirLocked
    with pytest.raises(RunDirLocked, match=f"pid {proc.pid}"):
        RunDirLock(str(tmp_path)).acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    lock = RunDirLock(str(tmp_path)).acquire()  # the kernel dropped the dead holder's flock
    assert time.monotonic() < deadline and f'"pid": {os.getpid()}' in open(lock.path).read()
    lock.release()


# ---- row 12: signals from process start; exit 75 and "preempted"; SFT state kept -----------------
@pytest.mark.slow  # two CLI runs (~1 min each on a loaded 2-core machine)
def test_row_12_sigterm_at_any_point_exits_75_saying_preempted(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from helpers.tiny_train import TINY_WORLD

    overrides = {**TINY_WORLD, "run.workdir": str(tmp_path), "run.num_iterations": 50,
                 "run.checkpoint_every": 0, "run.eval_every": 0, "sft.steps": 3, "sft.batch_size": 2, "sft.num_demos": 4,
                 "eval.num_tasks": 1, "run.report": False}
    args = [sys.executable, "-m", "sgcd_jax.train"] + [f"--config.{k}={v}" for k, v in overrides.items()]
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("GEMINI_API_KEY", None)
    results = {}
    for when in ("during_imports", "after_config"):  # jax etc. still importing; the run dir exists (build / SFT)
        run_args = args + [f"--config.run.name={when}"]
        proc = subprocess.Popen(run_args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if when == "during_imports":
            time.sleep(1.5)  # past interpreter start-up (the one window no Python handler can cover), inside the imports
        else:
            deadline = time.monotonic() + 120
            while not (tmp_path / when / "config.json").exists() and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.05)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=400)
        results[when] = (proc.returncode, time.monotonic() - sent)
        assert proc.returncode == 75, (when, proc.returncode, err[-3000:])
        assert "preempted" in out, out[-2000:]
        print(f"\nSIGTERM {when}: exit {proc.returncode} {results[when][1]:.1f} s after the signal; {out.strip().splitlines()[-1]}")


@pytest.mark.slow  # three tiny runs
def test_row_12_sft_warm_up_interrupted_by_a_signal_resumes_where_it_stopped(tmp_path, monkeypatch):
    import signal

    import jax

    from helpers.tiny_train import TINY_WORLD
    from sgcd_jax.config_files import configs_dir, load_config_file
    from sgcd_jax.trainer import phases, preemption

    overrides = {**TINY_WORLD, "run.workdir": str(tmp_path), "run.num_iterations": 0, "sft.steps": 4,
                 "sft.batch_size": 2, "sft.num_demos": 4, "eval.num_tasks": 1, "run.report": False}
    sft_params = {}
    real_run_sft = phases.run_sft

    def recording_run_sft(learner, *args):
        metrics = real_run_sft(learner, *args)
        sft_params[args[2].run.name] = jax.tree.map(np.asarray, learner.params)
        return metrics

    monkeypatch.setattr(phases, "run_sft", recording_run_sft)
    from sgcd_jax.train import train

    train(load_config_file(os.path.join(configs_dir(), "quickstart.py"), {**overrides, "run.name": "whole"}))

    calls = []
    real_agreed = preemption.agreed

    def signal_at_step_2():
        calls.append(1)
        if len(calls) == 3:  # mid-warm-up (after the world-build check and SFT step 0 or 1): a real SIGTERM
            os.kill(os.getpid(), signal.SIGTERM)
        return real_agreed()

    previous = preemption.install()
    try:
        monkeypatch.setattr(phases.preemption, "agreed", signal_at_step_2)
        cfg = load_config_file(os.path.join(configs_dir(), "quickstart.py"), {**overrides, "run.name": "cut"})
        with pytest.raises(preemption.Preempted, match=r"before step \d/4"):
            train(cfg)
        assert 0 < json.load(open(tmp_path / "cut" / "sft_partial" / "progress.json"))["step"] < 4
        preemption.reset()
        monkeypatch.setattr(phases.preemption, "agreed", real_agreed)
        train(cfg)  # resumes at step 2
    finally:
        preemption.reset()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert not (tmp_path / "cut" / "sft_partial").exists()
    for a, b in zip(jax.tree.leaves(sft_params["whole"]), jax.tree.leaves(sft_params["cut"])):
        np.testing.assert_array_equal(a, b)  # same batches, same optimizer state: bit-identical warm-up


# ---- row 13: config errors before any compute, naming the real key ----------------------------------
@pytest.mark.parametrize("override, key", [
    ({"rollout.top_k": -5}, "rollout.top_k"),
    ({"env.name": "tau3_airline"}, "sft.enabled"),
    ({"env.name": "tau3_airline", "sft.enabled": False}, "model.tokenizer"),
    ({"optim.learning_rate": float("inf")}, "optim.learning_rate"),
    ({"optim.learning_rate": 1e30}, "optim.learning_rate"),
    ({"advantage.eps": float("nan")}, "advantage.eps"),
    ({"credit.beta_pos": float("inf")}, "credit.beta_pos"),
    ({"rollout.group_size": 1}, "rollout.group_size"),
    ({"rollout.env_timeout_s": -1.0}, "rollout.env_timeout_s"),
    ({"annotation.timeout_s": 0.0}, "annotation.timeout_s"),
])
def test_row_13_bad_values_fail_at_config_time_naming_the_key(override, key):
    from sgcd_jax.config import ConfigError
    from sgcd_jax.config_files import configs_dir, load_config_file

    with pytest.raises(ConfigError) as err:
        load_config_file(os.path.join(configs_dir(), "quickstart.py"), override)
    assert str(err.value).startswith(key) or f" {key}" in str(err.value) or f"{key}=" in str(err.value), str(err.value)


def test_row_13_gemini_without_a_key_fails_within_seconds_from_the_cli(tmp_path):
    import time

    started = time.monotonic()
    out = _python(["-m", "sgcd_jax.train", f"--config.run.workdir={tmp_path}", "--config.annotation.name=gemini"])
    elapsed = time.monotonic() - started
    assert out.returncode == 1 and "annotation.name='gemini' needs $GEMINI_API_KEY" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "quickstart" / "checkpoints").exists()
    assert elapsed < 60, elapsed  # imports only (was 151 s: after SFT, eval and checkpoint 0)
    started = time.monotonic()
    bad = _python(["-m", "sgcd_jax.train", f"--config.run.workdir={tmp_path}", "--config.rollout.top_k=-5"])
    assert bad.returncode == 1 and "rollout.top_k" in bad.stderr, bad.stderr[-2000:]
    print(f"\nconfig errors from the CLI: gemini without key {elapsed:.1f} s, top_k=-5 {time.monotonic() - started:.1f} s")


# ---- row 15: annotator totals continue across a resume ---------------------------------------------
def test_row_15_annotator_counters_are_saved_and_restored_with_the_checkpoint_meta():
    from sgcd_jax.credit.annotator import AnnotationResult, AnnotatorStats, Usage
    from sgcd_jax.trainer.phases import Counters, meta

    class Stream:
        def get_state(self):
            return {"next_index": 5}

    stats = AnnotatorStats()
    counters = Counters(updates=3)
    counters.attach(stats)
    for reason in ("ok", "fallback:http_500", "ok"):
        stats.record(AnnotationResult("g", None, reason, Usage(calls=2, prompt_tokens=100, output_tokens=10,
                                                                cost_usd=0.25), 0.5))
    saved = json.loads(json.dumps(meta(3, Stream(), counters, 0.0)))  # as the JSON checkpoint stores it
    resumed_stats = AnnotatorStats()
    resumed = Counters(**saved["counters"])
    resumed.attach(resumed_stats)
    resumed_stats.record(AnnotationResult("g", None, "ok", Usage(calls=1, cost_usd=0.5)))
    got = resumed_stats.as_metrics()
    assert got["annotator/calls"] == 7 and got["annotator/cost_usd"] == pytest.approx(1.25)
    assert got["annotator/results"] == 4 and got["annotator/reason/ok"] == 3
    assert got["annotator/reason/fallback:http_500"] == 1 and resumed.updates == 3
    assert "count/annotation" not in resumed.as_metrics()
