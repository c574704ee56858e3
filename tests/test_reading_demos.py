"""Teaching the teacher to read (trainer/reading_demos.py): the compact reference format, one domain token
per line, reading rows that target the oracle's conversation under a success's and a failure's reference,
and the warm-up batch that mixes them in at ``sft.reference_rate``."""

import os

import numpy as np
import pytest

from sgcd_jax import config_files
from sgcd_jax import integration
from sgcd_jax.credit.schema import CreditReference, SiblingCredit, StepCredit, Verdict
from sgcd_jax.credit.teacher import (CREDIT_HEADER, compact_reference_vocabulary, render_credit_text)
from sgcd_jax.trainer import reading_demos

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "quickstart.py")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("reading"))
    config = config_files.load_config_file(CONFIG, {"run.workdir": workdir, "sft.num_demos": 12, "env.num_tasks": 16})
    env_factory = integration.build_env(config.env)
    _, tokenizer = integration.build_model(config.model, seed=0, run_dir=config.run_dir, env_factory=env_factory,
                                           train_split=config.env.train_split)
    return config, env_factory, tokenizer, integration.ChatAdapter(tokenizer)


def _traj(sample_index, num_steps):
    from sgcd_jax.rollout.trajectory import Step, Trajectory

    steps = [Step(index=k, text="", tool_calls=[], observations=[]) for k in range(num_steps)]
    return Trajectory(task_id="t", group_id="g", sample_index=sample_index, token_ids=np.zeros(4, np.int32),
                      loss_mask=np.zeros(4, np.int32), step_ids=np.zeros(4, np.int32),
                      sampler_logprobs=np.zeros(4, np.float32), prompt_len=1, messages=[], steps=steps)


def test_compact_reference_lists_own_steps_only():
    reference = CreditReference(summary="s", siblings=[
        SiblingCredit(sample_index=0, steps=[StepCredit(step=1, verdict=Verdict.HELPFUL, reason="r")]),
        SiblingCredit(sample_index=1, steps=[StepCredit(step=2, verdict=Verdict.FATAL, reason="r")])])
    text = render_credit_text(reference, _traj(1, 3), style="compact")
    assert text.splitlines() == [f"## {CREDIT_HEADER}", "step 0 neutral", "step 1 neutral", "step 2 fatal"]
    assert render_credit_text(reference, _traj(0, 2), style="compact").splitlines()[1:] == [
        "step 0 neutral", "step 1 helpful"]
    with pytest.raises(ValueError, match="compact"):
        render_credit_text(reference, _traj(0, 2), style="short")


def test_each_compact_line_is_one_domain_token(world):
    _, _, tokenizer, _ = world
    for line in compact_reference_vocabulary(6):
        assert len(tokenizer(line, add_special_tokens=False)["input_ids"]) == 1, line
    assert len(tokenizer("step 10 harmful", add_special_tokens=False)["input_ids"]) == 1


def test_reading_rows_target_the_oracle_under_both_siblings_references(world):
    config, env_factory, tokenizer, chat = world
    rows = reading_demos.reading_demonstrations(env_factory, chat, config)
    demos = {d.task_id: d for d in integration.demonstrations(
        env_factory, chat, config_files.load_config_file(CONFIG, {"sft.num_demos": 12, "env.num_tasks": 16,
                                                                  "sft.demo_shortcut_rate": 0.0}))}
    assert rows and {r.group_id.rsplit("/", 1)[-1] for r in rows} == {"0", "1"}
    flagged = 0
    for row in rows:
        oracle = demos[row.task_id]  # the target is the oracle's conversation, token for token
        np.testing.assert_array_equal(row.token_ids[row.prompt_len:], oracle.token_ids[oracle.prompt_len:])
        np.testing.assert_array_equal(row.loss_mask[row.prompt_len:], oracle.loss_mask[oracle.prompt_len:])
        prompt = tokenizer.decode(row.token_ids[:row.prompt_len])
        assert CREDIT_HEADER in prompt and row.prompt_len > oracle.prompt_len
        lines = [line for line in prompt.splitlines() if line.startswith("step ")]
        if row.group_id.endswith("/1"):  # the failed shortcut's own reference names where it went wrong
            flagged += any(line.split()[-1] in ("harmful", "fatal") for line in lines)
        else:
            assert not any(line.split()[-1] in ("harmful", "fatal") for line in lines), prompt
    assert flagged == sum(r.group_id.endswith("/1") for r in rows)


def test_sft_batch_mixes_reading_rows_at_the_rate(world):
    config, _, _, _ = world
    demos, reading = [f"d{i}" for i in range(5)], [f"r{i}" for i in range(3)]
    orders = (np.arange(5), np.arange(3))
    batch = reading_demos.sft_batch(0, demos, reading, config, orders)  # rate 0.25 of 8: 6 demos, 2 reading
    assert batch == ["d0", "d1", "d2", "d3", "d4", "d0", "r0", "r1"]
    assert reading_demos.sft_batch(1, demos, reading, config, orders)[-2:] == ["r2", "r0"]
    # rate 0 (or no rows): the plain warm-up's batches exactly
    assert reading_demos.sft_batch(1, demos, [], config, orders) == ["d3", "d4", "d0", "d1", "d2", "d3", "d4", "d0"]


_TRAIN = """
import sys, types
from sgcd_jax.credit.teacher import compact_reference_vocabulary
from sgcd_jax.data.domain_tokenizer import train_domain_tokenizer
template = types.SimpleNamespace(chat_template="{{ messages }}")
tok = train_domain_tokenizer(["flight HAT192 is on time"] * 20, 300, template, compact_reference_vocabulary(6))
sys.stdout.write(str(sorted(tok.get_vocab().items())))
"""


def test_domain_vocabulary_does_not_depend_on_the_hash_seed():
    """Added tokens of equal length were ordered by a set's iteration order: another vocabulary per process."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    vocabs = [subprocess.run([sys.executable, "-c", _TRAIN], capture_output=True, text=True, check=True, cwd=root,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2", "3")]
    assert vocabs[0] and vocabs[0] == vocabs[1] == vocabs[2]


def test_rotated_control_moves_each_verdict_to_the_previous_step():
    from sgcd_jax.trainer.teacher_context import rotated

    verdicts = [Verdict.HELPFUL, Verdict.NEUTRAL, Verdict.HARMFUL]
    reference = CreditReference(summary="s", siblings=[SiblingCredit(sample_index=0, steps=[
        StepCredit(step=k, verdict=v, reason=f"r{k}") for k, v in enumerate(verdicts)])])
    control = rotated(reference)
    assert [s.verdict for s in control.siblings[0].steps] == [Verdict.NEUTRAL, Verdict.HARMFUL, Verdict.HELPFUL]
    assert [s.step for s in control.siblings[0].steps] == [0, 1, 2]
    assert [s.verdict for s in reference.siblings[0].steps] == verdicts  # the annotator's reference is untouched
    assert render_credit_text(control, _traj(0, 3), style="compact").splitlines()[1:] == [
        "step 0 neutral", "step 1 harmful", "step 2 helpful"]
    assert rotated(None) is None


def test_compact_quotes_renders_the_success_action_under_its_step():
    reference = CreditReference(summary="s", siblings=[SiblingCredit(sample_index=1, steps=[
        StepCredit(step=0, verdict=Verdict.HELPFUL, reason="r"),
        StepCredit(step=1, verdict=Verdict.HARMFUL, reason="r", success_action="Flight HAT185 is on time.")])])
    text = render_credit_text(reference, _traj(1, 2), style="compact_quotes")
    assert text.splitlines() == [f"## {CREDIT_HEADER}", "step 0 helpful", "step 1 harmful",
                                 "success: Flight HAT185 is on time."]
    assert "success:" not in render_credit_text(reference, _traj(1, 2), style="compact")  # compact never quotes


def test_quote_drills_withhold_the_tool_result_so_the_reply_is_only_in_the_quote(world):
    config, env_factory, tokenizer, chat = world
    plain = reading_demos.reading_demonstrations(env_factory, chat, config)
    assert not any(r.group_id.endswith("/drill") for r in plain)  # compact: no quotes, no drills
    quotes = config_files.load_config_file(CONFIG, {"run.workdir": config.run.workdir, "sft.num_demos": 12,
                                                    "env.num_tasks": 16,
                                                    "annotation.reference_format": "compact_quotes"})
    rows = reading_demos.reading_demonstrations(env_factory, chat, quotes)
    drills = [r for r in rows if r.group_id.endswith("/drill")]
    readers = {r.group_id: r for r in rows if not r.group_id.endswith("/drill")}
    assert drills and len(readers) == len(plain)  # the plain rows stay, the drills come on top
    for drill in drills:
        twin = readers[drill.group_id[: -len("/drill")]]
        np.testing.assert_array_equal(drill.token_ids[:drill.prompt_len], twin.token_ids[:twin.prompt_len])
        prompt = tokenizer.decode(drill.token_ids[:drill.prompt_len])
        reply = drill.steps[-1].text.strip()
        assert f"success: {' '.join(reply.split())}" in prompt  # the reply to produce is quoted
        response = tokenizer.decode(drill.token_ids[drill.prompt_len:])
        assert reading_demos.WITHHELD in response and reading_demos.WITHHELD not in tokenizer.decode(
            twin.token_ids[twin.prompt_len:])
        observation = twin.steps[0].observations[0]["content"]
        shown = tokenizer.decode(drill.token_ids[drill.prompt_len:][drill.loss_mask[drill.prompt_len:] == 0])
        assert observation not in shown and observation in tokenizer.decode(  # the tool result is gone ...
            twin.token_ids[twin.prompt_len:][twin.loss_mask[twin.prompt_len:] == 0])
        target = tokenizer.decode(drill.token_ids[np.flatnonzero(drill.loss_mask)])
        assert target == tokenizer.decode(twin.token_ids[np.flatnonzero(twin.loss_mask)])  # ... the targets stay


def test_foreign_quotes_control_swaps_quoted_text_between_groups_only():
    from sgcd_jax.trainer.teacher_context import foreign_quotes

    def ref(*quotes):
        return CreditReference(summary="s", siblings=[SiblingCredit(sample_index=0, steps=[
            StepCredit(step=k, verdict=Verdict.HARMFUL if q else Verdict.HELPFUL, reason="r", success_action=q)
            for k, q in enumerate(quotes)])])

    references = {"a": ref("", "Flight HAT185 is on time."), "b": ref("get_flight_status(HAT001)", ""),
                  "c": None}
    control = foreign_quotes(references)
    assert control["a"].actions(0, 2) == ["", "get_flight_status(HAT001)"]  # b's text, a's place
    assert control["b"].actions(0, 2) == ["Flight HAT185 is on time.", ""]
    assert [s.verdict for s in control["a"].siblings[0].steps] == [s.verdict for s in references["a"].siblings[0].steps]
    assert control["c"] is None and references["a"].actions(0, 2)[1] == "Flight HAT185 is on time."  # untouched
    assert foreign_quotes({"a": references["a"]})["a"] == references["a"]  # a lone group keeps its own
