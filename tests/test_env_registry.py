"""Registry and Env-protocol conformance of every registered env."""

from __future__ import annotations

import threading

import pytest

from sgcd_jax.envs import Env, make_factory, make_factory_from_spec
from sgcd_jax.envs.airline_lite import oracle_actions


def test_unknown_env_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match="airline_lite"):
        make_factory("nethack")


@pytest.mark.parametrize("name", ["airline_lite", "tau3_airline"])
def test_factories_make_protocol_envs(name):
    factory = make_factory(name)
    env = factory.make()
    assert isinstance(env, Env) and factory.name == name == env.name
    assert factory.make() is not env
    reset = env.reset(factory.tasks("train")[0])
    assert reset.messages[0]["role"] == "system" and reset.tools


def test_factory_from_config_spec():
    config = pytest.importorskip("sgcd_jax.config")
    spec = config.EnvSpec(name="airline_lite", difficulty="medium", num_tasks=5)
    factory = make_factory_from_spec(spec)
    tasks = factory.tasks(spec.train_split)
    assert len(tasks) == 5 and all(t.payload["difficulty"] == "medium" for t in tasks)


def test_lite_factory_is_thread_safe():
    factory = make_factory("airline_lite", difficulty="mixed", num_tasks=40, seed=5)
    rewards, lists = [], []

    def worker():
        tasks = factory.tasks("train")
        lists.append([t.task_id for t in tasks])
        for task in tasks:
            env = factory.make()
            env.reset(task)
            for action in oracle_actions(task):
                if env.step(action).done:
                    break
            rewards.append(env.reward())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(rewards) == 160 and set(rewards) == {1.0} and all(ids == lists[0] for ids in lists)
