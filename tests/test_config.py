"""Config: every shipped config validates; overrides apply; unknown keys and bad values fail early."""

import glob
import json
import os

import pytest

from sgcd_jax import config as config_lib
from sgcd_jax import config_files
from sgcd_jax.train import parse_args

CONFIGS = sorted(glob.glob(os.path.join(config_files.configs_dir(), "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_shipped_config_validates(path):
    cfg = config_files.load_config_file(path)
    assert isinstance(cfg, config_lib.TrainConfig)


def test_no_config_flag_gives_the_quickstart():
    cfg = parse_args(["train"])
    assert cfg.run.name == "quickstart"
    assert cfg.env.name == "airline_lite" and cfg.annotation.name == "contrast"


def test_command_line_overrides_are_applied_and_typed():
    cfg = parse_args(["train", f"--config={config_files.configs_dir()}/grpo.py", "--config.rollout.group_size=8",
                      "--config.optim.learning_rate=0.01", "--config.advantage.norm_by_std=False"])
    assert cfg.rollout.group_size == 8
    assert cfg.optim.learning_rate == 0.01
    assert cfg.advantage.norm_by_std is False
    assert cfg.loss.credit == "none"


def test_unknown_override_key_fails_before_compute():
    with pytest.raises(config_lib.ConfigError, match="rollout.nonexistent"):
        parse_args(["train", "--config.rollout.nonexistent=3"])


def test_bad_value_names_the_key():
    with pytest.raises(config_lib.ConfigError, match="group_size"):
        parse_args(["train", "--config.rollout.group_size=1"])
    with pytest.raises(config_lib.ConfigError, match="annotation.name"):
        parse_args(["train", "--config.annotation.name=gpt"])
    with pytest.raises(config_lib.ConfigError, match=r"credit: .*eps_low_pos must be in \[0, 1\)"):  # the library's check
        parse_args(["train", "--config.credit.eps_low_pos=1.5"])


def test_unknown_key_in_a_config_dict_is_rejected_with_valid_keys_listed():
    with pytest.raises(config_lib.ConfigError, match=r"'credit.lamda'.*closest valid keys: \['credit.lam'"):
        config_lib.from_config_dict({"credit": {"lamda": 0.5}})


def test_unknown_override_names_the_key_and_the_closest_valid_ones():
    with pytest.raises(config_lib.ConfigError, match=r"'credit.beta'.*'credit.beta_pos'"):
        parse_args(["train", "--config.credit.beta=2"])
    # a key under the wrong section: the same leaf in the right one
    with pytest.raises(config_lib.ConfigError, match=r"'loss.beta_pos'.*'credit.beta_pos'"):
        parse_args(["train", "--config.loss.beta_pos=2"])


@pytest.mark.parametrize("kind,key", [("advantage", "advantage"), ("policy_loss", "policy"), ("credit", "credit"),
                                      ("aux_loss", "aux")])
def test_loss_names_are_validated_against_the_registry(kind, key):
    from sgcd_jax.losses import registered

    bad = ["nope"] if key == "aux" else "nope"
    with pytest.raises(config_lib.ConfigError, match=rf"loss.{key}=.*registered: {registered(kind)}".replace("[", r"\[")
                       .replace("]", r"\]")):
        config_lib.from_config_dict({"loss": {key: bad}})


def test_every_registered_advantage_is_selectable():
    from sgcd_jax.losses import registered

    for name in registered("advantage"):  # "loop" was rejected by a hard-coded list before
        assert parse_args(["train", f"--config.loss.advantage={name}"]).loss.advantage == name


def test_rlsd_config_is_the_librarys_preset():
    from sgcd_jax.losses import CreditConfig

    cfg = config_files.load_config_file(os.path.join(config_files.configs_dir(), "rlsd.py"))
    assert cfg.credit == CreditConfig.preset("rlsd") and cfg.loss.credit == "sgcd"


def test_readme_credit_override_reaches_the_credit_config():
    cfg = parse_args(["train", f"--config={config_files.configs_dir()}/sgcd.py", "--config.credit.beta_pos=3"])
    assert cfg.credit.beta_pos == 3.0 and cfg.loss.credit == "sgcd"


def test_bad_demo_shortcut_names_the_choices():
    with pytest.raises(config_lib.ConfigError, match=r"sft.demo_shortcut 'lazy'.*'silent'"):
        parse_args(["train", "--config.sft.demo_shortcut=lazy"])
    with pytest.raises(config_lib.ConfigError, match="demo_shortcut_rate"):
        parse_args(["train", "--config.sft.demo_shortcut_rate=1.5"])
    with pytest.raises(config_lib.ConfigError, match="demo_shortcut_rate"):  # a rate with no shortcut does nothing
        parse_args(["train", "--config.sft.demo_shortcut=", "--config.sft.demo_shortcut_rate=0.5"])


def test_wrong_type_is_rejected():
    with pytest.raises(config_lib.ConfigError, match="must be an int"):
        config_lib.from_config_dict({"rollout": {"group_size": "four"}})


def test_sgcd_without_an_annotator_is_rejected():
    with pytest.raises(config_lib.ConfigError, match="credit reference"):
        config_lib.from_config_dict({"loss": {"credit": "sgcd"}, "annotation": {"name": "none"}})


def test_resolved_config_round_trips_and_has_no_secret_keys(tmp_path):
    cfg = config_files.load_config_file(os.path.join(config_files.configs_dir(), "sgcd.py"))
    path = config_lib.save_resolved(cfg, str(tmp_path))
    saved = json.load(open(path))
    assert config_lib.from_config_dict(saved) == cfg
    flat = json.dumps(saved).lower()
    assert "api_key" not in flat and "password" not in flat


# ----------------------------------------------------------------------------- model accelerator knobs
def test_model_accelerator_knobs_parse_from_the_command_line():
    cfg = parse_args(["train", "--config.model.attention_impl=dot_product_attention",
                      "--config.model.remat_policy=save_attention_out"])
    assert (cfg.model.attention_impl, cfg.model.remat_policy) == ("dot_product_attention", "save_attention_out")
    default = parse_args(["train"])
    assert (default.model.attention_impl, default.model.remat_policy) == ("xla", "none")


def test_bad_model_accelerator_knobs_name_the_choices():
    with pytest.raises(config_lib.ConfigError, match=r"model.attention_impl='flash'.*'dot_product_attention'"):
        parse_args(["train", "--config.model.attention_impl=flash"])
    with pytest.raises(config_lib.ConfigError, match=r"model.remat_policy='all'.*'save_attention_out'"):
        parse_args(["train", "--config.model.remat_policy=all"])
    with pytest.raises(config_lib.ConfigError, match="bfloat16"):  # cuDNN attention has no fp32 kernel
        parse_args(["train", "--config.model.attention_impl=cudnn"])
    cfg = parse_args(["train", "--config.model.attention_impl=cudnn", "--config.model.dtype=bfloat16"])
    assert cfg.model.attention_impl == "cudnn"


def test_built_models_carry_the_accelerator_knobs(tmp_path):
    """source='tiny' builds its ModelConfig with them; a loaded checkpoint gets them replaced in its config."""
    from sgcd_jax.integration import build_model, export_model
    spec = config_lib.ModelSpec(attention_impl="dot_product_attention", remat_policy="dots", num_layers=1)
    model, tokenizer = build_model(spec, seed=0)
    assert (model.cfg.attention_impl, model.cfg.effective_remat_policy) == ("dot_product_attention", "dots")
    export_model(model, tokenizer, str(tmp_path))
    loaded, _ = build_model(config_lib.ModelSpec(source=str(tmp_path), attention_impl="auto",
                                                 remat_policy="full"), seed=0)
    assert (loaded.cfg.attention_impl, loaded.cfg.remat_policy) == ("auto", "full")
    assert loaded.cfg.num_layers == 1 and loaded.cfg.hidden_size == spec.hidden_size  # the checkpoint's own dims


def test_pipelined_annotation_allows_any_temperature_but_not_truncated_sampling():
    """The delayed update's π_old is the sampler's log-probs: equal to the learner's tempered logprobs
    at any temperature, but not under top-p / top-k truncation."""
    from sgcd_jax.train import _check_pipelining

    assert _check_pipelining(parse_args(["train", "--config.annotation.asynchronous=True",
                                         "--config.rollout.temperature=0.7"]))
    assert not _check_pipelining(parse_args(["train", "--config.annotation.asynchronous=False"]))
    for flag in ("--config.rollout.top_p=0.9", "--config.rollout.top_k=20"):
        with pytest.raises(config_lib.ConfigError, match="top_p=1 and rollout.top_k=0"):
            _check_pipelining(parse_args(["train", "--config.annotation.asynchronous=True", flag]))
