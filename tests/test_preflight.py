"""Preflight: before any model load, a run fails in seconds with the exact key (and a value) when
its token budget cannot hold the env's prompts, its model dir or its API key is missing; every
shipped recipe passes config validation."""

import glob
import time

import pytest

from sgcd_jax import integration
from sgcd_jax.config import ConfigError
from sgcd_jax.config_files import load_config_file
from sgcd_jax.models import load_tokenizer
from sgcd_jax.preflight import check_budget, check_model_source, check_secrets, longest_prompt, preflight

QWEN = "configs/tau3_airline_qwen3_4b.py"


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


def test_every_shipped_recipe_passes_validation(monkeypatch):
    monkeypatch.setenv("QWEN3_4B_DIR", "/nonexistent/qwen3")  # validation does not touch the filesystem
    paths = sorted(glob.glob("configs/*.py"))
    assert len(paths) >= 15
    for path in paths:
        load_config_file(path)


def test_budget_check_fires_on_the_old_tau3_recipe_budget(smollm2_tokenizer):
    # The τ³ recipe at the budget the issue's run had (2,048 tokens); SmolLM2's tokenizer stands in
    # for Qwen's (same order of tokens per character on this English + JSON text).
    config = load_config_file(QWEN, {"rollout.max_total_tokens": 2048, "env.user": "scripted"})
    factory = integration.build_env(config.env)
    longest, task_id, count = longest_prompt(factory, ["train", "test"], smollm2_tokenizer)
    assert count == 50 and 3000 < longest < 8000, longest  # τ³ policy + 14 tool schemas
    with pytest.raises(ConfigError) as error:
        check_budget(config, factory, smollm2_tokenizer)
    message = str(error.value)
    assert "rollout.max_total_tokens=2048" in message and f"({longest} tokens" in message
    suggested = int(message.split("--config.rollout.max_total_tokens=")[1].split()[0])
    assert suggested >= longest + config.rollout.max_new_tokens and suggested % 1024 == 0
    print(f"\n{message}")
    # the suggested value passes; the shipped 16,384 passes
    ok = load_config_file(QWEN, {"rollout.max_total_tokens": suggested, "env.user": "scripted"})
    assert check_budget(ok, factory, smollm2_tokenizer)["longest_prompt_tokens"] == longest
    assert check_budget(load_config_file(QWEN, {"env.user": "scripted"}), factory, smollm2_tokenizer)


def test_missing_model_dir_and_api_key_fail_in_seconds_naming_the_variable(monkeypatch):
    monkeypatch.delenv("QWEN3_4B_DIR", raising=False)
    monkeypatch.delenv("QWEN3_5_4B_DIR", raising=False)
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    for path, var in ((QWEN, "QWEN3_4B_DIR"), ("configs/tau3_airline_qwen3_5_4b.py", "QWEN3_5_4B_DIR"),
                      ("configs/appworld_qwen3_4b.py", "QWEN3_4B_DIR")):
        start = time.perf_counter()
        with pytest.raises(ConfigError, match=rf"model.source=.*\${var}.*--config.model.source"):
            check_model_source(load_config_file(path))
        assert time.perf_counter() - start < 5
    config = load_config_file(QWEN, {"model.source": "smollm2-135m-instruct"})
    with pytest.raises(ConfigError, match=r"env.user='gemini' and annotation.name='gemini' needs \$GEMINI_API_KEY"):
        check_secrets(config)
    monkeypatch.setenv("GEMINI_API_KEY", "x")
    check_secrets(config)


def test_preflight_of_a_fitting_run_reports_what_it_measured():
    config = load_config_file("configs/quickstart.py")
    lines = []
    measured = preflight(config, integration.build_env(config.env), log=lines.append)
    if config.model.tokenizer == "domain-bpe":
        assert measured == {}
    else:
        assert measured["longest_prompt_tokens"] + config.rollout.max_new_tokens <= config.rollout.max_total_tokens
        assert "longest first prompt" in lines[0]
