"""The training loop's world and phases: Trainer (trainer.py), rollout/update phases, SFT warm-up and eval
(phases.py), annotation → teacher prompts (teacher_context.py), episode metrics and report samples
(episode_summary.py), checkpoints (checkpoint.py), the SFT cache (sft_cache.py)."""
