"""τ³-airline env and factory on the official data (50 tasks; splits train 30 / test 20 / base 50)."""

from __future__ import annotations

import threading
from typing import Any

from sgcd_jax.envs.base import Task
from sgcd_jax.envs.conversation import PROPER_ENDS, ToolConversation
from sgcd_jax.envs.cowdb import CowDB
from sgcd_jax.envs.credit_truth import conversation_truth
from sgcd_jax.envs.tau_airline import data
from sgcd_jax.envs.tau_airline.evaluator import replay_gold, score
from sgcd_jax.envs.tau_airline.schemas import tool_schemas
from sgcd_jax.envs.tau_airline.tools import NOW, AirlineTools
from sgcd_jax.envs.users import UserFactory, make_user_factory

ENV_NAME = "tau3_airline"


def system_prompt(policy: str) -> str:
    return ("You are a customer service agent that helps the user according to the <policy> provided "
            "below. In each turn you can either send a message to the user or make a tool call, not "
            "both. When the user's request is fully handled, end the conversation with '###STOP###'."
            f"\n\n<policy>\n{policy}\n</policy>")


def task_from_official(raw: dict[str, Any]) -> Task:
    return Task(task_id=str(raw["id"]), env_name=ENV_NAME, payload=raw)


def user_scenario(raw: dict[str, Any]) -> dict[str, Any]:
    return dict(raw["user_scenario"]["instructions"])


class TauAirlineEnv(ToolConversation):
    name = ENV_NAME

    def __init__(self, max_turns: int = 30, user_factory: UserFactory | None = None,
                 gold_cache: "_GoldCache | None" = None):
        super().__init__(max_turns)
        self.user_factory = user_factory or make_user_factory("scripted")
        self.gold_cache = gold_cache or _GoldCache()
        self.db: CowDB | None = None

    def _setup(self, task: Task):
        self.db = CowDB(data.base_db())
        self.tools = AirlineTools(self.db, now=NOW)
        self.user = self.user_factory(user_scenario(task.payload))
        return system_prompt(data.policy()), tool_schemas()

    def _criteria(self) -> dict[str, Any]:
        return self.task.payload["evaluation_criteria"]

    def reward(self) -> float:
        return self._evaluate()[0]

    def info(self) -> dict[str, Any]:
        reward, details = self._evaluate()
        criteria = self._criteria()
        truth = conversation_truth(self, criteria["actions"], criteria["communicate_info"], reward,
                                   details["ended_by_stop"])
        return {**details, **self.write_call_counts(), "termination": self.termination,
                "task_id": self.task.task_id, "credit_truth": truth,
                "user_fallbacks": getattr(self.user, "failures", 0)}  # LLM-user turns the scripted user played

    def _evaluate(self) -> tuple[float, dict[str, Any]]:
        if self.task is None:
            raise RuntimeError("reward()/info() before reset(task)")
        gold_db = self.gold_cache.get(self.task)
        return score(termination=self.termination, proper_ends=PROPER_ENDS, db=self.db, gold_db=gold_db,
                     communicated=self.communicated(self._criteria()["communicate_info"]))


class _GoldCache:
    """Gold-replay DB per task id, computed once per factory (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._dbs: dict[str, CowDB] = {}

    def get(self, task: Task) -> CowDB:
        with self._lock:
            if task.task_id not in self._dbs:
                db, errors = replay_gold(data.base_db(), task.payload["evaluation_criteria"]["actions"], NOW)
                if errors:
                    raise RuntimeError(f"gold actions of task {task.task_id} failed: {errors}")
                self._dbs[task.task_id] = db
            return self._dbs[task.task_id]


class TauAirlineFactory:
    name = ENV_NAME

    def __init__(self, user: str = "scripted", max_turns: int = 30, user_kwargs: dict | None = None,
                 **_: Any):
        self.user_factory = make_user_factory(user, **(user_kwargs or {}))
        self.max_turns = max_turns
        self._gold = _GoldCache()
        self._by_id = {str(t["id"]): task_from_official(t) for t in data.tasks()}

    def tasks(self, split: str) -> list[Task]:
        splits = data.splits()
        if split not in splits:
            raise ValueError(f"unknown τ³ split {split!r}; choose one of {sorted(splits)}")
        return [self._by_id[i] for i in splits[split]]

    def make(self) -> TauAirlineEnv:
        return TauAirlineEnv(self.max_turns, self.user_factory, self._gold)
