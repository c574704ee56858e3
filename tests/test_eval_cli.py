"""``python -m sgcd_jax.eval``: evaluates a run's checkpoint, writes per-task rows and a summary, and
never renders training-only context (credit references, sibling demonstrations, verifier reports)."""

import json
import os

import pytest

from sgcd_jax.config_files import configs_dir, load_config_file
from sgcd_jax.credit.teacher import CREDIT_HEADER, DEMO_HEADER, messages_with_context
from sgcd_jax.models.chat import ChatRenderer
from sgcd_jax.train import train

PRIVILEGED = (CREDIT_HEADER, DEMO_HEADER, "Verifier report", "training only")
TINY = {"run.num_iterations": 0, "run.progress": False, "run.tensorboard": False, "run.report": False,
        "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_layers": 1, "model.num_heads": 2,
        "model.num_kv_heads": 1, "model.head_dim": 16, "env.num_tasks": 8, "env.max_turns": 2,
        "rollout.max_new_tokens": 8, "rollout.max_total_tokens": 768, "sft.steps": 1, "sft.batch_size": 2,
        "sft.num_demos": 4, "optim.micro_batch_size": 2, "eval.num_tasks": 2}


@pytest.fixture
def rendered_texts(monkeypatch):
    seen = []
    original = ChatRenderer.render_text

    def spy(self, messages, tools=None, add_generation_prompt=False):
        text = original(self, messages, tools, add_generation_prompt)
        seen.append(text)
        return text

    monkeypatch.setattr(ChatRenderer, "render_text", spy)
    return seen


@pytest.mark.slow
def test_eval_cli_scores_a_checkpoint_and_renders_no_privileged_context(tmp_path, rendered_texts):
    from sgcd_jax import eval as eval_cli

    cfg = load_config_file(os.path.join(configs_dir(), "sgcd.py"),
                           {**TINY, "run.workdir": str(tmp_path), "run.name": "r"})
    run_dir = train(cfg)["run_dir"]
    rendered_texts.clear()
    eval_cli.main(["--run_dir", run_dir, "--split", "test", "--trials", "2", "--num_tasks", "3"])
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "eval_test", "per_task.jsonl"))]
    summary = json.load(open(os.path.join(run_dir, "eval_test", "summary.json")))
    assert len(rows) == 3 and all(r["trials"] == 2 for r in rows)
    assert summary["num_tasks"] == 3 and "pass_hat_k" in summary
    assert rendered_texts, "the eval rendered nothing — the spy is not on the eval path"
    for text in rendered_texts:
        for marker in PRIVILEGED:
            assert marker not in text


def test_the_spy_does_see_privileged_context_on_the_training_teacher_path(rendered_texts):
    """Positive control: the same check fires on a teacher prompt carrying a credit reference."""
    from sgcd_jax.models import load_tokenizer

    renderer = ChatRenderer(load_tokenizer("smollm2-135m-instruct"))
    messages = [{"role": "system", "content": "policy"}, {"role": "user", "content": "cancel my trip"}]
    renderer.render_text(messages_with_context(messages, f"## {CREDIT_HEADER}\nstep 0: fatal"), None, True)
    assert any(CREDIT_HEADER in text for text in rendered_texts)


@pytest.mark.slow  # ~60 s quiet (2 compiled shapes of a tiny model, 3 episodes)
def test_eval_model_flag_evaluates_any_hf_dir_and_summarises_reasons(tmp_path, capsys):
    """``--model`` (no run dir): an exported tiny model on airline_lite; the eval config, the sampling
    mode, progress and the per-task termination reasons are printed, the budget is set from the env."""
    from flax import nnx

    from sgcd_jax import eval as eval_cli
    from sgcd_jax.models import Decoder, ModelConfig, load_tokenizer
    from sgcd_jax.models.export import export_hf

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    cfg = ModelConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16, tie_word_embeddings=True, max_position_embeddings=4096,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id)
    model_dir = export_hf(Decoder(cfg, rngs=nnx.Rngs(0)), str(tmp_path / "tiny_hf"), tokenizer=tokenizer)
    out = tmp_path / "eval"
    eval_cli.main(["--model", str(model_dir), "--env", "airline_lite", "--split", "test", "--num_tasks", "3",
                   "--max_turns", "2", "--max_new_tokens", "4", "--tasks_per_batch", "2", "--out", str(out)])
    text = capsys.readouterr().out
    config = json.loads(text.split("eval config: ")[1].split("\n")[0])
    assert config["sampling"] == "greedy (temperature 0)" and config["env"] == "airline_lite"
    # auto budget: longest first prompt (497 SmolLM2 tokens on airline_lite) + 2 turns x 4, in 512s
    assert config["max_total_tokens"] == 512
    assert "eval: 2/3 tasks, 2 episodes" in text and "eval: 3/3 tasks, 3 episodes" in text
    summary = json.load(open(out / "summary.json"))
    assert summary["num_tasks"] == 3 and sum(summary["terminations"].values()) == 3
    assert summary["wall_s_per_episode"] > 0 and summary["sampling"].startswith("greedy")
    rows = [json.loads(line) for line in open(out / "per_task.jsonl")]
    assert all(len(r["terminations"]) == 1 for r in rows)
    assert "episodes ended by:" in text and rows[0]["task_id"] in text


def test_eval_requires_a_run_dir_or_a_model():
    from sgcd_jax import eval as eval_cli

    with pytest.raises(SystemExit):
        eval_cli.main(["--split", "test"])
