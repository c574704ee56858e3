"""Orbax checkpointer: exact round trip of params, optimizer state and typed PRNG keys; keep-N;
best-by-eval keeps the best step, not the latest."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sgcd_jax.trainer.checkpoint import TrainCheckpointer


def state(seed=0):
    params = {"w": jax.random.normal(jax.random.key(seed), (3, 4)), "b": jnp.arange(4.0)}
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    _, opt_state = tx.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
    return {"params": params, "opt_state": opt_state, "rng": jax.random.split(jax.random.key(seed + 7))[0]}


def assert_tree_equal(a, b):
    a_leaves, a_def = jax.tree.flatten(a)
    b_leaves, b_def = jax.tree.flatten(b)
    assert a_def == b_def
    for x, y in zip(a_leaves, b_leaves):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact_including_prng_keys_and_meta(tmp_path):
    ckpt = TrainCheckpointer(str(tmp_path), keep=2)
    saved = state(1)
    ckpt.save(5, saved, {"iteration": 5, "data": {"next_index": 17}})
    ckpt.wait()
    restored, meta = ckpt.restore(5, state(2))
    assert_tree_equal(restored, saved)
    assert meta == {"iteration": 5, "data": {"next_index": 17}}
    # the restored key draws the same numbers
    np.testing.assert_array_equal(jax.random.uniform(restored["rng"], (3,)), jax.random.uniform(saved["rng"], (3,)))
    ckpt.close()


def test_keeps_only_the_newest_n(tmp_path):
    ckpt = TrainCheckpointer(str(tmp_path), keep=2)
    for step in range(4):
        ckpt.save(step, state(step), {"iteration": step}, force=True)
    ckpt.wait()
    assert ckpt.latest_step() == 3
    assert sorted(ckpt._latest.all_steps()) == [2, 3]
    ckpt.close()


def test_best_by_eval_keeps_the_highest_score(tmp_path):
    ckpt = TrainCheckpointer(str(tmp_path), keep=1)
    for step, score in [(1, 0.2), (2, 0.7), (3, 0.4)]:
        ckpt.save_best(step, state(step), {"iteration": step}, score)
    ckpt.wait()
    assert ckpt.best_step() == 2
    restored, meta = ckpt.restore(2, state(0), best=True)
    assert meta["iteration"] == 2
    assert_tree_equal(restored["params"], state(2)["params"])
    ckpt.close()
