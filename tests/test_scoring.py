"""The scoring pass against an independent per-row reference (one unpadded forward per conversation,
full-vocabulary softmax): the teacher forward runs on a compact, bucketed batch of only the rows
with a credit reference, and every row's features — rows without a reference and padding rows
included — are the same as scoring each row on its own."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sgcd_jax.losses.vocab import VocabConfig
from sgcd_jax.models import Decoder, ModelConfig
from sgcd_jax.rollout.trajectory import Trajectory
from sgcd_jax.learner.scoring import ScoreSpec, pack, score, score_micro_rows, teacher_plan, to_device

VOCAB = 61
PROMPTS = {1: 3, 4: 12, 5: 9}  # row → teacher prompt length (shorter and longer than the student prompt)


def tiny_model():
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, tie_word_embeddings=True)
    return Decoder(cfg, rngs=nnx.Rngs(0))


def batch_rows(n=7, seed=0):
    """n trajectories of different lengths and prompt lengths, two assistant turns around an observation;
    teacher prompts only for the rows in PROMPTS."""
    rng = np.random.default_rng(seed)
    trajs, prompts = [], []
    for i in range(n):
        prompt_len, length = 4 + i % 3, 15 + 6 * (i % 3)  # few distinct shapes: fewer compiles
        ids = rng.integers(1, VOCAB, length).astype(np.int32)
        mask = np.zeros(length, np.int32)
        mask[prompt_len:prompt_len + 5] = 1
        mask[prompt_len + 8:] = 1
        steps = np.where(mask > 0, (np.arange(length) >= prompt_len + 8).astype(np.int32), -1).astype(np.int32)
        trajs.append(Trajectory(task_id="t", group_id=f"g{i // 4}", sample_index=i % 4, token_ids=ids, loss_mask=mask,
                                step_ids=steps, sampler_logprobs=np.zeros(length, np.float32), prompt_len=prompt_len,
                                messages=[], steps=[], reward=float(i % 2)))
        prompts.append(rng.integers(1, VOCAB, PROMPTS[i]).astype(np.int32) if i in PROMPTS else None)
    return trajs, prompts


@nnx.jit
def _log_softmax_of(model, ids):
    """ids [1, L] → log-softmax over the full vocabulary [L, V] of one unpadded conversation."""
    hidden, _ = model(ids, jnp.arange(ids.shape[1])[None], jnp.ones(ids.shape, bool))
    return jax.nn.log_softmax(model.logits(hidden)[0].astype(jnp.float32), axis=-1)


def reference_features(model, traj, prompt):
    """One forward per conversation, no padding, full softmax: features at every target position t
    (predicting token t+1), zero where the token is not a policy token."""
    def log_probs(ids):
        return _log_softmax_of(model, jnp.asarray(ids, jnp.int32)[None])

    ids = np.asarray(traj.token_ids)
    size, targets = len(ids), ids[1:]
    student = np.asarray(log_probs(ids))[:-1]  # [L-1, V]
    out = {"student_logprobs": student[np.arange(size - 1), targets],
           "student_entropy": -(np.exp(student) * student).sum(-1)}
    if prompt is None:
        teacher = student
    else:
        response = ids[traj.prompt_len:]
        teacher_all = np.asarray(log_probs(np.concatenate([prompt, response])))
        shift = len(prompt) - traj.prompt_len
        positions = np.arange(size - 1)
        teacher = teacher_all[np.clip(positions + shift, 0, None)]  # valid where the target is a response token
    out["teacher_logprobs"] = teacher[np.arange(size - 1), targets]
    out["reverse_kl"] = (np.exp(student) * (student - teacher)).sum(-1)
    mask = traj.loss_mask[1:] > 0
    return {k: np.where(mask, v, 0.0) for k, v in out.items()}


@pytest.fixture(scope="module")
def scored():
    model = tiny_model()
    trajs, prompts = batch_rows()
    # rows padded to 8 (one padding row), teacher length fixed at 256 as the trainer fixes it
    host = pack(trajs, prompts, rows_multiple=4, length_multiple=16, min_teacher_length=256)
    batch = to_device(host)
    base = ScoreSpec(VocabConfig(chunk_size=32), with_teacher=True, with_reference=False)
    specs = {"compact": dataclasses.replace(base, teacher_chunk_rows=8),  # one chunk: 3 rows + 5 fill slots, 192 tokens
             "compact_chunks": dataclasses.replace(base, teacher_chunk_rows=2, teacher_length_steps=8,
                                                 teacher_length_ratio=0.5),  # 2 chunks, 64 tokens
             "uncompacted": dataclasses.replace(base, teacher_chunk_rows=0),
             # the student pass in 4 strided micro-batches of 2 rows (optim.score_micro_batch_size)
             "student_micro": dataclasses.replace(base, teacher_chunk_rows=8, student_micro_rows=2)}
    features = {name: jax.tree.map(np.asarray, score(model, None, batch, spec)) for name, spec in specs.items()}
    return model, trajs, prompts, host, features


def test_teacher_plan_counts_chunks_and_picks_the_shortest_ladder_length():
    spec = ScoreSpec(VocabConfig(), True, False, teacher_chunk_rows=8)  # 960 → 768 → 576 → 448
    assert teacher_plan(5, 300, 960, spec) == (1, 448)
    assert teacher_plan(8, 577, 960, spec) == (1, 768)
    assert teacher_plan(9, 768, 960, spec) == (2, 768)
    assert teacher_plan(9, 769, 960, spec) == (2, 960)
    assert teacher_plan(0, 0, 960, spec) == (0, 448)  # at most 3 steps down
    assert teacher_plan(17, 950, 960, spec) == (3, 960)
    small = dataclasses.replace(spec, teacher_chunk_rows=2, teacher_length_steps=8, teacher_length_ratio=0.5)
    assert teacher_plan(3, 40, 256, small) == (2, 64)  # 256 → 128 → 64, never below one 64-token bucket
    assert teacher_plan(3, 40, 256, dataclasses.replace(small, teacher_length_steps=0)) == (2, 256)


def test_the_batch_really_exercises_compaction(scored):
    _, trajs, prompts, host, _ = scored
    count = int(host.has_teacher.sum())
    longest = int(host.teacher_mask[host.has_teacher > 0].sum(1).max())
    assert host.tokens.shape[0] == 8 and count == len(PROMPTS) and host.row_valid[-1] == 0
    assert host.teacher_tokens.shape[1] == 256 and longest == 30
    assert teacher_plan(count, longest, 256, ScoreSpec(VocabConfig(), True, False, teacher_chunk_rows=8)) == (1, 192)
    small = ScoreSpec(VocabConfig(), True, False, teacher_chunk_rows=2, teacher_length_steps=8, teacher_length_ratio=0.5)
    assert teacher_plan(count, longest, 256, small) == (2, 64)  # second chunk: one reference row, one fill slot


@pytest.mark.parametrize("name", ["compact", "compact_chunks", "uncompacted", "student_micro"])
def test_features_match_one_forward_per_row(scored, name):
    model, trajs, prompts, host, features = scored
    feats = features[name]
    for i, (traj, prompt) in enumerate(zip(trajs, prompts)):
        expected = reference_features(model, traj, prompt)
        size = len(traj.token_ids)
        for key, value in expected.items():
            np.testing.assert_allclose(feats[key][i, :size - 1], value, atol=2e-5, rtol=1e-5,
                                       err_msg=f"{name}: row {i} {key}")
            assert not feats[key][i, size - 1:].any(), f"{name}: row {i} {key} nonzero past the conversation"
    for key in expected:  # the padding row
        assert not feats[key][len(trajs):].any(), f"{name}: padding row {key}"


def test_rows_without_reference_get_the_student_exactly(scored):
    _, trajs, prompts, host, features = scored
    no_ref = [i for i, p in enumerate(prompts) if p is None] + [len(trajs)]  # padding row too
    for feats in features.values():
        np.testing.assert_array_equal(feats["teacher_logprobs"][no_ref], feats["student_logprobs"][no_ref])
        np.testing.assert_array_equal(feats["reverse_kl"][no_ref], 0.0)
        assert np.abs(feats["reverse_kl"][sorted(PROMPTS)]).max() > 1e-4  # the references do change the teacher


def test_compact_equals_uncompacted(scored):
    features = scored[-1]
    for name in ("compact", "compact_chunks", "student_micro"):
        for key, value in features["uncompacted"].items():
            np.testing.assert_allclose(features[name][key], value, atol=1e-5, rtol=1e-5, err_msg=f"{name} {key}")


def test_score_micro_rows_divides_the_batch():
    assert score_micro_rows(0, 16) == 0 and score_micro_rows(16, 16) == 0 and score_micro_rows(32, 16) == 0
    assert score_micro_rows(4, 16) == 4 and score_micro_rows(3, 16) == 2 and score_micro_rows(5, 12) == 4


def test_student_micro_batches_score_the_reference_model_too(scored):
    """With a KL reference model, every micro-batch also runs the reference forward: its logprobs equal one pass's
    (the reference here is a second random model, so a swapped or missing pass would differ by O(1))."""
    model, trajs, prompts, host, _ = scored
    ref = Decoder(model.cfg, rngs=nnx.Rngs(1))
    batch = to_device(host)
    spec = ScoreSpec(VocabConfig(chunk_size=32), with_teacher=False, with_reference=True)
    one = jax.tree.map(np.asarray, score(model, ref, batch, spec))
    micro = jax.tree.map(np.asarray, score(model, ref, batch, dataclasses.replace(spec, student_micro_rows=2)))
    assert set(micro) == set(one) and "ref_logprobs" in micro
    assert np.abs(one["ref_logprobs"] - one["student_logprobs"]).max() > 0.1
    for key, value in one.items():
        # measured max |diff| 4.8e-7 (fp32 matmuls of 2 vs 8 rows); the bound is the file's 1e-5
        np.testing.assert_allclose(micro[key], value, atol=1e-5, rtol=1e-5, err_msg=key)
