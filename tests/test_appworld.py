"""AppWorld adapter up to the data line: server lifecycle, health, timeouts, crash-restart, reward,
against a fake `appworld serve environment` (same routes and replies), plus the setup script."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from sgcd_jax.envs import make_factory
from sgcd_jax.envs.appworld import AppWorldServer, AppWorldServerError, ServerPool
from sgcd_jax.envs.appworld import fake_server
from sgcd_jax.envs.base import AgentAction, ToolCall

FAKE = str(Path(fake_server.__file__))
REPO = Path(__file__).resolve().parents[1]


def fake_command(delay: float = 0.0):
    return lambda port: [sys.executable, FAKE, "--port", str(port), "--startup-delay", str(delay)]


@pytest.fixture
def root(tmp_path):
    (tmp_path / "data" / "datasets").mkdir(parents=True)
    for task_id in ("aaa_1", "aaa_2", "bbb_1"):
        (tmp_path / "data" / "tasks" / task_id).mkdir(parents=True)
    (tmp_path / "data" / "datasets" / "train.txt").write_text("aaa_1\naaa_2:tagged\nbbb_1\n")
    return tmp_path


@pytest.fixture
def factory(root):
    factory = make_factory("appworld", root=str(root), pool_size=1, command=fake_command(),
                           request_timeout_s=2.0, startup_timeout_s=20.0)
    yield factory
    factory.close()


def code(text, call_id="c"):
    return AgentAction(tool_calls=(ToolCall("execute_python", {"code": text}, call_id),))


def test_missing_data_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("APPWORLD_ROOT", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="appworld download data"):
        make_factory("appworld", command=fake_command())


def test_tasks_listed_from_the_split_file(factory):
    assert [t.task_id for t in factory.tasks("train")] == ["aaa_1", "aaa_2", "bbb_1"]
    with pytest.raises(FileNotFoundError, match="split file"):
        factory.tasks("nope")


def test_full_episode_reward_is_fraction_of_tests_passed(factory):
    task = factory.tasks("train")[0]
    env = factory.make()
    reset = env.reset(task)
    assert "Fake instruction for aaa_1" in reset.messages[1]["content"]
    assert reset.tools[0]["function"]["name"] == "execute_python"
    assert not env.step(code("print(1)")).done
    step = env.step(AgentAction(content="```python\napis.supervisor.complete_task()\n```"))
    assert step.done and step.termination == "agent_stop"
    assert env.reward() == pytest.approx(2 / 4) and env.info()["success"] is False
    env = factory.make()  # the single server is free again and serves the next task
    env.reset(factory.tasks("train")[1])
    for i in range(3):
        env.step(code(f"x = {i}"))
    env.step(code("apis.supervisor.complete_task()"))
    assert env.reward() == 1.0 and env.info()["success"] is True


def test_server_crash_ends_episode_and_pool_restarts_it(factory):
    env = factory.make()
    env.reset(factory.tasks("train")[0])
    step = env.step(code("CRASH"))
    assert step.done and step.termination == "error" and step.tool_errors == 1
    assert "AppWorld environment failed" in step.observations[0]["content"]
    assert env.reward() == 0.0 and env.info()["error"]
    env = factory.make()
    env.reset(factory.tasks("train")[2])
    assert factory.pool.restarts == 1
    env.step(code("apis.supervisor.complete_task()"))
    assert env.reward() == pytest.approx(1 / 4)


def test_request_timeout_is_an_error_not_a_hang(factory):
    env = factory.make()
    env.reset(factory.tasks("train")[0])
    start = time.monotonic()
    step = env.step(code("SLEEP"))
    assert time.monotonic() - start < 10 and step.termination == "error"
    assert env.reward() == 0.0
    env = factory.make()
    env.reset(factory.tasks("train")[0])  # hung server was killed and restarted
    assert factory.pool.restarts == 1


def test_http_error_is_an_observation_and_the_episode_goes_on(factory):
    env = factory.make()
    env.reset(factory.tasks("train")[0])
    step = env.step(code("RAISE"))
    assert not step.done and step.tool_errors == 1 and step.observations[0]["content"].startswith("Error:")
    env.close()


def test_startup_timeout_and_startup_crash_are_reported():
    slow = AppWorldServer(fake_command(delay=30), startup_timeout_s=0.5)
    with pytest.raises(AppWorldServerError, match="not healthy"):
        slow.start()
    assert slow.process is None
    dead = AppWorldServer(lambda port: [sys.executable, "-c", "raise SystemExit(2)"], startup_timeout_s=20)
    with pytest.raises(AppWorldServerError, match="exited with code 2"):
        dead.start()


def test_pool_lifecycle_health_and_exhaustion():
    pool = ServerPool(1, lambda: AppWorldServer(fake_command(), startup_timeout_s=20))
    server = pool.acquire()
    assert server.healthy()
    with pytest.raises(TimeoutError, match="pool_size"):
        pool.acquire(timeout_s=0.1)
    process = server.process
    pool.release(server)
    pool.close()
    assert process.wait(timeout=5) is not None and not server.alive()
    with pytest.raises(RuntimeError, match="closed"):
        pool.acquire()


def test_setup_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(REPO / "launch" / "appworld_setup.sh")], capture_output=True)
    assert result.returncode == 0, result.stderr


REAL_VENV = Path(__import__("os").environ.get("APPWORLD_VENV", Path.home() / ".venvs" / "appworld"))


@pytest.mark.slow
@pytest.mark.skipif(not (REAL_VENV / "bin" / "appworld").exists(),
                    reason="real AppWorld venv absent (create it with launch/appworld_setup.sh)")
def test_real_appworld_server_lifecycle_up_to_the_data_line(root):
    """The real `appworld serve environment` starts, answers health, rejects a task whose data is a
    stub, and is stopped; with real data this is where an episode would begin."""
    from sgcd_jax.envs.appworld.server import AppWorldCallError
    factory = make_factory("appworld", root=str(root), venv=str(REAL_VENV), pool_size=1,
                           startup_timeout_s=120)
    server = factory.pool.acquire()
    assert server.healthy()
    with pytest.raises(AppWorldCallError):
        server.call("initialize", {"task_id": "aaa_1", "experiment_name": "t"}, timeout_s=60)
    factory.pool.release(server)
    factory.close()
    assert not server.alive()
