"""python -m sgcd_jax.bench rollout — synchronous rollout engine vs continuous batching, one process.

(a) τ³ group: smollm2-135m-instruct, `--group` siblings of one τ³ test task, scripted user, ≤ `--max-turns`
    turns, ≤ `--max-new-tokens` per turn, `--max-total-tokens` per conversation. "old" = the synchronous
    RolloutEngine (every live episode decodes a turn, then every env steps; the prompt appended in one
    chunk; cache buckets uncapped); "new" = continuous batching over `--slots` decode slots, prefill in
    chunks of `--prefill-chunk`, cache capped at the conversation budget, the siblings' prompt kept once in
    the cache's prefix store (`--no-share-prefixes`: copied per row, as "old" does). Both use the blockwise attention
    (the [T, S] einsum cache path is gone). Per engine: wall, peak RSS (sampled every 20 ms), compiles.
(b) Synthetic heavy-tailed multi-turn workload on the sampler directly: `--episodes` episodes, 1–12 turns
    (heavy-tailed), heavy-tailed turn lengths (exact budgets, no stop token) and env latencies (a thread
    pool sleeps), a small random decoder. old = GenerationSession.step per round, then all envs; new =
    ContinuousSession over `--slots` slots with envs overlapped. Reports slot utilization (useful
    row-steps / row-steps run) and generated tokens/s of both; checks both sampled the same tokens.
The engines alternate (new, old, new, old, ... for `--repeats`); timings include compilation on the first
repeat (the `compiles` counts show it). This CPU is shared: read numbers with load_average_1min.
Prints progress on stderr and one JSON object last.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import threading
import time

import numpy as np


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    def __enter__(self):
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _log(msg: str) -> None:
    print(f"[bench rollout] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- (a) τ³ group
def bench_tau3(args) -> dict:
    import jax

    from sgcd_jax.envs.tau_airline.env import TauAirlineFactory
    from sgcd_jax.integration import rollout_cache_len
    from sgcd_jax.models import load_model
    from sgcd_jax.models.chat import ChatRenderer
    from sgcd_jax.rollout.engine import RolloutConfig, RolloutEngine
    from sgcd_jax.sampling import Sampler, SamplingParams

    model, tokenizer = load_model("smollm2-135m-instruct")
    renderer = ChatRenderer(tokenizer)
    factory = TauAirlineFactory(user="scripted", max_turns=args.max_turns)
    task = factory.tasks("test")[args.task_index]
    params = SamplingParams(temperature=1.0)
    base = dict(max_turns=args.max_turns, max_tokens_per_turn=args.max_new_tokens,
                max_total_tokens=args.max_total_tokens, env_timeout_s=600)
    engines = {
        "new": RolloutEngine(Sampler(model, params=params, stop_token_ids=renderer.stop_token_ids(),
                                     prefill_chunk=args.prefill_chunk, share_prefixes=args.share_prefixes,
                                     max_cache_len=rollout_cache_len(args.max_total_tokens)),
                             renderer, RolloutConfig(**base, decode_slots=args.slots)),
        "old": RolloutEngine(Sampler(model, params=params, stop_token_ids=renderer.stop_token_ids(),
                                     prefill_chunk=16384, share_prefixes=False), renderer, RolloutConfig(**base)),
    }
    runs: dict[str, list[dict]] = {"new": [], "old": []}
    for repeat in range(args.repeats):
        for name in ("new", "old") if "old" not in args.skip_old else ("new",):
            started = time.perf_counter()
            with PeakRss() as rss:
                trajs = engines[name].run([task], factory, args.group, jax.random.key(repeat))
            stats = engines[name].last_run_stats
            run = {"wall_s": round(time.perf_counter() - started, 1), "peak_rss_gb": round(rss.peak / 2**30, 2),
                   "compiles": int(stats.get("compiles", 0)), "generated_tokens": int(stats["generated_tokens"]),
                   "slot_utilization": round(stats.get("slot_utilization", 0.0), 3),
                   "turns": [t.num_steps for t in trajs], "conversation_tokens": [len(t.token_ids) for t in trajs],
                   "terminations": sorted({t.termination for t in trajs}), "rewards": [t.reward for t in trajs]}
            runs[name].append(run)
            _log(f"tau3 {name} repeat {repeat}: {json.dumps(run)}")
    out = {"task_id": task.task_id, "group": args.group, "runs": runs}
    best = {n: min(r["wall_s"] for r in rs) for n, rs in runs.items() if rs}
    out["new_wall_s"] = best["new"]
    out["old_wall_s"] = best.get("old")
    out["speedup"] = round(best["old"] / best["new"], 2) if "old" in best else None
    out["peak_rss_gb"] = max(r["peak_rss_gb"] for r in runs["new"])
    out["old_peak_rss_gb"] = max((r["peak_rss_gb"] for r in runs["old"]), default=None)
    out["compiles"] = [r["compiles"] for r in runs["new"]]
    out["slot_utilization"] = runs["new"][-1]["slot_utilization"]
    return out


# ----------------------------------------------------------------------------- (b) synthetic heavy tail
def synthetic_workload(episodes: int, seed: int) -> list[dict]:
    """Per episode: prompt ids, per-turn (generate budget, observation ids, env latency s). Heavy tails:
    turns ~ 1 + min(11, Pareto), turn lengths and latencies log-normal."""
    rng = np.random.default_rng(seed)
    work = []
    for e in range(episodes):
        turns = int(min(12, 1 + np.floor(rng.pareto(1.2))))
        prompt = rng.integers(100, 40000, 48 + int(rng.integers(0, 64))).tolist()
        steps = []
        for _ in range(turns):
            steps.append({"budget": int(np.clip(rng.lognormal(3.2, 0.8), 4, 128)),
                          "observation": rng.integers(100, 40000, int(np.clip(rng.lognormal(3.0, 0.7), 4, 256))).tolist(),
                          "latency_s": float(np.clip(rng.lognormal(-3.5, 1.0), 0.002, 0.5))})
        work.append({"prompt": prompt, "steps": steps})
    return work


def _env_call(latency: float) -> None:
    time.sleep(latency)


def run_sync(sampler, work, keys, pool) -> tuple[dict, dict]:
    import jax

    from sgcd_jax.rollout.engine import turn_keys

    session = sampler.session()
    turn = {e: 0 for e in range(len(work))}
    pending = {e: work[e]["prompt"] for e in range(len(work))}
    tokens: dict[int, list[list[int]]] = {e: [] for e in range(len(work))}
    while pending:
        live = sorted(pending)
        live_keys = turn_keys(keys[np.asarray(live)], [turn[e] for e in live])
        outs = session.step({e: pending[e] for e in live},
                            max_new_tokens={e: work[e]["steps"][turn[e]]["budget"] for e in live},
                            rng={e: live_keys[i] for i, e in enumerate(live)})
        futures = [pool.submit(_env_call, work[e]["steps"][turn[e]]["latency_s"]) for e in live]
        concurrent.futures.wait(futures)
        pending = {}
        for e in live:
            tokens[e].append(outs[e].token_ids.tolist())
            turn[e] += 1
            if turn[e] < len(work[e]["steps"]):
                pending[e] = work[e]["steps"][turn[e] - 1]["observation"]
    session.step({}, max_new_tokens=0, rng=jax.random.key(0))
    s = session.stats
    return tokens, {"decode_row_steps": s.decode_row_steps, "generated_tokens": s.generated_tokens,
                    "slot_utilization": s.generated_tokens / max(s.decode_row_steps, 1)}


def run_continuous(sampler, work, keys, pool, slots_n: int, decode_steps: int) -> tuple[dict, dict]:
    from sgcd_jax.rollout.engine import turn_keys

    # one prefix store entry per distinct prompt, sized once (as the engine does with its tasks)
    slots = sampler.continuous(slots_n, decode_steps, prompts=len({tuple(w["prompt"]) for w in work}))
    turn = {e: 0 for e in range(len(work))}
    tokens: dict[int, list[list[int]]] = {e: [] for e in range(len(work))}

    def submit(e, ids):
        key = turn_keys(keys[e][None], [turn[e]])[0]
        slots.submit(e, ids, max_new_tokens=work[e]["steps"][turn[e]]["budget"], rng=key)

    for e in range(len(work)):
        submit(e, work[e]["prompt"])
    in_env: dict[int, concurrent.futures.Future] = {}
    while slots.has_work() or in_env:
        if slots.has_work():
            outs = slots.step()
        else:
            concurrent.futures.wait(list(in_env.values()), return_when="FIRST_COMPLETED")
            outs = {}
        for e, out in outs.items():
            tokens[e].append(out.token_ids.tolist())
            in_env[e] = pool.submit(_env_call, work[e]["steps"][turn[e]]["latency_s"])
        for e in [e for e, f in in_env.items() if f.done()]:
            del in_env[e]
            turn[e] += 1
            if turn[e] < len(work[e]["steps"]):
                submit(e, work[e]["steps"][turn[e] - 1]["observation"])
            else:
                slots.release(e)
    s = slots.stats
    return tokens, {"decode_row_steps": s.decode_row_steps, "generated_tokens": s.generated_tokens,
                    "slot_utilization": s.slot_utilization, "parked": s.parked}


def bench_synthetic(args) -> dict:
    import jax
    from flax import nnx

    from sgcd_jax.models import Decoder, ModelConfig
    from sgcd_jax.sampling import Sampler, SamplingParams

    cfg = ModelConfig(vocab_size=49152, hidden_size=args.synthetic_hidden, intermediate_size=4 * args.synthetic_hidden,
                      num_layers=args.synthetic_layers, num_heads=4, num_kv_heads=2, max_position_embeddings=8192)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    sampler = Sampler(model, params=SamplingParams(temperature=1.0), stop_token_ids=(), decode_steps_per_chunk=16,
                      max_cache_len=2048)
    work = synthetic_workload(args.episodes, args.seed)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(args.seed), i))(np.arange(len(work)))
    pool = concurrent.futures.ThreadPoolExecutor(32)
    runs: dict[str, list[dict]] = {"new": [], "old": []}
    sampled = {}
    for repeat in range(args.repeats):
        for name in ("new", "old"):
            before = sampler.compiles()
            started = time.perf_counter()
            if name == "new":
                tokens, stats = run_continuous(sampler, work, keys, pool, args.slots, args.decode_steps)
            else:
                tokens, stats = run_sync(sampler, work, keys, pool)
            wall = time.perf_counter() - started
            sampled[name] = tokens
            run = {"wall_s": round(wall, 2), "generated_tokens": stats["generated_tokens"],
                   "tokens_per_s": round(stats["generated_tokens"] / wall, 1),
                   "slot_utilization": round(stats["slot_utilization"], 3),
                   "compiles": sampler.compiles() - before}
            runs[name].append(run)
            _log(f"synthetic {name} repeat {repeat}: {json.dumps(run)}")
    pool.shutdown()
    best = {n: min(r["wall_s"] for r in rs) for n, rs in runs.items()}
    return {"episodes": len(work), "turns": sorted(len(w["steps"]) for w in work), "slots": args.slots,
            "runs": runs, "new_wall_s": best["new"], "old_wall_s": best["old"],
            "speedup": round(best["old"] / best["new"], 2),
            "slot_utilization": runs["new"][-1]["slot_utilization"],
            "old_slot_utilization": runs["old"][-1]["slot_utilization"],
            "compiles": [r["compiles"] for r in runs["new"]],
            "same_tokens": sampled["new"] == sampled["old"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sgcd_jax.bench rollout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--which", choices=["tau3", "synthetic", "both"], default="both")
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--task-index", type=int, default=0)
    parser.add_argument("--max-turns", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-total-tokens", type=int, default=6144)
    parser.add_argument("--prefill-chunk", type=int, default=512)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-old", action="store_const", const="old", dest="skip_old", default="")
    parser.add_argument("--no-share-prefixes", action="store_false", dest="share_prefixes",
                        help="tau3 new engine: copy the siblings' prompt into each row (no prefix store)")
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decode-steps", type=int, default=4, help="synthetic: tokens per continuous decode call")
    parser.add_argument("--synthetic-hidden", type=int, default=256)
    parser.add_argument("--synthetic-layers", type=int, default=4)
    args = parser.parse_args(argv)

    import jax

    out = {"device": str(jax.devices()[0].device_kind), "cpu_count": os.cpu_count()}
    if args.which in ("synthetic", "both"):
        out["synthetic"] = bench_synthetic(args)
    if args.which in ("tau3", "both"):
        out["tau3"] = bench_tau3(args)
    main_part = out.get("tau3") or out["synthetic"]
    for key in ("new_wall_s", "old_wall_s", "speedup", "peak_rss_gb", "slot_utilization", "compiles"):
        out[key] = main_part.get(key)
    if "synthetic" in out:
        out["synthetic_slot_utilization"] = out["synthetic"]["slot_utilization"]
        out["synthetic_speedup"] = out["synthetic"]["speedup"]
    out["load_average_1min"] = round(os.getloadavg()[0], 1)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
