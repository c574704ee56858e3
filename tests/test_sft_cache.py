"""sft_cache: an identical warm-up is computed once and restored bit for bit; anything it depends on
changes the key; a corrupt entry is recomputed, not fatal."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from sgcd_jax import config as config_lib
from sgcd_jax import config_files
from sgcd_jax.trainer.sft_cache import cache_key, cached_sft

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "quickstart.py")


def _params(seed):
    keys = jax.random.split(jax.random.key(seed), 2)
    return {"w": jax.random.normal(keys[0], (4, 3)), "b": {"v": jax.random.normal(keys[1], (3,))}}


def test_second_identical_warm_up_is_restored_not_recomputed(tmp_path):
    calls = []

    def warm_up():
        calls.append(1)
        return _params(len(calls)), {"sft/nll_last": 0.5}

    start = jax.tree.map(jnp.zeros_like, _params(0))
    first, m1 = cached_sft(start, "k1", str(tmp_path), warm_up)
    second, m2 = cached_sft(start, "k1", str(tmp_path), warm_up)
    assert len(calls) == 1 and m1["sft/cache_hit"] == 0.0 and m2["sft/cache_hit"] == 1.0
    assert m2["sft/nll_last"] == 0.5
    jax.tree.map(np.testing.assert_array_equal, first, second)
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]  # no temporary left behind
    cached_sft(start, "k2", str(tmp_path), warm_up)  # another key: computed again
    assert len(calls) == 2


def test_corrupt_entry_is_recomputed(tmp_path):
    calls = []

    def warm_up():
        calls.append(1)
        return _params(7), {}

    start = _params(0)
    cached_sft(start, "k", str(tmp_path), warm_up)
    for root, _, files in os.walk(tmp_path / "k" / "params"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    restored, metrics = cached_sft(start, "k", str(tmp_path), warm_up)
    assert len(calls) == 2 and metrics["sft/cache_hit"] == 0.0
    jax.tree.map(np.testing.assert_array_equal, restored, _params(7))


def test_key_covers_what_the_warm_up_depends_on(tmp_path):
    base = config_files.load_config_file(CONFIG)
    key = cache_key(base)
    assert key == cache_key(config_files.load_config_file(CONFIG))
    assert key == cache_key(config_files.load_config_file(CONFIG, {"loss.credit": "none", "annotation.name": "none",
                                                                 "sft.cache_dir": "/elsewhere"}))
    for override in ({"sft.steps": 7}, {"run.seed": 1}, {"env.tasks_per_db": 3}, {"model.num_layers": 3},
                     {"rollout.max_total_tokens": 512}, {"sft.learning_rate": 1e-3}):
        assert cache_key(config_files.load_config_file(CONFIG, override)) != key, override
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "tokenizer.json").write_text("a")
    with_a = cache_key(base, str(tokenizer_dir))
    (tokenizer_dir / "tokenizer.json").write_text("b")
    assert with_a != cache_key(base, str(tokenizer_dir)) and with_a != key


def test_trainer_restores_a_cached_warm_up_instead_of_recomputing(tmp_path, monkeypatch):
    """Two runs with the same SFT inputs and sft.cache_dir: the second never calls run_sft and starts
    RL from bit-identical params (its step-0 checkpoint equals the first run's)."""
    from test_train_e2e import tiny_config

    from sgcd_jax import train as train_lib
    from sgcd_jax.trainer import phases as train_parts
    from sgcd_jax.trainer.checkpoint import TrainCheckpointer

    cache = str(tmp_path / "sft_cache")
    extra = {"run.num_iterations": 0, "run.report": False, "eval.at_start": False, "sft.cache_dir": cache}
    first, _ = tiny_config(tmp_path, "first", **extra)
    train_lib.train(first)
    assert len([n for n in os.listdir(cache) if ".tmp-" not in n]) == 1

    calls = []
    real = train_parts.run_sft
    monkeypatch.setattr(train_parts, "run_sft", lambda *a, **k: calls.append(1) or real(*a, **k))
    second, _ = tiny_config(tmp_path, "second", **extra)
    train_lib.train(second)
    assert calls == []

    def step0(run_dir):
        ckpt = TrainCheckpointer(run_dir)
        path = os.path.join(ckpt.directory, "0", "state")
        ckpt.close()
        return path
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as reader:
        a = reader.restore(step0(first.run_dir))["params"]
        b = reader.restore(step0(second.run_dir))["params"]
    jax.tree.map(np.testing.assert_array_equal, a, b)
