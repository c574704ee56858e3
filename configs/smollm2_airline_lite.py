"""SGCD with the real SmolLM2-135M-Instruct (GGUF, offline) on airline_lite, on CPU.

Slow on 2 cores (a 135M model: ~minutes per iteration); the tiny quickstart is the fast path.
    python -m sgcd_jax.train --config configs/smollm2_airline_lite.py

Memory: the learner pads rows to the batch's longest conversation (a power-of-two bucket, here 1-2k
tokens; airline_lite's longest first prompt is 497 SmolLM2 tokens), recomputes each block in the
backward (remat 'full') and takes 2 rows per micro-batch: XLA attention keeps [rows, 9 heads, T, T]
scores per layer, which without remat at 4 rows x 2,176 tokens asked for 60 GB.
Not yet within 8 GB (--config.sft.steps=3 --config.run.num_iterations=1, VmHWM polled, 2-core CPU): the SFT
warm-up peaks at 4.5 GiB RSS; checkpoints no longer add ~3.9 GB (integrity fingerprint per leaf); the RL scoring pass,
in micro-batches of 2 rows (optim.score_micro_batch_size), 12.0 -> 5.1 GiB; the rollout's first turn over 32 rows
(fp32 KV cache, 2,560-slot top bucket) peaks at 8.1 GiB, the recipe's peak now.
Warm-up: without one SmolLM2 scores 0/24 here, so every group advantage is 0 and nothing trains; a
short SFT on oracle demonstrations (cached in runs/sft_cache) gives it the tool-call format first.
"""

from sgcd_jax.config_files import base_config


def get_config():
    cfg = base_config("sgcd")
    cfg.run.name = "smollm2_airline_lite"
    cfg.run.num_iterations = 50
    cfg.run.eval_every = 10
    cfg.run.checkpoint_every = 10
    cfg.model.source = "smollm2-135m-instruct"
    cfg.rollout.max_total_tokens = 2048
    cfg.rollout.max_new_tokens = 128
    cfg.rollout.temperature = 0.8
    cfg.optim.learning_rate = 1e-6
    cfg.optim.warmup_steps = 5
    cfg.optim.micro_batch_size = 2
    cfg.optim.score_micro_batch_size = 2  # the no-grad scoring pass in micro-batches too (16 rows x 2,048 at once: 3.25 GiB XLA temp)
    cfg.model.remat_policy = "full"
    cfg.rollout.reserve_kv_budget = False  # KV slots grown as conversations need: 32 rows x ~2.3k reserved slots were 3 GB
    # An iteration whose groups are all-fail or all-success has no policy gradient; keeping it (annotation's "grpo")
    # still ran the 32 x 2k-token update (~40 min on 2 cores) for a zero policy gradient. Dropped here: no update then.
    cfg.annotation.non_mixed_groups = "drop"
    cfg.eval.num_tasks = 16
    cfg.eval.at_start = False  # 16 greedy SmolLM2 episodes on 2 cores take minutes; enable for a baseline
    cfg.sft.enabled = True  # warm-up on oracle demos: rewards are not all 0 (docstring)
    cfg.sft.num_demos = 64
    cfg.sft.steps = 40
    cfg.sft.batch_size = 4
    cfg.sft.learning_rate = 2e-5
    cfg.sft.cache_dir = "runs/sft_cache"
    cfg.sft.demo_shortcut = ""  # oracle demos only (the quickstart's imperfect demonstrator is not inherited)
    cfg.sft.demo_shortcut_rate = 0.0
    # Inherited from the quickstart: compact references ("step k verdict") and a quarter of each warm-up batch
    # teaching the teacher to read them (trainer/reading_demos.py); in SmolLM2's tokens a line is ~5 tokens.
    cfg.annotation.reference_tokens = 64
    cfg.run.export_hf = True
    return cfg
