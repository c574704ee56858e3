"""Time one jitted decode step at τ³ rollout size: SmolLM2-135M shape (random init), B=8 rows, a
6,656-slot cache (rollout_cache_len(6144)) filled to ~4.5k tokens (the τ³ system prompt + a few turns).

    python scripts/time_decode_step.py [--steps 16] [--repeats 3] [--fill 4500] [--cache 6656] [--shared 4400]

Prints wall and process CPU seconds per decode step (the CPU is shared: CPU time is the steadier number)
and the compiled decode chunk's XLA temp allocation.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgcd_jax.models import Decoder, KVCache, ModelConfig
from sgcd_jax.sampling import SamplingParams
from sgcd_jax.sampling.kernels import decode_chunk, split_store

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                    num_kv_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cache", type=int, default=6656)
    parser.add_argument("--fill", type=int, default=4500)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shared", type=int, default=0,
                        help="the first SHARED positions come from a one-entry prefix store (siblings' prompt); rows "
                        "then hold CACHE - SHARED slots of their own")
    args = parser.parse_args()

    cfg = ModelConfig(**SMOLLM2_135M)
    graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))

    def filled_cache() -> KVCache:  # random k/v in the first `fill` positions of every row
        own_fill, own_slots = args.fill - args.shared, args.cache - args.shared
        cache = KVCache.init(cfg, args.batch, own_slots)
        shape = cache.k.shape[:2] + (args.fill,) + cache.k.shape[3:]
        k = jax.random.normal(jax.random.key(0), shape, cache.k.dtype)  # (numpy's normal took 5-7 min here)
        cache = cache.replace(k=cache.k.at[:, :, :own_fill].set(k[:, :, args.shared:]),
                              v=cache.v.at[:, :, :own_fill].set(k[:, :, args.shared:]),
                              valid=cache.valid.at[:, :own_fill].set(True), end=jnp.full((args.batch,), own_fill, jnp.int32))
        if args.shared:  # rows read [0, shared) from one store entry and hold the rest themselves
            cache = cache.replace(prefix_k=k[:, :1, :args.shared], prefix_v=k[:, :1, :args.shared],
                                  prefix_valid=jnp.ones((1, args.shared), bool),
                                  prefix_id=jnp.zeros((args.batch,), jnp.int32),
                                  prefix_len=jnp.full((args.batch,), args.shared, jnp.int32))
        return cache

    logits = jnp.zeros((args.batch, cfg.vocab_size), jnp.float32)
    active = jnp.ones((args.batch,), bool)
    remaining = jnp.full((args.batch,), args.steps, jnp.int32)
    kwargs = dict(params=SamplingParams(temperature=1.0), num_steps=args.steps, stop_ids=())
    cache = filled_cache()
    rows, store = split_store(cache)
    kwargs["store"] = store
    compiled = decode_chunk.lower(graphdef, state, rows, logits, active, remaining, jax.random.key(0),
                                  **kwargs).compile()
    memory = compiled.memory_analysis()
    walls, cpus = [], []
    for repeat in range(args.repeats + 1):  # the first call warms up
        rows, kwargs["store"] = split_store(filled_cache())
        jax.block_until_ready(rows)
        wall, cpu = time.perf_counter(), time.process_time()
        out = decode_chunk(graphdef, state, rows, logits, active, remaining, jax.random.key(repeat), **kwargs)
        jax.block_until_ready(out)
        if repeat:
            walls.append((time.perf_counter() - wall) / args.steps)
            cpus.append((time.process_time() - cpu) / args.steps)
        del out
    print(json.dumps({"batch": args.batch, "cache": args.cache, "fill": args.fill, "shared": args.shared,
                      "steps": args.steps,
                      "wall_s_per_step": [round(x, 3) for x in walls],
                      "cpu_s_per_step": [round(x, 3) for x in cpus],
                      "median_wall_s": round(float(np.median(walls)), 3),
                      "median_cpu_s": round(float(np.median(cpus)), 3),
                      "temp_mb": round(memory.temp_size_in_bytes / 2**20, 1) if memory else None}))


if __name__ == "__main__":
    main()
