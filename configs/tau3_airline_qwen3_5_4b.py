"""The paper's setting: SGCD on τ³-airline with Qwen3.5-4B (hybrid Gated DeltaNet + gated attention), at
accelerator scale (one 8×H100 node or a TPU v5p-8; see docs/memory_plan.md).

    QWEN3_5_4B_DIR=/path/to/Qwen3.5-4B GEMINI_API_KEY=... \\
        python -m sgcd_jax.train --config configs/tau3_airline_qwen3_5_4b.py

`model.source` is an HF checkpoint directory (the released Qwen/Qwen3.5-4B VLM checkpoint works: the text decoder
is loaded and the vision tower is skipped with a log line; `config.json` decides every architecture number).
fp32 master params with bf16 compute; the DeltaNet chunked form accumulates in fp32 regardless.
Memory (sgcd_jax.models.qwen3_5.num_params / cache_bytes on the public 4B settings): 4.21B text params;
rollout cache for 64 trajectories × 16384 tokens = 32 GiB of bf16 k/v (8 full-attention layers only) + 3.1 GiB of
DeltaNet states, i.e. ~4 GiB per GPU with rows split over 8 devices.
"""

import os

from sgcd_jax.config_files import base_config


def get_config():
    cfg = base_config("base")
    cfg.run.name = "tau3_airline_qwen3_5_4b_sgcd"
    cfg.run.num_iterations = 200
    cfg.run.eval_every = 20
    cfg.run.checkpoint_every = 10
    cfg.run.export_hf = True
    cfg.model.source = os.environ.get("QWEN3_5_4B_DIR", "checkpoints/Qwen3.5-4B")
    cfg.model.source_env = "QWEN3_5_4B_DIR"  # named by the preflight error when the dir is missing
    cfg.model.param_dtype = "float32"
    cfg.model.dtype = "bfloat16"
    cfg.model.attention_impl = "cudnn"  # GPU flash attention (bf16); jax 0.10 "auto" = XLA's [T,S] scores. TPU: "xla"
    cfg.model.remat_policy = "full"  # recompute each block in the backward: what docs/memory_plan.md assumes
    cfg.model.max_position_embeddings = 262144
    cfg.env.name = "tau3_airline"
    cfg.env.train_split = "train"
    cfg.env.eval_split = "test"
    cfg.env.max_turns = 30
    cfg.env.user = "gemini"
    cfg.rollout.tasks_per_iteration = 8
    cfg.rollout.group_size = 8  # 64 trajectories decoded together
    cfg.rollout.max_new_tokens = 1024
    cfg.rollout.max_total_tokens = 16384
    cfg.rollout.temperature = 1.0
    cfg.annotation.name = "gemini"
    cfg.annotation.asynchronous = True  # Gemini latency overlaps the next rollout (one-step-stale update)
    cfg.annotation.max_oversample_rounds = 2
    cfg.annotation.reference_tokens = 1024
    cfg.loss.credit = "sgcd"
    cfg.optim.learning_rate = 1e-6
    cfg.optim.warmup_steps = 10
    cfg.optim.weight_decay = 0.01
    cfg.optim.micro_batch_size = 8
    cfg.optim.score_micro_batch_size = 8  # the scoring pass per micro-batch, as the update
    cfg.eval.num_tasks = 20
    cfg.eval.trials = 4
    cfg.mesh.data = 4
    cfg.mesh.fsdp = 2
    cfg.mesh.tp = 1
    return cfg
