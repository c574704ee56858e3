"""Sampler greedy output on the real SmolLM2-135M-Instruct (GGUF) equals transformers' greedy `generate`
(torch, its own GGUF load) on a chat prompt, stopping at the template's end-of-turn token."""

import os

import jax
import numpy as np
import pytest
import torch

from sgcd_jax.models import load_model
from sgcd_jax.models.chat import ChatRenderer
from sgcd_jax.models.loading import resolve_model_path
from sgcd_jax.sampling import Sampler, SamplingParams

pytestmark = pytest.mark.slow
NEW_TOKENS = 24


def test_greedy_chat_generation_equals_transformers_generate():
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_model("smollm2-135m-instruct")
    renderer = ChatRenderer(tokenizer)
    prompts = [renderer.prompt_ids([{"role": "user", "content": "What is the capital of France?"}]),
               renderer.prompt_ids([{"role": "system", "content": "You are a terse airline agent."},
                                    {"role": "user", "content": "Can I change my flight to tomorrow?"}])]
    sampler = Sampler(model, params=SamplingParams(temperature=0.0), stop_token_ids=renderer.stop_token_ids(),
                      decode_steps_per_chunk=8)
    ours = sampler.generate(prompts, max_new_tokens=NEW_TOKENS, rng=jax.random.key(0))

    path = resolve_model_path("smollm2-135m-instruct")
    reference = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                     dtype=torch.float32).eval()
    for prompt, out in zip(prompts, ours):
        with torch.no_grad():
            theirs = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                        do_sample=False, max_new_tokens=NEW_TOKENS,
                                        eos_token_id=list(renderer.stop_token_ids()),
                                        pad_token_id=tokenizer.eos_token_id)[0, len(prompt):].numpy()
        assert out.token_ids.tolist() == theirs.tolist(), tokenizer.decode(theirs)
        assert out.finish_reason == ("stop_token" if len(theirs) < NEW_TOKENS or theirs[-1] in
                                     renderer.stop_token_ids() else "length")
        assert np.all(out.logprobs == 0.0)  # greedy samples a point mass (see sampling.rules)
