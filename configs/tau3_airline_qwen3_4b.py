"""Accelerator-scale recipe: SGCD on τ³-airline (official 30 train / 20 test tasks) with Qwen3-4B.

Needs a Qwen3-4B HF checkpoint directory (config.json + *.safetensors) at $QWEN3_4B_DIR (no hub
downloads here), an LLM user simulator (GEMINI_API_KEY / Vertex env vars for google-genai) and a
credit annotator (Gemini, contrast fallback). Sized for one 8-chip host (data × fsdp mesh).
    python -m sgcd_jax.train --config configs/tau3_airline_qwen3_4b.py
"""

import os

from sgcd_jax.config_files import base_config


def get_config():
    cfg = base_config("base")
    cfg.run.name = "tau3_airline_qwen3_4b"
    cfg.run.num_iterations = 200
    cfg.run.eval_every = 20
    cfg.run.checkpoint_every = 10
    cfg.run.keep_checkpoints = 3
    cfg.run.export_hf = True
    cfg.model.source = os.environ.get("QWEN3_4B_DIR", "/models/Qwen3-4B")
    cfg.model.source_env = "QWEN3_4B_DIR"  # named by the preflight error when the dir is missing
    cfg.model.param_dtype = "bfloat16"  # the forward/rollout copy; the learner keeps fp32 master weights
    cfg.optim.master_dtype = "float32"  # + fp32 AdamW moments (default). "param" = bf16-only, stochastic rounding
    cfg.model.dtype = "bfloat16"
    cfg.model.attention_impl = "cudnn"  # GPU flash attention (bf16); jax 0.10 "auto" = XLA's [T,S] scores. TPU: "xla"
    cfg.model.remat_policy = "full"  # recompute each block in the backward: what docs/memory_plan.md assumes
    cfg.env.name = "tau3_airline"
    cfg.env.train_split = "train"
    cfg.env.eval_split = "test"
    cfg.env.max_turns = 30
    cfg.env.user = "gemini"
    cfg.rollout.tasks_per_iteration = 16
    cfg.rollout.group_size = 8
    cfg.rollout.max_new_tokens = 1024
    cfg.rollout.max_total_tokens = 16384
    cfg.rollout.temperature = 1.0
    cfg.annotation.name = "gemini"
    cfg.annotation.asynchronous = True  # Gemini latency overlaps the next rollout (one-step-stale update)
    cfg.annotation.model = "gemini-2.5-flash"
    cfg.annotation.non_mixed_groups = "drop"
    cfg.annotation.max_oversample_rounds = 2
    cfg.annotation.reference_tokens = 2048
    cfg.loss.credit = "sgcd"
    cfg.loss.vocab_chunk = 1024
    cfg.optim.learning_rate = 1e-6
    cfg.optim.warmup_steps = 10
    cfg.optim.micro_batch_size = 8
    cfg.optim.score_micro_batch_size = 8  # the scoring pass per micro-batch, as the update
    cfg.optim.grad_clip = 1.0
    cfg.eval.num_tasks = 20
    cfg.eval.trials = 4
    cfg.mesh.data = -1
    cfg.mesh.fsdp = 8
    return cfg
