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
