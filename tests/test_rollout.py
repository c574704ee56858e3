"""RolloutEngine with a scripted policy and the real SmolLM2 chat template: loss mask / step ids on a
3-turn tool conversation, no re-tokenisation drift, error observations, and envs that raise, hang or
return garbage. A tiny random Decoder checks the KV-cache path end to end against a cache-free forward."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sgcd_jax.envs.base import EnvReset, EnvStep, Task
from sgcd_jax.models import Decoder, ModelConfig, load_tokenizer
from sgcd_jax.models.chat import ChatRenderer
from sgcd_jax.rollout.engine import RolloutConfig, RolloutEngine
from sgcd_jax.rollout.text import trajectory_to_text
from sgcd_jax.sampling.rules import SamplingParams
from sgcd_jax.sampling.session import Sampler, TurnOutput

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL_PARIS = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL_BAD = '<tool_call>\n{"name": "get_weather", "arguments": {"city": 5}}\n</tool_call>'
ANSWER = "It is sunny in Paris today."


@pytest.fixture(scope="module")
def renderer():
    return ChatRenderer(load_tokenizer("smollm2-135m-instruct"))


class WeatherEnv:
    name = "weather"

    def __init__(self, mode="ok"):
        self.mode, self.steps, self.final = mode, 0, ""

    def reset(self, task):
        return EnvReset(messages=[{"role": "system", "content": "You answer weather questions."},
                                  {"role": "user", "content": "Weather in Paris?"}], tools=TOOLS)

    def step(self, action):
        self.steps += 1
        if self.mode == "raise":
            raise RuntimeError("database exploded")
        if self.mode == "hang":  # blocks until the test lets it go (after the run has returned)
            HANG_RELEASE.wait(120.0)
            HANG_RETURNED.set()
        if self.mode == "garbage":
            return "not an EnvStep"
        if action.tool_calls:
            return EnvStep([{"role": "tool", "name": c.name, "content": '{"sky": "sunny"}'} for c in action.tool_calls])
        self.final = action.content
        return EnvStep([{"role": "user", "content": "###STOP###"}], done=True, termination="user_stop")

    def reward(self):
        return float("sunny" in self.final)

    def info(self):
        return {"steps": self.steps}


HANG_RELEASE, HANG_RETURNED = threading.Event(), threading.Event()  # a "hang" env.step waits on HANG_RELEASE


class Factory:
    name = "weather"

    def make(self):
        return WeatherEnv()

    def tasks(self, split):
        return []


class ModeFactory(Factory):
    def make(self):  # mode from the task id is only known at reset, so wrap reset
        env = WeatherEnv()
        original_reset = env.reset

        def reset(task):
            env.mode = task.task_id
            return original_reset(task)
        env.reset = reset
        return env


class ScriptedPolicy:
    """Returns pre-tokenised assistant turns per episode in order; records the chunks it was fed."""

    def __init__(self, turns_ids):
        self.turns_ids, self.fed = turns_ids, []

    def session(self):
        policy, counters = self, {}

        class Session:
            def step(self, chunks, *, max_new_tokens, rng, stop_strings=()):
                policy.fed.append(dict(chunks))
                outs = {}
                for key in chunks:
                    i = counters.get(key, 0)
                    counters[key] = i + 1
                    ids = np.asarray(policy.turns_ids[min(i, len(policy.turns_ids) - 1)], np.int32)
                    outs[key] = TurnOutput(ids, -0.5 - np.arange(len(ids), dtype=np.float32), "stop_token")
                return outs
        return Session()

    def generate(self, prompts, *, max_new_tokens, rng, stop_strings=()):
        self.fed.append({"generate": [list(p) for p in prompts]})
        return [TurnOutput(np.asarray(self.turns_ids[-1], np.int32), np.zeros(len(self.turns_ids[-1])), "stop_token")
                for _ in prompts]


def scripted_turns(renderer, split_first_word=False):
    eot = renderer.end_of_turn_id
    encode = renderer.encode
    first = encode(CALL_PARIS) if not split_first_word else encode(CALL_PARIS[:30]) + encode(CALL_PARIS[30:])
    return [first + [eot], encode(CALL_BAD) + [eot], encode(ANSWER) + [eot]]


def test_three_turn_loss_mask_step_ids_and_no_retokenisation_drift(renderer):
    turns = scripted_turns(renderer, split_first_word=True)
    assert turns[0][:-1] != renderer.encode(CALL_PARIS), "the test needs a non-canonical tokenisation"
    engine = RolloutEngine(ScriptedPolicy(turns), renderer, RolloutConfig(max_turns=5))
    (traj,) = engine.run([Task("t0", "weather")], Factory(), group_size=1, rng=jax.random.key(0))
    assert traj.termination == "user_stop" and traj.reward == 1.0 and traj.num_steps == 3
    # generated ids verbatim, in order, with their step index and logprobs
    assert traj.token_ids[traj.loss_mask == 1].tolist() == sum(turns, [])
    for step, ids in enumerate(turns):
        assert traj.token_ids[traj.step_ids == step].tolist() == ids
        np.testing.assert_allclose(traj.sampler_logprobs[traj.step_ids == step], -0.5 - np.arange(len(ids)))
    assert (traj.step_ids[traj.loss_mask == 0] == -1).all() and (traj.sampler_logprobs[traj.loss_mask == 0] == 0).all()
    # everything else is exactly the template: prompt, then observation suffixes between turns
    messages = traj.messages
    assert traj.token_ids[:traj.prompt_len].tolist() == renderer.prompt_ids(messages[:2], TOOLS)
    assert renderer.tokenizer.decode(traj.token_ids.tolist()) + "\n" == renderer.render_text(messages[:-1], TOOLS)
    # the first observation is the env result, the second the rejected call's error (env not called)
    assert traj.steps[0].observations[0]["content"] == '{"sky": "sunny"}'
    assert "arguments.city should be string" in traj.steps[1].observations[0]["content"]
    assert traj.info == {"steps": 2} and traj.metrics["bad_arguments"] == 1 and traj.metrics["tool_calls"] == 2


def test_canonical_ids_equal_a_full_re_render(renderer):
    turns = scripted_turns(renderer)
    (traj,) = RolloutEngine(ScriptedPolicy(turns), renderer).run([Task("t0", "weather")], Factory(), 1,
                                                                 jax.random.key(0))
    full = renderer.prompt_ids(traj.messages[:-1], TOOLS, add_generation_prompt=False)
    assert traj.token_ids.tolist() == full[:len(traj.token_ids)] and len(full) == len(traj.token_ids) + 1  # "\n"


def test_policy_is_fed_only_new_ids_each_turn(renderer):
    policy = ScriptedPolicy(scripted_turns(renderer))
    (traj,) = RolloutEngine(policy, renderer).run([Task("t0", "weather")], Factory(), 1, jax.random.key(0))
    fed = [chunk[(0, 0)] for chunk in policy.fed if chunk]
    generated = [traj.token_ids[traj.step_ids == s].tolist() for s in range(3)]
    stream = fed[0] + generated[0] + fed[1] + generated[1] + fed[2] + generated[2]
    assert stream == traj.token_ids.tolist()


def test_broken_envs_never_kill_the_batch(renderer):
    tasks = [Task(mode, "weather") for mode in ("raise", "hang", "garbage", "ok")]
    engine = RolloutEngine(ScriptedPolicy(scripted_turns(renderer)), renderer,
                           RolloutConfig(env_timeout_s=0.5, max_turns=5))
    HANG_RELEASE.clear(), HANG_RETURNED.clear()
    try:
        trajs = engine.run(tasks, ModeFactory(), group_size=2, rng=jax.random.key(0))
        # the hung env.step calls are still blocked (they return only once released): the run did not wait
        # for them. Behaviour, not wall time: a timing bound flaked on the shared CPU.
        assert not HANG_RETURNED.is_set(), "a hung env blocked the run"
    finally:
        HANG_RELEASE.set()
    by_task = {(t.task_id, t.sample_index): t for t in trajs}
    assert len(trajs) == 8
    for g in range(2):
        assert by_task[("raise", g)].termination == "env_error"
        assert "database exploded" in by_task[("raise", g)].info["rollout_error"]
        assert by_task[("hang", g)].termination == "env_timeout"
        assert by_task[("garbage", g)].termination == "env_error"
        assert by_task[("ok", g)].termination == "user_stop" and by_task[("ok", g)].reward == 1.0
        assert all(t.reward == 0.0 for (task, _), t in by_task.items() if task != "ok")


def test_max_turns_ends_an_endless_tool_caller(renderer):
    turns = scripted_turns(renderer)[:1]  # always calls the tool
    (traj,) = RolloutEngine(ScriptedPolicy(turns), renderer, RolloutConfig(max_turns=4)).run(
        [Task("t0", "weather")], Factory(), 1, jax.random.key(0))
    assert traj.termination == "max_turns" and traj.num_steps == 4 and traj.step_ids.max() == 3


def test_trajectory_text_shows_steps_calls_and_rejections(renderer):
    (traj,) = RolloutEngine(ScriptedPolicy(scripted_turns(renderer)), renderer).run(
        [Task("t0", "weather")], Factory(), 1, jax.random.key(0))
    text = trajectory_to_text(traj)
    assert "[assistant · step 0]" in text and '→ get_weather({"city": "Paris"})' in text
    assert "! rejected tool call" in text and ANSWER in text and "reward 1" in text
    assert "You answer weather questions" not in text  # system prompt hidden by default


def test_real_sampler_rollout_logprobs_match_cache_free_forward(renderer):
    """Tiny random Decoder over the SmolLM2 vocab: every generated token's sampler logprob equals the
    log-softmax of a cache-free forward over the final trajectory ids (KV continuation is exact)."""
    cfg = ModelConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, max_position_embeddings=4096)
    model = Decoder(cfg, rngs=nnx.Rngs(1))
    sampler = Sampler(model, params=SamplingParams(temperature=1.0), stop_token_ids=renderer.stop_token_ids(),
                      decode_steps_per_chunk=8, min_cache_len=512)
    engine = RolloutEngine(sampler, renderer, RolloutConfig(max_turns=3, max_tokens_per_turn=6))
    trajs = engine.run([Task("a", "weather"), Task("b", "weather")], Factory(), group_size=2, rng=jax.random.key(3))
    assert len(trajs) == 4
    for traj in trajs:
        assert traj.termination in ("max_turns", "user_stop") and traj.loss_mask.sum() > 0
        ids = jnp.asarray(traj.token_ids)[None]
        hidden, _ = model(ids, jnp.arange(ids.shape[1])[None], jnp.ones_like(ids, bool))
        logp = jax.nn.log_softmax(model.logits(hidden)[0], -1)  # [T, V]
        where = np.flatnonzero(traj.loss_mask)
        expected = np.asarray(logp[where - 1, traj.token_ids[where]])
        np.testing.assert_allclose(traj.sampler_logprobs[where], expected, atol=1e-4)
    # siblings share the prompt prefill
    assert trajs[0].token_ids[:trajs[0].prompt_len].tolist() == trajs[1].token_ids[:trajs[1].prompt_len].tolist()


def test_chat_generate_renders_messages_and_strips_end_of_turn(renderer):
    policy = ScriptedPolicy(scripted_turns(renderer))
    engine = RolloutEngine(policy, renderer)
    messages = [{"role": "system", "content": "You are a customer."}, {"role": "user", "content": "Hello"}]
    assert engine.generate(messages) == ANSWER
    assert policy.fed[-1]["generate"] == [renderer.prompt_ids(messages, None)]


def test_episode_tokens_depend_on_task_slot_not_on_batch(renderer):
    """Multi-host rollouts: host A runs slot 0, host B slot 1; together they sample what one host
    running both slots samples (per-episode keys from (rng, slot, sibling))."""
    cfg = ModelConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, max_position_embeddings=4096)
    sampler = Sampler(Decoder(cfg, rngs=nnx.Rngs(1)), params=SamplingParams(temperature=1.0),
                      stop_token_ids=renderer.stop_token_ids(), decode_steps_per_chunk=8, min_cache_len=512)
    config = RolloutConfig(max_turns=2, max_tokens_per_turn=6)
    tasks = [Task("a", "weather"), Task("b", "weather")]
    rng = jax.random.key(11)
    both = RolloutEngine(sampler, renderer, config).run(tasks, Factory(), group_size=2, rng=rng)
    split = (RolloutEngine(sampler, renderer, config).run(tasks[1:], Factory(), 2, rng, task_slots=[1])
             + RolloutEngine(sampler, renderer, config).run(tasks[:1], Factory(), 2, rng, task_slots=[0]))
    by_key = {(t.task_id, t.sample_index): t.token_ids.tolist() for t in split}
    assert {(t.task_id, t.sample_index): t.token_ids.tolist() for t in both} == by_key
    assert both[0].token_ids.tolist() != both[1].token_ids.tolist()  # siblings differ
