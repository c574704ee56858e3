"""SGCD with the real SmolLM2-135M-Instruct (GGUF, offline) on airline_lite, on CPU.

Slow on 2 cores (a 135M model: ~minutes per iteration); the tiny quickstart is the fast path.
    python -m sgcd_jax.train --config configs/smollm2_airline_lite.py
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
    cfg.optim.micro_batch_size = 4
    cfg.sft.enabled = False  # a pretrained chat model; enable to warm up on oracle demos
    cfg.sft.demo_shortcut = ""  # oracle demos only (the quickstart's imperfect demonstrator is not inherited)
    cfg.sft.demo_shortcut_rate = 0.0
    cfg.run.export_hf = True
    return cfg
