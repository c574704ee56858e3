"""The trainer's rollout + credit store: a tiny SGCD run (coin-flip verifier so groups are mixed and
credit weights are not all 1) writes every iteration to run_dir/rollouts; what is stored matches the
rollouts the trainer saw, and ``python -m sgcd_jax.rescore --require_exact`` recomputes the stored
credit weights bit for bit from the stored features."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers.tiny_train import TINY_WORLD, coin_flip_rollout

from sgcd_jax.config_files import configs_dir, load_config_file
from sgcd_jax.losses.credit import CreditConfig, lam_at
from sgcd_jax.data.store import RolloutStore
from sgcd_jax.train import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {**TINY_WORLD, "run.num_iterations": 2, "run.eval_every": 0, "run.checkpoint_every": 0, "run.report": False,
        "sft.steps": 1, "sft.batch_size": 2, "sft.num_demos": 8, "eval.num_tasks": 1}


@pytest.mark.slow
def test_tiny_run_store_is_readable_and_rescore_reproduces_weights_exactly(tmp_path, monkeypatch):
    from sgcd_jax import integration

    seen = {}

    def remember(traj):
        seen[(traj.group_id, traj.sample_index)] = traj

    monkeypatch.setattr(integration, "rollout", coin_flip_rollout(integration.rollout, remember))
    cfg = load_config_file(os.path.join(configs_dir(), "sgcd.py"),
                           {**TINY, "run.workdir": str(tmp_path), "run.name": "stored"})
    run_dir = train(cfg)["run_dir"]

    store = RolloutStore(os.path.join(run_dir, "rollouts"), 0, create=False)
    assert store.iterations == [0, 1]
    assert store.num_trajectories == 2 * 2 * 2  # iterations × tasks × siblings (seen also holds eval rollouts)
    any_weight_differs = False
    for it in store.iterations:
        rows = store.read_iteration(it)
        assert rows.attrs["credit_fn"] == "credit/sgcd" and rows.attrs["step"] == it
        assert rows.attrs["padded_rows"] >= rows.num_trajectories
        for i, (group_id, sample_index) in enumerate(zip(rows.group_ids, rows.trajectories["sample_index"])):
            traj = seen[(group_id, int(sample_index))]
            size = len(traj.token_ids) - 1
            assert rows.task_ids[i] == traj.task_id
            assert int(rows.lengths[i]) == size
            assert int(rows.trajectories["prompt_len"][i]) == traj.prompt_len
            np.testing.assert_array_equal(rows.tokens["token_ids"][i, :size], traj.token_ids[1:])
            np.testing.assert_array_equal(rows.tokens["loss_mask"][i, :size], traj.loss_mask[1:])
            np.testing.assert_array_equal(rows.tokens["step_ids"][i, :size], traj.step_ids[1:])
            np.testing.assert_allclose(rows.tokens["sampler_logprobs"][i, :size], traj.sampler_logprobs[1:])
            assert rows.trajectories["reward"][i] == traj.reward
        mask = rows.tokens["loss_mask"] > 0
        # GRPO advantages of a {0, 1} pair are ±1/std-ish: signs follow the reward
        adv = rows.trajectories["advantage"]
        assert np.all(np.sign(adv) == np.where(rows.trajectories["reward"] > 0, 1, -1))
        weights = rows.tokens["credit_weights"][mask]
        assert np.all(np.isfinite(weights)) and np.all(weights > 0)
        any_weight_differs |= bool(np.ptp(weights) > 0)
        # Ã = A · ((1 − λ) + λ · w) on loss tokens
        lam = float(lam_at(it, CreditConfig(**rows.attrs["credit_config"])))
        assert lam > 0
        expected = adv[:, None] * ((1 - lam) + lam * rows.tokens["credit_weights"])
        np.testing.assert_allclose(rows.tokens["token_advantages"][mask], expected[mask], rtol=1e-5, atol=1e-6)
    assert any_weight_differs, "credit weights all equal: the test would not catch a wrong reproduction"

    out = subprocess.run([sys.executable, "-m", "sgcd_jax.rescore", "--run_dir", run_dir, "--require_exact"],
                         cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["reproduction_exact"] is True and summary["reproduction_max_abs_diff"] == 0.0
    # a real override changes weights (positive control for the comparison)
    out = subprocess.run([sys.executable, "-m", "sgcd_jax.rescore", "--run_dir", run_dir, "--credit.beta_pos=3.0",
                          "--credit.beta_neg=3.0"], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["mean_abs_weight_change"] > 0


def test_store_rollouts_knob_defaults_on_and_can_be_turned_off(tmp_path):
    from sgcd_jax.trainer import phases as train_parts

    on = load_config_file(os.path.join(configs_dir(), "grpo.py"), {"run.workdir": str(tmp_path), "run.name": "a"})
    off = load_config_file(os.path.join(configs_dir(), "grpo.py"),
                           {"run.workdir": str(tmp_path), "run.name": "b", "run.store_rollouts": False})
    assert on.run.store_rollouts and train_parts.open_rollout_store(on) is not None
    assert train_parts.open_rollout_store(off) is None
    assert not os.path.exists(os.path.join(tmp_path, "b", "rollouts"))
