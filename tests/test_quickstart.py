"""The quickstart's world: config validates; the domain tokenizer makes ids copyable and the boilerplate
short; SFT demonstrations are token-for-token what the rollout engine renders for the same chat."""

import os

import jax
import numpy as np
import pytest

from sgcd_jax import config as config_lib
from sgcd_jax import config_files
from sgcd_jax import integration
from sgcd_jax.trainer import phases as parts
from sgcd_jax.metrics_log import Progress
from sgcd_jax.rollout.engine import RolloutConfig, RolloutEngine
from sgcd_jax.sampling.session import TurnOutput
from sgcd_jax.learner.train_step import Learner, make_optimizer

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "quickstart.py")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("quickstart"))
    config = config_files.load_config_file(CONFIG, {"run.workdir": workdir, "sft.steps": 2, "sft.num_demos": 8,
                                                  "env.num_tasks": 16})
    env_factory = parts.build_env(config.env)
    model, tokenizer = parts.build_model(config.model, seed=0, run_dir=config.run_dir, env_factory=env_factory,
                                         train_split=config.env.train_split)
    return config, env_factory, model, tokenizer, parts.ChatAdapter(tokenizer)


def test_quickstart_config_validates():
    config = config_files.load_config_file(CONFIG)
    assert config.env.name == "airline_lite" and config.sft.enabled and config.loss.credit == "sgcd"
    assert config.rollout.max_new_tokens < config.rollout.max_total_tokens
    with pytest.raises(config_lib.ConfigError):
        config_files.load_config_file(CONFIG, {"rollout.group_sizee": 2})


def test_ids_tokenize_the_same_in_request_and_tool_call(world):
    """The root cause of 0 greedy success: ' HAT192' (request) and '"HAT192' (JSON) were different tokens."""
    _, env_factory, _, tokenizer, _ = world
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    for task in env_factory.tasks("train")[:6]:
        for action in task.payload["actions"]:
            for value in action["arguments"].values():
                value_ids = encode(str(value))
                assert _contains(encode(task.payload["opening"]), value_ids), (task.payload["opening"], value)
                assert _contains(encode(f'{{"x": "{value}"}}'), value_ids)
    assert tokenizer.decode(encode("flight HAT192 on 2024-05-19")) == "flight HAT192 on 2024-05-19"


def test_system_prompt_boilerplate_is_short(world):
    config, env_factory, _, tokenizer, chat = world
    task = env_factory.tasks("train")[0]
    reset = env_factory.make().reset(task)
    ids = chat.render_prompt_ids(reset.messages, reset.tools)
    text = chat.renderer.render_text(reset.messages, reset.tools, add_generation_prompt=True)
    assert tokenizer.decode(ids) == text  # lossless
    assert len(text) > 1500 and len(ids) < 120, (len(text), len(ids))


class ReplayDemo:
    """A TurnGenerator that emits each demonstration's assistant turns verbatim (one demo per task)."""

    def __init__(self, demos_by_task: dict):
        self.demos_by_task = demos_by_task

    def session(self):
        demos, turn = self.demos_by_task, {}

        class Session:
            def step(self, chunks, *, max_new_tokens, rng, stop_strings=()):
                outs = {}
                for key in chunks:  # key = (task index, sibling)
                    demo = demos[key[0]]
                    step = turn.get(key, 0)
                    turn[key] = step + 1
                    ids = demo.token_ids[demo.step_ids == step]
                    outs[key] = TurnOutput(np.asarray(ids, np.int32), np.zeros(len(ids), np.float32), "stop_token")
                return outs
        return Session()


def test_demos_equal_rollout_engine_rendering(world):
    """The rollout engine, fed the demos' assistant ids, renders exactly the demos' token ids and mask
    (prompt, observations, generation prompts): SFT trains on the sequences the policy will see."""
    config, env_factory, _, _, chat = world
    demos = integration.demonstrations(env_factory, chat, config)
    assert len(demos) == 8 and all(len(d.token_ids) <= config.rollout.max_total_tokens for d in demos)
    by_id = {t.task_id: t for t in env_factory.tasks(integration.demo_split(config.env.train_split))}
    assert not set(by_id) & {t.task_id for t in env_factory.tasks(config.env.train_split)}
    tasks = [by_id[d.task_id] for d in demos]
    engine = RolloutEngine(ReplayDemo(dict(enumerate(demos))), chat.renderer, RolloutConfig(
        max_turns=config.env.max_turns, max_tokens_per_turn=config.rollout.max_new_tokens,
        max_total_tokens=config.rollout.max_total_tokens))
    trajectories = engine.run(tasks, env_factory, 1, jax.random.key(0))
    families = set()
    for demo, traj in zip(demos, trajectories):
        assert traj.task_id == demo.task_id and traj.reward == demo.reward, traj.info
        np.testing.assert_array_equal(traj.token_ids, demo.token_ids)
        np.testing.assert_array_equal(traj.loss_mask, demo.loss_mask)
        np.testing.assert_array_equal(traj.step_ids, demo.step_ids)
        assert traj.prompt_len == demo.prompt_len
        # the demo's steps (what the contrast annotator reads) are the engine's: same calls per turn
        assert [[(c.name, c.arguments) for c in st.tool_calls] for st in demo.steps] == \
            [[(c.name, c.arguments) for c in st.tool_calls] for st in traj.steps]
        assert demo.info["fail_reasons"] == traj.info["fail_reasons"]
        families.add(by_id[demo.task_id].payload["family"])
    assert families == {"status", "membership", "cancel_ok"}
    # the quickstart's imperfect demonstrator: some demos end silently (reward 0), the rest are the oracle's
    assert {d.reward for d in demos} == {0.0, 1.0}
    # every demo turn fits the per-turn budget the policy samples under
    assert max(int((d.step_ids == s).sum()) for d in demos for s in range(d.step_ids.max() + 1)) \
        <= config.rollout.max_new_tokens


def test_short_sft_on_demos_lowers_nll(world):
    config, env_factory, model, _, chat = world
    config = config_files.load_config_file(CONFIG, {"run.workdir": config.run.workdir, "sft.steps": 6,
                                                  "sft.num_demos": 8, "env.num_tasks": 16})
    learner = Learner(model, make_optimizer(config.optim, 4), parts.step_spec(config))
    metrics = parts.run_sft(learner, env_factory, chat, config, Progress(False))
    assert metrics["sft/demos"] == 8
    assert np.isfinite(metrics["sft/nll_last"]) and metrics["sft/nll_last"] < metrics["sft/nll_first"]


def _contains(haystack: list[int], needle: list[int]) -> bool:
    n = len(needle)
    return any(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))


@pytest.mark.parametrize("temperature", [0.6, 1.0])
def test_scoring_reproduces_the_sampler_logprobs_at_the_rollout_temperature(world, temperature):
    """π_old from the scoring pass equals what the sampler drew from (logits / rollout.temperature), so
    the first PPO epoch's ratio is exactly 1; scored at temperature 1 instead, a T=0.6 sample differs."""
    import dataclasses

    from sgcd_jax.learner.scoring import ScoreSpec, pack, score

    config, env_factory, _, _, chat = world
    model, _ = parts.build_model(config.model, seed=1, run_dir=config.run_dir, env_factory=env_factory,
                                 train_split=config.env.train_split)  # its own: other tests donate the world's
    config = dataclasses.replace(config, rollout=dataclasses.replace(config.rollout, temperature=temperature,
                                                                     max_new_tokens=16))
    tasks = env_factory.tasks(config.env.train_split)[:2]
    trajectories = integration.rollout(model, chat, env_factory, tasks, 2, jax.random.key(7), config)
    batch = pack(trajectories, pad_id=chat.pad_id)
    mask = np.asarray(batch.target_mask) > 0
    assert mask.sum() > 20
    for vocab, should_match in ((parts.vocab_config(config), True),
                                (dataclasses.replace(parts.vocab_config(config), temperature=1.0), temperature == 1.0)):
        logprobs = np.asarray(score(model, None, batch, ScoreSpec(vocab=vocab, with_teacher=False, with_reference=False))["student_logprobs"])
        gap = np.abs(logprobs - np.asarray(batch.sampler_logprobs))[mask].max()
        assert (gap < 2e-4) == should_match, (vocab.temperature, gap)
    assert parts.step_spec(config).vocab.temperature == temperature  # the update step uses the same logits
