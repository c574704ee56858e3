"""The command line a researcher expects: --help everywhere, --dry_run, unknown keys with suggestions,
and a loss registered in a user's own config file selected by name and actually trained through."""

import glob
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers.tiny_train import TINY_WORLD, coin_flip_rollout

from sgcd_jax import config as config_lib
from sgcd_jax import config_files
from sgcd_jax import train as train_module

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(config_files.configs_dir(), "*.py")))
USER_CONFIG = os.path.join(REPO, "tests", "helpers", "user_loss_config.py")


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_file_passes_dry_run(path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("--dry_run built something")

    monkeypatch.setattr(train_module, "train", no_model)
    train_module.main(["train", f"--config={path}", "--dry_run"])
    printed = json.loads(capsys.readouterr().out)
    assert config_lib.from_config_dict(printed) == config_files.load_config_file(path)


def test_readme_dry_run_command_prints_the_overridden_credit_config():
    """The README's command, as a user types it, from outside the repo root."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "sgcd_jax.train", "--config", os.path.join(REPO, "configs/sgcd.py"),
                          "--config.credit.beta_pos=3", "--dry_run"], capture_output=True, text=True, timeout=120,
                         cwd="/", env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0, out.stderr
    resolved = json.loads(out.stdout)
    assert resolved["credit"]["beta_pos"] == 3.0 and resolved["loss"]["credit"] == "sgcd"
    print(f"dry run took {time.perf_counter() - start:.1f}s")


@pytest.mark.parametrize("module", ["train", "eval", "compare", "rescore", "report", "bench", "memory_plan"])
def test_help_exits_zero_and_says_python_m(module, capsys):
    import importlib

    main = importlib.import_module(f"sgcd_jax.{module}" + (".__main__" if module == "bench" else "")).main
    argv = ["prog", "--help"] if module == "train" else ["--help"]
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    assert code in (0, None)
    out = capsys.readouterr().out
    assert f"python -m sgcd_jax.{module}" in out
    if module == "compare":  # the valid method names are listed
        assert all(name in out for name in ("grpo", "sgcd", "rlsd", "sdpo", "loop"))
    if module == "train":
        assert "credit.beta_pos" in out and "annotation.name" in out


def test_unknown_key_on_the_command_line_exits_with_the_closest_keys(capsys):
    with pytest.raises(SystemExit) as exit_:
        train_module.main(["train", "--config.credit.beta=3", "--dry_run"])
    assert "'credit.beta'" in str(exit_.value.code) and "credit.beta_pos" in str(exit_.value.code)


def test_user_config_file_registers_and_selects_its_own_loss():
    config = config_files.load_config_file(USER_CONFIG)
    assert config.loss.policy == "scaled_ppo"
    from sgcd_jax.losses import registered

    assert "scaled_ppo" in registered("policy_loss")
    config_files.load_config_file(USER_CONFIG)  # loading the same file again is not a name clash


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two tiny train() runs: 125 s on a quiet machine, 690 s under 5-agent CPU contention
def test_training_iteration_through_a_user_registered_zero_loss_leaves_params_unchanged(tmp_path, monkeypatch):
    """One real trainer iteration (rollouts, contrast credit, score, update) with the user's loss scaled
    by 0: the update runs (mixed groups, non-zero advantages) and leaves every parameter bitwise equal;
    the same iteration with the stock PPO moves them."""
    from sgcd_jax import integration
    from sgcd_jax.learner import train_step

    monkeypatch.setattr(integration, "rollout", coin_flip_rollout(integration.rollout))
    moved = {}
    update = train_step.Learner.update

    def recording_update(self, inputs):
        before = jax.tree.map(np.array, self.params)
        metrics = update(self, inputs)
        after = jax.tree.map(np.array, self.params)
        moved[len(moved)] = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(after),
                                                                          jax.tree.leaves(before)))
        return metrics

    monkeypatch.setattr(train_step.Learner, "update", recording_update)
    overrides = {**TINY_WORLD, "run.workdir": str(tmp_path), "run.num_iterations": 1, "run.eval_every": 0,
                 "run.checkpoint_every": 0, "run.report": False, "run.store_rollouts": False, "sft.enabled": False,
                 "eval.num_tasks": 1, "rollout.temperature": 1.0}
    train_module.train(config_files.load_config_file(USER_CONFIG, overrides))
    assert moved == {0: 0.0}
    train_module.train(config_files.load_config_file(USER_CONFIG, {**overrides, "loss.policy": "ppo",
                                                                 "run.name": "stock"}))
    assert moved[1] > 0.0


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_files_start_from_their_base_without_sys_path_edits(path):
    assert "sys.path" not in open(path).read()
