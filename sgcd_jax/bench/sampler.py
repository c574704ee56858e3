"""python -m sgcd_jax.bench sampler — generation throughput of our sampler vs transformers `generate`.

1. SmolLM2-135M-Instruct (the GGUF, dequantised to float32 on both sides), a chat prompt, greedy,
   exactly `--new-tokens` new tokens (no stop), batch 1 and 8: tokens/s ours vs transformers (torch,
   KV cache) in the same process, plus the fraction of the memory-bandwidth limit
   (param bytes × decode steps / time vs a measured numpy copy bandwidth).
2. Multi-turn: `--episodes` episodes × `--turns` turns through a fast fake tool env with the
   RolloutEngine: generated tokens/s with KV-cache continuation vs re-prefilling every turn.
Prints one JSON object. Timings exclude compilation (one warm-up run per shape first).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def copy_bandwidth_gb_s(num_bytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Read+write bytes per second of a large numpy copy (a practical memory-bandwidth ceiling)."""
    src = np.ones(num_bytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * num_bytes / best / 1e9


def _timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_single_turn(model, tokenizer, batch_sizes, new_tokens: int, repeats: int, torch_threads: int) -> dict:
    import jax
    import torch
    from transformers import AutoModelForCausalLM

    from sgcd_jax.models.chat import ChatRenderer
    from sgcd_jax.models.loading import resolve_model_path
    from sgcd_jax.sampling import Sampler, SamplingParams

    renderer = ChatRenderer(tokenizer)
    prompt = renderer.prompt_ids([{"role": "user", "content": "Write a short story about a robot who learns to "
                                                              "book airline tickets for its owner."}])
    sampler = Sampler(model, params=SamplingParams(temperature=0.0), stop_token_ids=(),
                      decode_steps_per_chunk=new_tokens)
    path = resolve_model_path("smollm2-135m-instruct")
    torch.set_num_threads(torch_threads)
    torch_model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                       dtype=torch.float32).eval()
    param_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(sampler.state))
    bandwidth = copy_bandwidth_gb_s()
    results = {"prompt_tokens": len(prompt), "new_tokens": new_tokens, "param_bytes": param_bytes,
               "copy_bandwidth_gb_s": round(bandwidth, 2), "torch_threads": torch_threads}
    for batch in batch_sizes:
        prompts = [prompt] * batch

        def ours():
            outs = sampler.generate(prompts, max_new_tokens=new_tokens, rng=jax.random.key(0))
            assert all(len(o.token_ids) == new_tokens for o in outs)
            return outs

        ours_ids = ours()[0].token_ids  # warm-up / compile
        ours_s = _timed(ours, repeats)
        input_ids = torch.tensor(prompts)

        def theirs():
            with torch.no_grad():
                return torch_model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                            max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                            pad_token_id=tokenizer.eos_token_id)

        theirs_ids = theirs()[0, len(prompt):].numpy()
        theirs_s = _timed(theirs, repeats)
        results[f"batch{batch}"] = {
            "ours_tokens_per_s": round(batch * new_tokens / ours_s, 1),
            "transformers_tokens_per_s": round(batch * new_tokens / theirs_s, 1),
            "speedup": round(theirs_s / ours_s, 2),
            "ours_bandwidth_fraction": round(param_bytes * new_tokens / ours_s / 1e9 / bandwidth, 3),
            "transformers_bandwidth_fraction": round(param_bytes * new_tokens / theirs_s / 1e9 / bandwidth, 3),
            "greedy_tokens_agree_with_transformers": int(np.sum(np.cumprod(ours_ids == theirs_ids))),
        }
    return results


class _FastToolEnv:
    """Every turn returns a fixed ~60-token tool observation; episode k ends after 2 + k % (turns - 1) agent
    turns (so rows finish at different turns and compaction matters); max_turns caps the rest."""

    name = "fast"

    def __init__(self, end_after: int):
        self.end_after, self.steps = end_after, 0
    OBS = json.dumps({"flights": [{"id": f"HAT{i:03d}", "from": "SFO", "to": "JFK", "price": 100 + i}
                                  for i in range(3)]})

    def reset(self, task):
        from sgcd_jax.envs.base import EnvReset
        return EnvReset(messages=[{"role": "system", "content": "You are an airline agent. Use the tools."},
                                  {"role": "user", "content": f"Find me a flight, request {task.task_id}."}],
                        tools=[{"type": "function", "function": {
                            "name": "search_flights", "description": "search flights",
                            "parameters": {"type": "object", "properties": {"origin": {"type": "string"}}}}}])

    def step(self, action):
        from sgcd_jax.envs.base import EnvStep
        self.steps += 1
        return EnvStep([{"role": "tool", "name": "search_flights", "content": self.OBS}],
                       done=self.steps >= self.end_after, termination="agent_stop")

    def reward(self):
        return 0.0

    def info(self):
        return {}


class _FastFactory:
    name = "fast"

    def __init__(self, turns: int):
        self.turns, self.made = turns, 0

    def make(self):
        self.made += 1
        return _FastToolEnv(end_after=2 + (self.made - 1) % max(self.turns - 1, 1))

    def tasks(self, split):
        return []


class _SessionVariant:
    """The same sampler with other session options: re-prefill every turn, or no compaction."""

    def __init__(self, sampler, **session_options):
        self.sampler, self.session_options = sampler, session_options

    def session(self):
        return self.sampler.session(**self.session_options)

    def generate(self, *args, **kwargs):
        return self.sampler.generate(*args, **kwargs)


def bench_multi_turn(model, tokenizer, episodes: int, turns: int, tokens_per_turn: int,
                     variant_names: list[str]) -> dict:
    import jax

    from sgcd_jax.envs.base import Task
    from sgcd_jax.models.chat import ChatRenderer
    from sgcd_jax.rollout import RolloutConfig, RolloutEngine
    from sgcd_jax.sampling import Sampler, SamplingParams

    renderer = ChatRenderer(tokenizer)
    sampler = Sampler(model, params=SamplingParams(temperature=1.0), stop_token_ids=renderer.stop_token_ids(),
                      decode_steps_per_chunk=tokens_per_turn, min_cache_len=1024)
    config = RolloutConfig(max_turns=turns, max_tokens_per_turn=tokens_per_turn, env_timeout_s=60)
    tasks = [Task(f"t{i}", "fast") for i in range(episodes // 4)]
    results = {"episodes": episodes, "turns": turns, "max_tokens_per_turn": tokens_per_turn}
    all_variants = {"cache_continuation_compacted": sampler,
                    "cache_continuation_compacted_parking": _SessionVariant(sampler, park_idle_rows=True),
                    "cache_continuation_no_compaction": _SessionVariant(sampler, compact=False),
                    "reprefill_each_turn": _SessionVariant(sampler, reuse_cache=False)}
    variants = [(name, all_variants[name]) for name in variant_names]
    for name, generator in variants:
        engine = RolloutEngine(generator, renderer, config)
        engine.run(tasks, _FastFactory(turns), group_size=4, rng=jax.random.key(0))  # compile every shape once
        trajectories = engine.run(tasks, _FastFactory(turns), group_size=4, rng=jax.random.key(0))
        stats = engine.last_run_stats
        results[name] = {"generated_tokens": int(stats["generated_tokens"]), "wall_s": round(stats["wall_s"], 2),
                         "generated_tokens_per_s": round(stats["generated_tokens_per_s"], 1),
                         "turns_per_episode": sorted(t.num_steps for t in trajectories),
                         "mean_conversation_tokens": round(float(np.mean([len(t.token_ids) for t in trajectories])))}
        print(f"[bench sampler] {name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
    rate = {name: results[name]["generated_tokens_per_s"] for name, _ in variants}
    for other in rate:
        if other != "cache_continuation_compacted" and "cache_continuation_compacted" in rate:
            results[f"tokens_per_s_ratio_vs_{other}"] = round(rate["cache_continuation_compacted"] / rate[other], 2)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sgcd_jax.bench sampler", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--tokens-per-turn", type=int, default=32)
    parser.add_argument("--variants", nargs="+", default=["cache_continuation_compacted",
                                                          "cache_continuation_no_compaction", "reprefill_each_turn"])
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip", choices=["single", "multi"], action="append", default=[])
    args = parser.parse_args(argv)

    import jax

    from sgcd_jax.models import load_model

    model, tokenizer = load_model("smollm2-135m-instruct")
    out = {"device": str(jax.devices()[0].device_kind), "cpu_count": os.cpu_count(), "dtype": "float32"}
    if "single" not in args.skip:
        out["single_turn"] = bench_single_turn(model, tokenizer, args.batch_sizes, args.new_tokens, args.repeats,
                                               args.torch_threads)
    if "multi" not in args.skip:
        out["multi_turn"] = bench_multi_turn(model, tokenizer, args.episodes, args.turns, args.tokens_per_turn,
                                           args.variants)
    out["load_average_1min"] = round(os.getloadavg()[0], 1)  # this box is shared: read timings with it
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
