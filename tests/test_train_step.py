"""The jitted update: SGCD λ=0 equals GRPO; SDPO puts the teacher in the actor gradient and SGCD does
not; micro-batch accumulation is exact; non-finite updates are skipped."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sgcd_jax.config import OptimSpec
from sgcd_jax.losses.credit import CreditBatch, CreditConfig, no_credit, sgcd_credit
from sgcd_jax.losses.distill import DistillConfig
from sgcd_jax.losses.policy import PolicyLossConfig
from sgcd_jax.losses.vocab import VocabConfig
from sgcd_jax.models import Decoder, ModelConfig
from sgcd_jax.rollout.trajectory import Trajectory
from sgcd_jax.learner.scoring import ScoreSpec, pack, score, to_device
from sgcd_jax.learner.train_step import Learner, StepInputs, StepSpec, _micro_loss, full_batch_denominators, \
    loss_and_grads, make_optimizer

VOCAB = 97


def tiny_model(seed=0):
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, tie_word_embeddings=True)
    return Decoder(cfg, rngs=nnx.Rngs(seed))


def trajectories(n=8, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt, length = 6, 14 + 3 * i
        ids = rng.integers(1, VOCAB, length).astype(np.int32)
        mask = np.zeros(length, np.int32)
        mask[prompt:prompt + 4] = 1
        mask[prompt + 6:] = 1  # two assistant turns around a 2-token observation
        steps = np.where(mask > 0, (np.arange(length) >= prompt + 6).astype(np.int32), -1).astype(np.int32)
        out.append(Trajectory(task_id=f"t{i // 4}", group_id=f"g{i // 4}", sample_index=i % 4, token_ids=ids,
                              loss_mask=mask, step_ids=steps, sampler_logprobs=np.zeros(length, np.float32),
                              prompt_len=prompt, messages=[], steps=[], reward=float(i % 2)))
    return out


def teacher_prompts(n=8, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, 9).astype(np.int32) for _ in range(n)]


def step_inputs(model, trajs, prompts, token_advantages=None, micro=4):
    batch = to_device(pack(trajs, prompts, rows_multiple=micro, length_multiple=16))
    feats = score(model, None, batch, ScoreSpec(VocabConfig(chunk_size=32), True, False))
    if token_advantages is None:
        token_advantages = jnp.zeros_like(batch.target_mask)
    return StepInputs(batch, token_advantages, feats["student_logprobs"], jnp.zeros_like(batch.target_mask),
                      feats["teacher_logprobs"]), feats


def spec(micro=4, distill=None):
    if distill is None:
        return StepSpec(policy=PolicyLossConfig(), vocab=VocabConfig(chunk_size=32), micro_batch_size=micro)
    return StepSpec(policy=PolicyLossConfig(), vocab=VocabConfig(chunk_size=32), micro_batch_size=micro,
                    aux=("sdpo",), distill=distill)


def params_after_update(model, inputs, step_spec):
    learner = Learner(model, make_optimizer(OptimSpec(learning_rate=1e-2, warmup_steps=0), 10), step_spec)
    learner.update(inputs)
    return jax.tree.map(np.asarray, learner.params)


@pytest.mark.slow
def test_sgcd_with_lambda_zero_gives_exactly_the_grpo_update():
    model, trajs = tiny_model(), trajectories()
    inputs, feats = step_inputs(model, trajs, teacher_prompts())
    batch = inputs.batch
    advantages = jnp.asarray(np.random.default_rng(3).normal(size=batch.tokens.shape[0]).astype(np.float32))
    credit_batch = CreditBatch(advantages=advantages, student_logprobs=feats["student_logprobs"],
                               teacher_logprobs=feats["teacher_logprobs"], loss_mask=batch.target_mask,
                               step_ids=batch.step_ids, reverse_kl=feats["reverse_kl"])
    sgcd = sgcd_credit(credit_batch, CreditConfig(lam=0.0))
    sgcd_full = sgcd_credit(credit_batch, CreditConfig(lam=1.0))
    grpo = no_credit(credit_batch, CreditConfig())
    assert not np.allclose(sgcd_full.token_advantages, grpo.token_advantages)  # the teacher does matter at λ=1
    p_sgcd = params_after_update(tiny_model(), dataclasses.replace(inputs, token_advantages=sgcd.token_advantages), spec())
    p_grpo = params_after_update(tiny_model(), dataclasses.replace(inputs, token_advantages=grpo.token_advantages), spec())
    for a, b in zip(jax.tree.leaves(p_sgcd), jax.tree.leaves(p_grpo)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("method", ["sgcd", "sdpo"])
def test_with_zero_advantages_only_sdpo_moves_the_policy(method):
    """The gradient check that separates the two: with all-equal rewards (A=0) SGCD's teacher can only
    rescale a zero advantage, so the update is exactly GRPO's (zero); SDPO's teacher is an actor
    target, so the student is still pulled toward it."""
    model, trajs = tiny_model(), trajectories()
    inputs, feats = step_inputs(model, trajs, teacher_prompts())
    batch = inputs.batch
    credit = sgcd_credit(CreditBatch(advantages=jnp.zeros(batch.tokens.shape[0]), student_logprobs=feats["student_logprobs"],
                                     teacher_logprobs=feats["teacher_logprobs"], loss_mask=batch.target_mask,
                                     reverse_kl=feats["reverse_kl"]), CreditConfig())
    inputs = dataclasses.replace(inputs, token_advantages=credit.token_advantages)
    distill = DistillConfig(mode="sampled", coef=1.0) if method == "sdpo" else None
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    _, grads, _ = loss_and_grads(params, graphdef, rest, inputs, spec(distill=distill))
    norm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads))))
    assert (norm == 0.0) if method == "sgcd" else (norm > 1e-4)


@pytest.mark.slow
def test_micro_batch_accumulation_equals_the_full_batch_gradient():
    model, trajs = tiny_model(), trajectories()
    rng = np.random.default_rng(5)
    inputs, _ = step_inputs(model, trajs, teacher_prompts(), micro=8)
    inputs = dataclasses.replace(inputs, token_advantages=jnp.asarray(
        rng.normal(size=inputs.batch.target_mask.shape).astype(np.float32)) * inputs.batch.target_mask)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss8, grads8, _ = loss_and_grads(params, graphdef, rest, inputs, spec(micro=8))
    loss2, grads2, _ = loss_and_grads(params, graphdef, rest, inputs, spec(micro=2))
    np.testing.assert_allclose(loss8, loss2, rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(grads8), jax.tree.leaves(grads2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_non_finite_update_is_skipped_and_counted():
    model, trajs = tiny_model(), trajectories()
    inputs, _ = step_inputs(model, trajs, teacher_prompts())
    bad = inputs.token_advantages.at[0, 6].set(jnp.nan)
    learner = Learner(model, make_optimizer(OptimSpec(learning_rate=1e-2), 10), spec())
    before = jax.tree.map(np.array, learner.params)
    metrics = learner.update(dataclasses.replace(inputs, token_advantages=bad))
    assert metrics["skipped"] == 1.0
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(learner.params)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_trainable_regex_freezes_the_other_parameters():
    """optim.trainable='mlp': only MLP weights move, and they take AdamW's first step exactly."""
    from sgcd_jax.parallel.sharding import path_to_str as param_path

    model, trajs = tiny_model(), trajectories()
    inputs, _ = step_inputs(model, trajs, teacher_prompts())
    inputs = dataclasses.replace(inputs, token_advantages=inputs.batch.target_mask * 3.0)
    optim = OptimSpec(learning_rate=1e-2, trainable="mlp")
    learner = Learner(model, make_optimizer(optim, 10), spec())
    before = jax.tree.map(np.array, learner.params)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    _, grads, _ = loss_and_grads(params, graphdef, rest, inputs, spec())
    learner.update(inputs)
    flat_before = jax.tree_util.tree_flatten_with_path(before)[0]
    flat_grads = jax.tree.leaves(grads)
    flat_after = jax.tree.leaves(learner.params)
    mlp_norm = np.sqrt(sum(float(np.sum(np.square(g))) for (p, _), g in zip(flat_before, flat_grads)
                           if "mlp" in param_path(p)))
    moved = set()
    for (path, old), grad, new in zip(flat_before, flat_grads, flat_after):
        name, new = param_path(path), np.asarray(new)
        if "mlp" not in name:
            np.testing.assert_array_equal(old, new, err_msg=name)
            continue
        # AdamW's first step is lr * g / (|g| + eps) on the (clipped) gradient
        clipped = np.asarray(grad) * min(1.0, 1.0 / mlp_norm)
        np.testing.assert_allclose(new, old - 1e-2 * clipped / (np.abs(clipped) + 1e-8), rtol=1e-4, atol=1e-6)
        moved.add(name.split("/")[-2])
    assert moved == {"gate_proj", "up_proj", "down_proj"}
    with pytest.raises(ValueError, match="matches no parameter"):
        Learner(tiny_model(), make_optimizer(OptimSpec(trainable="nothing_here"), 10), spec())
    # the SFT warm-up trains everything whatever optim.trainable says
    sft = make_optimizer(optim, 10, trainable="")
    state = sft.init(params)
    updates, _ = sft.update(grads, state, params)
    assert all(np.any(np.asarray(u) != 0) for u in jax.tree.leaves(updates))
