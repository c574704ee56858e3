"""Every loss jits under an 8-device mesh (batch sharded over 'data') with the unsharded values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sgcd_jax.losses import (AdvantageBatch, AdvantageConfig, CreditConfig, DistillBatch,
                             DistillConfig, PolicyBatch, PolicyLossConfig, SGCDBatch, SGCDLossConfig,
                             VocabConfig, compute_advantages, get, pair_stats)

B, T, D, V = 8, 6, 8, 40


def _mesh():
    devices = np.array(jax.devices()[:8])
    assert devices.size == 8, "tests/conftest.py should provide 8 simulated CPU devices"
    return Mesh(devices, ("data",))


def _shard(tree, mesh):
    def put(x):
        spec = P("data", *([None] * (x.ndim - 1))) if x.ndim >= 1 and x.shape[0] % 8 == 0 else P()
        return jax.device_put(x, NamedSharding(mesh, spec))
    return jax.tree.map(put, tree)


def _assert_same(sharded, plain):
    for got, want in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def _data():
    rng = np.random.default_rng(0)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    mask = rng.random((B, T)) < 0.75
    mask[:, 0] = True
    return dict(
        student=f32(rng.normal(size=(B, T, D))), teacher=f32(rng.normal(size=(B, T, D))),
        kernel=f32(rng.normal(size=(D, V))), targets=jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32),
        mask=jnp.asarray(mask, jnp.int32), rewards=f32(rng.integers(0, 2, 16)),
        old=f32(-rng.exponential(1.0, (B, T))), noise=f32(rng.normal(0, 0.2, (B, T))),
        step_ids=jnp.asarray(np.where(mask, np.arange(T)[None] // 3, -1), jnp.int32))


def _everything(data, step):
    adv = compute_advantages(AdvantageBatch(rewards=data["rewards"],
                                            group_ids=jnp.arange(16) // 4,
                                            valid=jnp.ones(16, bool)), AdvantageConfig())
    seq_adv = adv.advantages[:B]

    def losses(student):
        stats = pair_stats(student, data["teacher"], data["kernel"], data["targets"],
                           VocabConfig(chunk_size=5), data["mask"])
        logprobs = stats["student_logprobs"]
        sgcd = get("policy_loss/sgcd")(SGCDBatch(
            logprobs=logprobs, old_logprobs=jax.lax.stop_gradient(logprobs) + data["noise"],
            advantages=seq_adv, student_logprobs=jax.lax.stop_gradient(logprobs),
            teacher_logprobs=stats["teacher_logprobs"], loss_mask=data["mask"],
            step_ids=data["step_ids"], reverse_kl=jax.lax.stop_gradient(stats["reverse_kl"]),
            entropy=stats["student_entropy"]),
            SGCDLossConfig(policy=PolicyLossConfig(entropy_coef=0.01, agg_mode="seq-mean-token-mean"),
                           credit=CreditConfig.preset("sgcd", granularity="step")), step)
        ppo = get("policy_loss/ppo")(PolicyBatch(
            logprobs=logprobs, old_logprobs=data["old"], advantages=seq_adv[:, None],
            loss_mask=data["mask"], ref_logprobs=data["old"]), PolicyLossConfig(kl_coef=0.05))
        distill = get("aux_loss/sdpo")(DistillBatch(loss_mask=data["mask"],
                                                    divergence=stats["reverse_kl"]),
                                       DistillConfig(mode="full"))
        total = sgcd.value + ppo.value + distill.value
        return total, (adv.advantages, sgcd, ppo, distill, stats)

    return jax.value_and_grad(losses, has_aux=True)(data["student"])


@pytest.mark.slow
def test_all_losses_jit_under_data_sharded_mesh_with_same_values():
    data = _data()
    plain = jax.jit(_everything)(data, 3)
    mesh = _mesh()
    sharded_data = _shard(data, mesh)
    assert len(sharded_data["student"].sharding.device_set) == 8
    with mesh:
        sharded = jax.jit(_everything)(sharded_data, 3)
    _assert_same(sharded, plain)
    assert np.isfinite(float(plain[0][0]))
