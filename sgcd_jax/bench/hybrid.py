"""python -m sgcd_jax.bench hybrid — the Qwen3.5 hybrid decoder (Gated DeltaNet + gated attention), ours vs
transformers' pure-torch Qwen3.5 (its fallback path: torch chunked/recurrent gated delta rule) on the same weights.

1. Training shape: forward + backward of the mean next-token cross-entropy over [batch, seq] tokens, tokens/s.
   Ours: one jitted value_and_grad (chunked DeltaNet form). Theirs: model(ids, labels=ids).loss.backward().
2. Decode: greedy generation of exactly `--new-tokens` tokens at batch `--decode-batch` (8), tokens/s.
   Ours: the project's Sampler (jitted prefill + while-loop decode, recurrent DeltaNet form with the state in the
   cache). Theirs: model.generate(do_sample=False) with its cache.
Both sides run float32 on the host CPU in this process unless JAX sees an accelerator (reported as `jax_backend`;
torch is always CPU here). Timings are the best of `--repeats` after one warm-up (compilation excluded).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np


def _best_time(fn, repeats: int) -> float:
    fn()  # warm-up / compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _hf_model(args):
    import torch
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig
    torch.manual_seed(0)
    config = Qwen3_5TextConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(args.hidden // 128, 1),
        head_dim=64, linear_num_key_heads=args.hidden // 128, linear_num_value_heads=args.hidden // 64,
        linear_key_head_dim=64, linear_value_head_dim=64, linear_conv_kernel_dim=4, max_position_embeddings=4096,
        tie_word_embeddings=False, eos_token_id=None, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})
    config._attn_implementation = "eager"
    return Qwen3_5ForCausalLM(config).eval(), config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sgcd_jax.bench hybrid")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4, help="every 4th is full attention")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--decode-batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import optax
    import torch
    from flax import nnx

    from sgcd_jax.models import load_model
    from sgcd_jax.sampling.rules import SamplingParams
    from sgcd_jax.sampling.session import Sampler

    if args.threads:
        torch.set_num_threads(args.threads)
    hf, _ = _hf_model(args)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model, _ = load_model(tmp, with_tokenizer=False)
    cfg = model.cfg
    rng = np.random.default_rng(0)
    ids = rng.integers(1, args.vocab, (args.batch, args.seq)).astype(np.int32)

    # --- 1. forward + backward
    graphdef, params = nnx.split(model)

    @jax.jit
    def loss_and_grad(params, tokens):
        def loss_fn(params):
            m = nnx.merge(graphdef, params)
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
            hidden, _ = m(tokens, positions, jnp.ones(tokens.shape, bool))
            logits = m.logits(hidden)[:, :-1]
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        return jax.value_and_grad(loss_fn)(params)

    tokens = jnp.asarray(ids)
    ours_train = _best_time(lambda: jax.block_until_ready(loss_and_grad(params, tokens)), args.repeats)
    torch_ids = torch.from_numpy(ids.astype(np.int64))

    def torch_step():
        hf.zero_grad(set_to_none=True)
        hf(torch_ids, labels=torch_ids).loss.backward()

    theirs_train = _best_time(torch_step, args.repeats)
    ours_loss = float(loss_and_grad(params, tokens)[0])
    with torch.no_grad():
        their_loss = float(hf(torch_ids, labels=torch_ids).loss)

    # --- 2. greedy decode at batch decode_batch
    prompts = rng.integers(1, args.vocab, (args.decode_batch, args.prompt_len)).tolist()
    sampler = Sampler(model, params=SamplingParams(temperature=0.0), stop_token_ids=(),
                      decode_steps_per_chunk=args.new_tokens, min_cache_len=args.prompt_len + args.new_tokens + 1)
    outputs = {}

    def ours_decode():
        outputs["ours"] = sampler.generate(prompts, max_new_tokens=args.new_tokens, rng=jax.random.key(0))

    def theirs_decode():
        with torch.no_grad():
            outputs["theirs"] = hf.generate(torch.tensor(prompts), max_new_tokens=args.new_tokens,
                                            min_new_tokens=args.new_tokens, do_sample=False)

    ours_decode_s = _best_time(ours_decode, args.repeats)
    theirs_decode_s = _best_time(theirs_decode, args.repeats)
    theirs_tokens = outputs["theirs"][:, args.prompt_len:].tolist()
    agree = float(np.mean([list(o.token_ids) == t for o, t in zip(outputs["ours"], theirs_tokens)]))

    train_tokens = args.batch * args.seq
    decode_tokens = args.decode_batch * args.new_tokens
    result = {
        "benchmark": "hybrid",
        "model": {"hidden": cfg.hidden_size, "layers": cfg.num_layers, "layer_types": list(cfg.layer_types),
                  "vocab": cfg.vocab_size, "params": int(sum(p.numel() for p in hf.parameters())),
                  "deltanet_chunk_size": cfg.extra.get("deltanet_chunk_size", 64)},
        "jax_backend": jax.default_backend(), "torch_threads": torch.get_num_threads(),
        "train_fwd_bwd": {"batch": args.batch, "seq": args.seq,
                          "ours_tokens_per_s": train_tokens / ours_train,
                          "transformers_torch_tokens_per_s": train_tokens / theirs_train,
                          "speedup": theirs_train / ours_train,
                          "loss_ours": ours_loss, "loss_transformers": their_loss},
        "decode": {"batch": args.decode_batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                   "ours_tokens_per_s": decode_tokens / ours_decode_s,
                   "transformers_torch_tokens_per_s": decode_tokens / theirs_decode_s,
                   "speedup": theirs_decode_s / ours_decode_s, "greedy_rows_identical": agree},
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
