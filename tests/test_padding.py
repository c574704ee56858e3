"""The learner pads rows to the batch's longest conversation (power-of-two bucket), not the budget."""

import numpy as np

from sgcd_jax.config_files import load_config_file
from sgcd_jax.rollout.trajectory import Trajectory
from sgcd_jax.learner.batch_layout import padded_length


def _traj(n):
    return Trajectory(task_id="t", group_id="g", sample_index=0, token_ids=np.ones(n, np.int32),
                      loss_mask=np.ones(n, np.int32), step_ids=np.zeros(n, np.int32),
                      sampler_logprobs=np.zeros(n, np.float32), prompt_len=1, messages=[], steps=[])


def test_rows_are_padded_to_the_longest_bucket_not_the_budget():
    config = load_config_file("configs/smollm2_airline_lite.py")  # budget 2,048 + one 128-token turn
    cap = config.rollout.max_total_tokens + config.rollout.max_new_tokens
    assert padded_length([_traj(40), _traj(200)], config) == 256
    assert padded_length([_traj(700), _traj(900)], config) == 1024
    assert padded_length([_traj(1500)], config) == 2048
    assert padded_length([_traj(2100)], config) == cap  # bucket 4096 capped at the budget
    assert padded_length([_traj(cap + 5)], config) == cap + 5  # never shorter than a row
