"""Benchmark: peak memory and time of full-vocabulary reverse KL, naive [T, V] logits vs chunked.

    python -m sgcd_jax.bench loss_memory [--seq 8192 --vocab 151936 --hidden 1024 --chunk 256]

Both paths compute KL(p_S‖q_T) per position from student/teacher hidden states [1, T, D] and one
LM head [D, V] (forward pass, as in the scoring pass; ``--grad`` also differentiates w.r.t. the
student hidden states and the kernel, as in the SDPO full-distribution loss). Memory comes from
XLA's compiled memory analysis (temp = scratch beyond arguments and outputs) and the process RSS
peak above its pre-run level (sampled every 10 ms). The naive case runs only if its compiled
footprint fits in MemAvailable with a 3 GiB margin (otherwise its time is null). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import threading
import time

import jax
import jax.numpy as jnp

from sgcd_jax.losses.vocab import VocabConfig, naive_pair_stats, pair_stats

GIB = 1024**3


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class _RssSampler:
    """Peak resident memory above the pre-run level, sampled every 10 ms on a helper thread."""

    def __enter__(self):
        self.start = self.peak = _rss_now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss_now())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_now())

    @property
    def increase(self) -> int:
        return self.peak - self.start


def _build(stats_fn, cfg: VocabConfig, grad: bool):
    def reverse_kl(student, teacher, kernel, targets):
        return stats_fn(student, teacher, kernel, targets, cfg, None, ("reverse_kl",))["reverse_kl"]

    if not grad:
        return jax.jit(reverse_kl)
    return jax.jit(jax.value_and_grad(lambda s, t, k, y: reverse_kl(s, t, k, y).sum(),
                                      argnums=(0, 2)))


def _measure(stats_fn, cfg, grad, args, run: bool) -> tuple[dict, jax.Array | None]:
    """Compile, read the memory analysis, run once (if asked and it fits); returns (stats, output)."""
    compiled = _build(stats_fn, cfg, grad).lower(*args).compile()
    analysis = compiled.memory_analysis()
    result = {
        "temp_gib": analysis.temp_size_in_bytes / GIB,
        "argument_gib": analysis.argument_size_in_bytes / GIB,
        "output_gib": analysis.output_size_in_bytes / GIB,
        "seconds": None,
    }
    footprint = (analysis.temp_size_in_bytes + analysis.output_size_in_bytes)
    output = None
    if run and footprint + 3 * GIB < _mem_available():
        with _RssSampler() as rss:
            start = time.perf_counter()
            output = jax.block_until_ready(compiled(*args))
            result["seconds"] = time.perf_counter() - start
        result["rss_peak_increase_gib"] = rss.increase / GIB
    elif run:
        result["skipped"] = (f"needs ~{footprint / GIB:.1f} GiB beyond inputs, only "
                             f"{_mem_available() / GIB:.1f} GiB available")
    return result, output


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, run the benchmark, print and return the JSON-able result."""
    parser = argparse.ArgumentParser(prog="python -m sgcd_jax.bench loss_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--grad", action="store_true", help="forward + backward")
    parser.add_argument("--skip-naive-run", action="store_true",
                        help="only compile the naive path (memory analysis), do not execute it")
    args = parser.parse_args(argv)

    dtype = jnp.dtype(args.dtype)
    # jax.random draws straight into the target dtype: no float64 host temporaries that would
    # sit in the process before the measured runs.
    key_s, key_t, key_k, key_y = jax.random.split(jax.random.key(0), 4)
    shape = (1, args.seq, args.hidden)
    student = jax.random.normal(key_s, shape, dtype)
    teacher = student + 0.3 * jax.random.normal(key_t, shape, dtype)
    kernel = jax.random.normal(key_k, (args.hidden, args.vocab), dtype) * args.hidden**-0.5
    targets = jax.random.randint(key_y, (1, args.seq), 0, args.vocab, jnp.int32)
    inputs = (student, teacher, kernel, targets)
    jax.block_until_ready(inputs)
    input_gib = sum(x.nbytes for x in inputs) / GIB

    cfg = VocabConfig(chunk_size=args.chunk)
    chunked, chunked_out = _measure(pair_stats, cfg, args.grad, inputs, run=True)
    naive, naive_out = _measure(naive_pair_stats, cfg, args.grad, inputs,
                                run=not args.skip_naive_run)
    max_abs_diff = None
    if chunked_out is not None and naive_out is not None:
        max_abs_diff = max(float(jnp.abs(a - b).max())
                           for a, b in zip(jax.tree.leaves(chunked_out), jax.tree.leaves(naive_out)))

    result = {
        "benchmark": "loss_memory",
        "device": str(jax.devices()[0].platform),
        "shape": {"B": 1, "T": args.seq, "D": args.hidden, "V": args.vocab, "dtype": args.dtype,
                  "chunk": args.chunk, "grad": args.grad},
        "inputs_gib": input_gib,
        "naive_fp32_logits_gib_per_side": args.seq * args.vocab * 4 / GIB,
        "chunked": chunked,
        "naive": naive,
        "chunked_extra_over_inputs_gib": chunked["temp_gib"] + chunked["output_gib"],
        "time_ratio_chunked_over_naive": (chunked["seconds"] / naive["seconds"]
                                          if naive["seconds"] else None),
        "max_abs_diff_chunked_vs_naive": max_abs_diff,
    }
    print(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
