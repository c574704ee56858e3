"""The learner: packing and the jitted scoring pass (scoring.py), the jitted micro-batched update and
Learner (train_step.py), rows over processes and devices (batch_layout.py). Never imports trainer/."""
