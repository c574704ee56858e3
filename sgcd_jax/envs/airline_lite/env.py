"""airline_lite env and factory: the embedded, fast default environment.

Verifier (reward ∈ {0, 1}), every factor reported in ``info``:
  ended by a stop (agent ``###STOP###`` or the scripted user's) ×
  final DB == DB after replaying the task's gold actions (copy-on-write diff compare) ×
  every communicate_info string in some agent message (τ² rule) ×
  every required lookup succeeded (same arguments) before the first successful write
  — the last factor rejects guessed ids even when the guess happens to be right.
"""

from __future__ import annotations

import threading
from typing import Any

from sgcd_jax.envs.airline_lite.generator import TOOLS, generate_db, generate_tasks
from sgcd_jax.envs.base import Task
from sgcd_jax.envs.conversation import PROPER_ENDS, ToolConversation
from sgcd_jax.envs.cowdb import CowDB
from sgcd_jax.envs.credit_truth import conversation_truth
from sgcd_jax.envs.tau_airline.evaluator import replay_gold
from sgcd_jax.envs.tau_airline.schemas import TOOL_SPECS, validate_arguments
from sgcd_jax.envs.tau_airline.tools import NOW, WRITE_TOOLS, AirlineTools
from sgcd_jax.envs.users import ScriptedUser

ENV_NAME = "airline_lite"
SYSTEM_PROMPT = (
    "You are an airline agent. Use the tools to handle the request, then reply once.\n"
    "Rules: look up a reservation before changing it. A reservation can be cancelled only if it has "
    "insurance or is business class; otherwise reply 'Reservation <id> cannot be cancelled.' "
    "Pay only with payment ids from get_user_details.")


def lite_tool_schemas(names: tuple[str, ...]) -> list[dict[str, Any]]:
    """τ³ schemas for ``names`` without per-argument descriptions (short prompts for tiny models)."""
    out = []
    for name in names:
        description, properties, required = TOOL_SPECS[name]
        props = {p: {k: v for k, v in s.items() if k != "description"} for p, s in properties.items()}
        out.append({"type": "function", "function": {"name": name, "description": description,
                    "parameters": {"type": "object", "properties": props, "required": required}}})
    return out


class AirlineLiteEnv(ToolConversation):
    name = ENV_NAME
    compact_observations = True

    def __init__(self, max_turns: int = 8, seed: int = 0, gold_cache: "_GoldCache | None" = None):
        super().__init__(max_turns)
        self.seed = seed
        self.gold_cache = gold_cache or _GoldCache(seed)
        self.db: CowDB | None = None

    def _setup(self, task: Task):
        difficulty = task.payload["difficulty"]
        self.db = CowDB(generate_db(task.payload["db_seed"], task.payload["db_split"]))
        self.tools = AirlineTools(self.db, now=NOW, names=frozenset(TOOLS[difficulty]))
        if difficulty == "easy":
            self.tools = _BriefTools(self.tools)
        self.user = ScriptedUser({"opening": task.payload["opening"], "stop_on_any_reply": True})
        return SYSTEM_PROMPT, lite_tool_schemas(TOOLS[difficulty])

    def reward(self) -> float:
        return self._evaluate()["reward"]

    def info(self) -> dict[str, Any]:
        return self._evaluate()

    def _evaluate(self) -> dict[str, Any]:
        if self.task is None:
            raise RuntimeError("reward()/info() before reset(task)")
        payload = self.task.payload
        gold_db = self.gold_cache.get(self.task)
        ended_ok = self.termination in PROPER_ENDS
        db_match = self.db.changes_hash() == gold_db.changes_hash()
        communicated = self.communicated(payload["communicate_info"])
        reads_ok = self._required_reads_done()
        reward = float(ended_ok and db_match and all(communicated.values()) and all(reads_ok.values()))
        reasons = [msg for ok, msg in (
            (ended_ok, f"episode ended by '{self.termination or 'nothing'}', not a stop"),
            (db_match, "final DB differs from the gold-action DB"),
            (all(communicated.values()), "missing info: " + ", ".join(k for k, v in communicated.items() if not v)),
            (all(reads_ok.values()), "lookup skipped before acting: " + ", ".join(k for k, v in reads_ok.items() if not v)),
        ) if not ok]
        return {"reward": reward, "ended_by_stop": ended_ok, "db_match": db_match,
                "communicate": communicated, "required_reads": reads_ok, "fail_reasons": reasons,
                "termination": self.termination, "task_id": self.task.task_id,
                "family": payload["family"], "difficulty": payload["difficulty"],
                "credit_truth": conversation_truth(self, payload["actions"], payload["communicate_info"], reward,
                                                   ended_ok, payload["required_reads"]),
                **self.write_call_counts()}

    def _required_reads_done(self) -> dict[str, bool]:
        first_write = next((i for i, c in enumerate(self.tool_log) if c["ok"] and c["name"] in WRITE_TOOLS),
                           len(self.tool_log))
        done = set()
        for call in self.tool_log[:first_write]:
            if call["ok"]:
                done.add(_call_key(call["name"], call["arguments"]))
        out = {}
        for index in self.task.payload["required_reads"]:
            action = self.task.payload["actions"][index]
            out[f"{action['name']}({_args_text(action['arguments'])})"] = \
                _call_key(action["name"], action["arguments"]) in done
        return out


# "easy" shows only the record fields its tasks need (short observations for tiny CPU models); the DB,
# the tools' effects and the verifier are unchanged.
EASY_FIELDS = {"get_user_details": ("user_id", "membership", "reservations"),
               "get_reservation_details": ("reservation_id", "user_id", "cabin", "insurance", "status"),
               "cancel_reservation": ("reservation_id", "status")}


class _BriefTools:
    def __init__(self, tools: AirlineTools):
        self.inner = tools

    def call(self, name: str, arguments: Any) -> tuple[Any, str]:
        result, error = self.inner.call(name, arguments)
        if not error and name in EASY_FIELDS and isinstance(result, dict):
            result = {k: result[k] for k in EASY_FIELDS[name] if k in result}
        return result, error

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)


def _call_key(name: str, arguments: Any) -> str:
    import json
    try:
        arguments = validate_arguments(name, arguments)
    except ValueError:
        pass
    return name + json.dumps(arguments, sort_keys=True)


def _args_text(arguments: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in arguments.items())


class _GoldCache:
    def __init__(self, seed: int):
        self.seed = seed
        self._lock = threading.Lock()
        self._dbs: dict[str, CowDB] = {}

    def get(self, task: Task) -> CowDB:
        with self._lock:
            if task.task_id not in self._dbs:
                base = generate_db(task.payload["db_seed"], task.payload["db_split"])
                db, errors = replay_gold(base, task.payload["actions"], NOW)
                if errors:
                    raise RuntimeError(f"airline_lite gold actions of {task.task_id} failed: {errors}")
                self._dbs[task.task_id] = db
            return self._dbs[task.task_id]


class AirlineLiteFactory:
    """``tasks(split)``: ``num_tasks`` tasks per split ("train", "test", or any name), seeded.

    ``tasks_per_db``: 0 = every task of a split shares one generated DB (30 users, ~40 flights, ~90
    reservations); k > 0 = each run of k tasks gets its own DB (``split#shard``), so a split spans
    many distinct users, flights and reservation ids. With one DB, 256 SFT demos repeat the same 30
    user ids and a tiny model memorises them instead of learning to copy ids from the request.
    """

    name = ENV_NAME

    def __init__(self, difficulty: str = "easy", num_tasks: int = 64, seed: int = 0, max_turns: int = 8,
                 tasks_per_db: int = 0, **_: Any):
        if tasks_per_db < 0:
            raise ValueError(f"airline_lite tasks_per_db={tasks_per_db} must be >= 0 (0 = one DB per split)")
        self.difficulty, self.num_tasks, self.seed, self.max_turns = difficulty, num_tasks, seed, max_turns
        self.tasks_per_db = tasks_per_db
        self._gold = _GoldCache(seed)
        self._lock = threading.Lock()
        self._splits: dict[str, list[Task]] = {}

    def tasks(self, split: str) -> list[Task]:
        with self._lock:
            if split not in self._splits:
                payloads = self._generate(split)
                self._splits[split] = [Task(f"lite-{self.seed}-{split}-{self.difficulty}-{p['index']}",
                                            ENV_NAME, p) for p in payloads]
            return list(self._splits[split])

    def _generate(self, split: str) -> list[dict[str, Any]]:
        if not self.tasks_per_db:
            return generate_tasks(self.seed, split, self.num_tasks, self.difficulty)
        payloads: list[dict[str, Any]] = []
        for shard in range(-(-self.num_tasks // self.tasks_per_db)):
            count = min(self.tasks_per_db, self.num_tasks - len(payloads))
            for payload in generate_tasks(self.seed, f"{split}#{shard}", count, self.difficulty):
                payloads.append({**payload, "index": len(payloads)})
        return payloads

    def make(self) -> AirlineLiteEnv:
        return AirlineLiteEnv(self.max_turns, self.seed, self._gold)
