"""Quickstart (what ``python -m sgcd_jax.train`` runs with no --config).

A tiny random-init Decoder on SmolLM2's real tokenizer and chat template, trained on airline_lite
(easy) on CPU: a short SFT warm-up on oracle demonstrations, then SGCD RL with the offline
ContrastAnnotator. No network, API key or accelerator; sized for <=5 min on 2 CPU cores.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import base  # noqa: E402


def get_config():
    cfg = base.get_config()
    cfg.run.name = "quickstart"
    cfg.run.num_iterations = 12
    cfg.run.eval_every = 4
    cfg.run.checkpoint_every = 4
    cfg.model.source = "tiny"
    cfg.model.tokenizer = "domain-bpe"
    cfg.model.domain_vocab_size = 1024
    cfg.model.hidden_size = 64
    cfg.model.intermediate_size = 128
    cfg.model.num_layers = 2
    cfg.model.num_heads = 4
    cfg.model.num_kv_heads = 2
    cfg.model.head_dim = 16
    cfg.env.name = "airline_lite"
    cfg.env.difficulty = "easy"
    cfg.env.num_tasks = 64
    cfg.env.max_turns = 6
    cfg.rollout.tasks_per_iteration = 4
    cfg.rollout.group_size = 4
    cfg.rollout.max_new_tokens = 48
    cfg.rollout.max_total_tokens = 1024
    cfg.rollout.temperature = 1.0
    cfg.credit.annotator = "contrast"
    cfg.loss.credit = "sgcd"
    cfg.optim.learning_rate = 3e-4
    cfg.optim.warmup_steps = 0
    cfg.optim.micro_batch_size = 8
    cfg.sft.enabled = True
    cfg.sft.num_demos = 64
    cfg.sft.steps = 60
    cfg.sft.batch_size = 8
    cfg.sft.learning_rate = 3e-3
    cfg.eval.num_tasks = 16
    return cfg
