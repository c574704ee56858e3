"""fwd+bwd+AdamW train-step throughput: ours (JAX/NNX) vs transformers+torch, same model, same run.

    python -m sgcd_jax.bench train_step [--batch 4] [--seq 512] [--steps 3] [--model smollm2-135m-instruct]
        [--loss full|chunked] [--dtype float32|bfloat16] [--attention xla|dot_product_attention|cudnn|auto]
        [--remat none|full|dots|dots_no_batch|save_attention_out] [--skip-torch]

Both sides: mean next-token cross-entropy over the full vocabulary, AdamW, fp32 params. Ours computes the
loss either from full [B,T,V] logits ("full") or the way the trainer scores, vocabulary-chunked from the
hidden states and the LM head (sgcd_jax.losses.vocab.token_stats, "chunked": the chunk's logits are
recomputed in the backward pass, which the FLOP count does not credit). Torch: transformers' own loss,
fp32. Steps of ours, torch and a 2048^3 fp32 matmul probe are interleaved so all three see the same load
on a shared machine; medians are reported. Prints one JSON object: tokens/s for each, the ratio, measured
matmul peak, our model FLOP/s (3x forward matmuls, no remat/recompute credit) and its fraction of the peak.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sgcd_jax.losses.vocab import VocabConfig, token_stats
from sgcd_jax.models import load_model
from sgcd_jax.models.config import ATTENTION_IMPLS, REMAT_POLICIES, ModelConfig
from sgcd_jax.models.hf_format import adapter_for


def matmul_peak_probe(size: int = 2048) -> Callable[[], float]:
    """A probe returning the fp32 FLOP/s of one jitted [size,size]@[size,size] matmul on the default backend."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()

    def probe() -> float:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            matmul(a, a).block_until_ready()
            best = min(best, time.perf_counter() - start)
        return 2 * size**3 / best

    return probe


def train_step_flops(cfg: ModelConfig, batch: int, seq: int) -> float:
    """Matmul FLOPs of one fwd+bwd (3x forward) step, attention scores computed over the full T×T square."""
    d, hd = cfg.hidden_size, cfg.head_dim
    per_token = 2 * cfg.num_layers * (d * (cfg.num_heads + 2 * cfg.num_kv_heads) * hd + cfg.num_heads * hd * d
                                      + 3 * d * cfg.intermediate_size) + 2 * d * cfg.vocab_size
    attention = 4 * cfg.num_layers * batch * cfg.num_heads * seq * seq * hd
    return 3 * (per_token * batch * seq + attention)


def next_token_loss(model, tokens: jax.Array) -> jax.Array:
    """Mean cross-entropy of tokens[:, 1:] given tokens[:, :-1], full-vocab float32 logits."""
    batch, seq = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(seq - 1), (batch, seq - 1))
    hidden, _ = model(tokens[:, :-1], positions, jnp.ones((batch, seq - 1), bool))
    logprobs = jax.nn.log_softmax(model.logits(hidden), axis=-1)  # [B, T, V]
    return -jnp.mean(jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1))


def chunked_next_token_loss(model, tokens: jax.Array, chunk_size: int = 1024) -> jax.Array:
    """next_token_loss without [B,T,V] logits: log p(y) per vocabulary chunk straight from the hidden states."""
    batch, seq = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(seq - 1), (batch, seq - 1))
    hidden, _ = model(tokens[:, :-1], positions, jnp.ones((batch, seq - 1), bool))  # [B, T, D]
    stats = token_stats(hidden, model.lm_head_kernel(), tokens[:, 1:], VocabConfig(chunk_size=chunk_size),
                        features=("student_logprobs",))
    return -jnp.mean(stats["student_logprobs"])


LOSSES = {"full": next_token_loss, "chunked": chunked_next_token_loss}


def ours_stepper(model, tokens: np.ndarray, loss: str = "full") -> Callable[[], float]:
    """A closure running one jitted, donated fwd+bwd+AdamW step (compiled and warmed up here); returns the loss."""
    graphdef, params = nnx.split(model, nnx.Param)
    optimizer = optax.adamw(1e-5)
    carry = [params, optimizer.init(params)]
    loss_fn = LOSSES[loss]

    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p), tokens))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    tokens = jnp.asarray(tokens)

    def run() -> float:
        carry[0], carry[1], loss = step(carry[0], carry[1], tokens)
        return float(loss)  # blocks until the step is done

    run()
    run()  # the first call's outputs may carry other layouts than the loaded params: a second compile
    return run


def torch_stepper(cfg: ModelConfig, tokens: np.ndarray) -> Callable[[], float]:
    """The same step in transformers+torch (model built from the same config, AdamW), warmed up here."""
    import torch
    import transformers
    hf_config = adapter_for(cfg.architecture, "bench").config_to_hf(cfg)
    hf_config = transformers.AutoConfig.for_model(**{k: v for k, v in hf_config.items() if k != "architectures"})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    input_ids = torch.tensor(tokens[:, :-1], dtype=torch.long)  # same seq tokens as ours; HF shifts labels

    def run() -> float:
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    run()
    run()  # optimizer state allocation and allocator warm-up
    return run


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m sgcd_jax.bench train_step")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--loss", choices=sorted(LOSSES), default="full")
    parser.add_argument("--dtype", default="float32", help="compute dtype of ours (params stay float32)")
    parser.add_argument("--attention", choices=ATTENTION_IMPLS, default="xla")
    parser.add_argument("--remat", choices=REMAT_POLICIES, default="none")
    args = parser.parse_args(argv)

    model, _ = load_model(args.model, with_tokenizer=False, dtype=args.dtype, attention_impl=args.attention,
                          remat_policy=args.remat)
    cfg = model.cfg
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(args.batch, args.seq + 1)).astype(np.int32)
    peak_probe = matmul_peak_probe()
    ours = ours_stepper(model, tokens, args.loss)
    peer = None if args.skip_torch else torch_stepper(cfg, tokens)
    # Interleave ours / torch / matmul probe so both see the same machine load (the CPU may be shared).
    ours_s, torch_s, peaks = [], [], []
    for _ in range(args.steps):
        peaks.append(peak_probe())
        ours_s.append(timed(ours))
        if peer is not None:
            torch_s.append(timed(peer))
    ours_step, peak = float(np.median(ours_s)), float(np.median(peaks))
    trained_tokens = args.batch * args.seq
    result = {
        "bench": "train_step", "model": args.model, "batch": args.batch, "seq": args.seq, "steps": args.steps,
        "loss": args.loss, "dtype": args.dtype, "attention": args.attention, "remat": args.remat,
        "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind), "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "ours_tokens_per_s": trained_tokens / ours_step, "ours_step_s": ours_s,
        "matmul_peak_gflops": peak / 1e9,
        "ours_gflops": train_step_flops(cfg, args.batch, args.seq) / ours_step / 1e9,
    }
    result["ours_fraction_of_peak"] = result["ours_gflops"] * 1e9 / peak
    if peer is not None:
        torch_step = float(np.median(torch_s))
        result |= {"torch_tokens_per_s": trained_tokens / torch_step, "torch_step_s": torch_s,
                   "speedup_vs_torch": torch_step / ours_step}
    print(json.dumps(result, indent=2))
    return 0
