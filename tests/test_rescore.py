"""rescore: stored credit weights are reproduced exactly; overrides change exactly what they should."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from sgcd_jax import rescore
from sgcd_jax.losses import CreditBatch, CreditConfig, sgcd_credit
from sgcd_jax.data.store import RolloutStore

N, WIDTH, PAD_ROWS = 6, 24, 2


def _features(rng):
    lengths = rng.integers(10, WIDTH + 1, N)
    valid = np.arange(WIDTH)[None] < lengths[:, None]
    loss_mask = ((rng.random((N, WIDTH)) < 0.7) & valid).astype(np.int32)
    step_ids = np.where(loss_mask > 0, np.arange(WIDTH)[None] // 6, -1).astype(np.int32)
    student = np.where(valid, -rng.gamma(1.0, 1.0, (N, WIDTH)), 0).astype(np.float32)
    teacher = np.where(valid, student + rng.normal(0, 1.0, (N, WIDTH)), 0).astype(np.float32)
    reverse_kl = np.where(valid, rng.gamma(1.0, 0.3, (N, WIDTH)), 0).astype(np.float32)
    entropy = np.where(valid, rng.gamma(2.0, 0.5, (N, WIDTH)), 0).astype(np.float32)
    advantages = np.array([1.2, -0.7, 0.0, 0.9, -1.1, 0.4], np.float32)
    return lengths, dict(loss_mask=loss_mask, step_ids=step_ids, student_logprobs=student,
                         teacher_logprobs=teacher, reverse_kl=reverse_kl, entropy=entropy), advantages


def _credit(features, advantages, cfg, step, pad_rows=PAD_ROWS):
    """What the trainer records: credit on its packed batch, whose last rows are padding."""
    def pad(x, fill=0):
        return np.concatenate([x, np.full((pad_rows, *x.shape[1:]), fill, x.dtype)])

    batch = CreditBatch(advantages=pad(advantages), student_logprobs=pad(features["student_logprobs"]),
                        teacher_logprobs=pad(features["teacher_logprobs"]),
                        loss_mask=pad(features["loss_mask"].astype(np.float32)),
                        step_ids=pad(features["step_ids"], -1), reverse_kl=pad(features["reverse_kl"]),
                        entropy=pad(features["entropy"]))
    out = jax.jit(sgcd_credit, static_argnums=1)(batch, cfg, step)
    return np.asarray(out.weights)[:N], np.asarray(out.token_advantages)[:N]


@pytest.fixture
def run_dir(tmp_path):
    """A run with two iterations on two processes, recorded the way the trainer records them."""
    rng = np.random.default_rng(0)
    cfg = CreditConfig(granularity="step", entropy_gate="soft", lam_schedule="linear",
                       lam_final=0.2, lam_decay_steps=10)
    for process in (0, 1):
        store = RolloutStore(tmp_path / "rollouts", process_index=process)
        for iteration in (0, 1):
            lengths, features, advantages = _features(rng)
            weights, token_adv = _credit(features, advantages, cfg, step=iteration)
            tokens = dict(features, credit_weights=weights, token_advantages=token_adv,
                          token_ids=rng.integers(0, 100, (N, WIDTH)).astype(np.int32))
            store.append(iteration, task_ids=[f"t{i // 2}" for i in range(N)],
                         group_ids=[f"g{i // 2}" for i in range(N)], lengths=lengths, tokens=tokens,
                         rewards=(advantages > 0).astype(np.float32), advantages=advantages,
                         attrs={"credit_fn": "credit/sgcd", "step": iteration, "padded_rows": N + PAD_ROWS,
                                "credit_config": dataclasses.asdict(cfg)})
    return tmp_path, cfg


def test_original_config_reproduces_stored_weights_bitwise(run_dir):
    path, _ = run_dir
    summary = rescore.main(["--run_dir", str(path), "--require_exact"])
    assert summary["reproduction_exact"] and summary["reproduction_max_abs_diff"] == 0.0
    assert summary["num_segments"] == 4 and summary["num_counted_tokens"] > 0
    assert summary["mean_abs_weight_change"] == 0.0
    assert (path / "rescore" / "original" / "comparison.png").stat().st_size > 1000


def test_override_matches_direct_computation_and_only_touches_its_side(run_dir):
    path, cfg = run_dir
    summary = rescore.main(["--run_dir", str(path), "--credit.beta_pos=3.0", "--tag", "b3"])
    assert summary["mean_abs_weight_change"] > 0.01
    results = rescore.rescore(str(path), {"beta_pos": 3.0})
    stored = np.load(path / "rescore" / "b3" / "weights.npz")
    for result in results:
        np.testing.assert_array_equal(stored[f"p{result.process_index}_it{result.iteration}"],
                                      result.new_weights)
    # Independent recomputation from the fixture's generator for process 0, iteration 0.
    rng = np.random.default_rng(0)
    lengths, features, advantages = _features(rng)
    expected, _ = _credit(features, advantages, dataclasses.replace(cfg, beta_pos=3.0), step=0)
    first = results[0]
    mask = features["loss_mask"] > 0
    np.testing.assert_array_equal(np.where(mask, expected, 1.0), np.where(mask, first.new_weights, 1.0))
    negative_rows = advantages < 0  # β_+ does not act on failed trajectories
    np.testing.assert_array_equal(first.new_weights[negative_rows], first.stored_weights[negative_rows])
    assert not np.array_equal(first.new_weights[advantages > 0], first.stored_weights[advantages > 0])
    written = json.loads((path / "rescore" / "b3" / "comparison.json").read_text())
    assert written["overrides"] == {"beta_pos": 3.0} and len(written["per_iteration"]) == 4


def test_tampered_weights_are_reported_not_reproduced(run_dir):
    path, _ = run_dir
    store = RolloutStore(path / "rollouts", process_index=1, create=False)
    column = store._tokens["credit_weights"]
    first_loss_token = int(np.flatnonzero(np.asarray(store._tokens["loss_mask"].read().result()))[0])
    column[first_loss_token].write(np.float32(1.2345)).result()
    with pytest.raises(SystemExit, match="not reproduced"):
        rescore.main(["--run_dir", str(path), "--require_exact"])


def test_unknown_override_names_the_valid_fields():
    with pytest.raises(ValueError, match="beta_pos"):
        rescore.parse_overrides(["--credit.beta=2"], CreditConfig)
    assert rescore.parse_overrides(["--credit.renormalize=false", "--credit.eta=0"], CreditConfig) == {
        "renormalize": False, "eta": 0.0}


def test_weights_from_the_trainers_credit_step_are_reproduced_bitwise(tmp_path):
    """The trainer's own jitted credit call (trainer/phases._credit on its padded batch, float mask)."""
    from sgcd_jax.trainer import phases as train_parts

    cfg = CreditConfig(granularity="step", lam_schedule="cosine", lam_decay_steps=5, eta=0.3)
    lengths, features, advantages = _features(np.random.default_rng(7))
    pad = lambda x, fill=0: np.concatenate([x, np.full((PAD_ROWS, *x.shape[1:]), fill, x.dtype)])  # noqa: E731
    out = train_parts._credit(CreditBatch(
        advantages=pad(advantages), student_logprobs=pad(features["student_logprobs"]),
        teacher_logprobs=pad(features["teacher_logprobs"]),
        loss_mask=pad(features["loss_mask"].astype(np.float32)), step_ids=pad(features["step_ids"], -1),
        reverse_kl=pad(features["reverse_kl"]), entropy=pad(features["entropy"])), cfg, 3, "sgcd")
    store = RolloutStore(tmp_path / "rollouts")
    store.append(3, task_ids=["t"] * N, group_ids=["g"] * N, lengths=lengths,
                 tokens=dict(features, credit_weights=np.asarray(out.weights)[:N],
                             token_ids=np.zeros((N, WIDTH), np.int32)),
                 rewards=np.zeros(N), advantages=advantages,
                 attrs={"credit_fn": "credit/sgcd", "step": 3, "padded_rows": N + PAD_ROWS,
                        "credit_config": dataclasses.asdict(cfg)})
    summary = rescore.main(["--run_dir", str(tmp_path), "--require_exact"])
    assert summary["reproduction_exact"] and summary["num_counted_tokens"] > 20
