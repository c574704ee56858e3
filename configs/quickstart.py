"""Quickstart (what ``python -m sgcd_jax.train`` runs with no --config).

A tiny random-init Decoder (2 layers, d=128) on a 1,024-token BPE trained on airline_lite's own text
with SmolLM2's special tokens and chat template (sgcd_jax/domain_tokenizer.py: SmolLM2's 49k vocab
made the LM head >90% of the step), trained on airline_lite (easy) on CPU: an SFT warm-up on oracle
demonstrations, then SGCD RL with the offline ContrastAnnotator. No network, API key or accelerator.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import base  # noqa: E402


def get_config():
    cfg = base.get_config()
    cfg.run.name = "quickstart"
    cfg.run.num_iterations = 10
    cfg.run.eval_every = 4
    cfg.run.checkpoint_every = 4
    cfg.model.source = "tiny"
    cfg.model.tokenizer = "domain-bpe"
    cfg.model.domain_vocab_size = 1024
    cfg.model.hidden_size = 128
    cfg.model.intermediate_size = 256
    cfg.model.num_layers = 2
    cfg.model.num_heads = 4
    cfg.model.num_kv_heads = 2
    cfg.model.head_dim = 32
    cfg.env.name = "airline_lite"
    cfg.env.difficulty = "easy"
    cfg.env.num_tasks = 64
    cfg.env.max_turns = 6
    cfg.rollout.tasks_per_iteration = 4
    cfg.rollout.group_size = 4
    cfg.rollout.max_new_tokens = 96  # a get_flight_status call is ~50 domain-BPE tokens; 48 truncated it
    cfg.rollout.max_total_tokens = 1024
    cfg.rollout.temperature = 1.0
    cfg.credit.annotator = "contrast"
    cfg.loss.credit = "sgcd"
    cfg.optim.learning_rate = 3e-4
    cfg.optim.warmup_steps = 0
    cfg.optim.micro_batch_size = 8
    cfg.sft.enabled = True
    cfg.sft.num_demos = 64
    cfg.sft.steps = 200  # measured: 300 steps reach NLL 0.09 and well-formed tool calls
    cfg.sft.batch_size = 8
    cfg.sft.learning_rate = 3e-3
    cfg.eval.num_tasks = 16
    return cfg
