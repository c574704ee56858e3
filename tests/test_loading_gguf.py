"""The real SmolLM2-135M-Instruct GGUF (Q4_1) vs transformers' own GGUF load (torch).

Both sides dequantise the same Q4_1/Q8_0 blocks to the same float32 weights, so the only difference is
float32 summation order across 30 layers: expect relative logit error ~1e-6 (observed max |Δ| ~1.5e-4 on
logits of magnitude ~40). The tolerance 2e-3 is ~10x that and still far below what any real mistake
(a wrong RoPE layout, a missed norm, a Q/K permutation left in) produces, which is O(1).
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from sgcd_jax.models import KVCache, load_model
from sgcd_jax.models.chat import ChatRenderer
from sgcd_jax.models.loading import resolve_model_path

pytestmark = pytest.mark.slow
LOGIT_ATOL = 2e-3


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_model("smollm2-135m-instruct")
    return model, tokenizer


@pytest.fixture(scope="module")
def smollm2_torch():
    from transformers import AutoModelForCausalLM
    path = resolve_model_path("smollm2-135m-instruct")
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def chat_prompt(smollm2):
    _, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    return ChatRenderer(tokenizer).prompt_ids(messages)


def test_config_read_from_gguf_metadata(smollm2):
    cfg = smollm2[0].cfg
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0


@nnx.jit
def _decode_step(model, tokens, cache):
    mask = jnp.ones_like(tokens, dtype=bool)
    hidden, cache = model(tokens, cache.positions_for(mask), mask, cache)
    return model.logits(hidden)[:, -1], cache  # [B, V]


@pytest.fixture(scope="module")
def greedy_run(smollm2, chat_prompt):
    """Feed the prompt one token at a time through the KV cache (one compiled T=1 step), then decode 32 greedy
    tokens. Returns (logits at every prompt position [P, V], generated ids)."""
    model, _ = smollm2
    cache = KVCache.init(model.cfg, 1, len(chat_prompt) + 32)
    prompt_logits = []
    for token in chat_prompt:
        logits, cache = _decode_step(model, jnp.asarray([[token]]), cache)
        prompt_logits.append(np.asarray(logits[0]))
    generated = []
    for _ in range(32):
        generated.append(int(np.argmax(logits[0])))
        logits, cache = _decode_step(model, jnp.asarray([[generated[-1]]]), cache)
    return np.stack(prompt_logits), generated


def test_cached_logits_match_transformers_gguf_load(smollm2_torch, chat_prompt, greedy_run):
    with torch.no_grad():
        theirs = smollm2_torch(torch.tensor([chat_prompt])).logits.numpy()[0]
    assert np.abs(greedy_run[0] - theirs).max() <= LOGIT_ATOL


def test_greedy_32_token_chat_answer_matches_transformers(smollm2, smollm2_torch, chat_prompt, greedy_run):
    _, tokenizer = smollm2
    out = smollm2_torch.generate(torch.tensor([chat_prompt]), max_new_tokens=32, min_new_tokens=32,
                                 do_sample=False, eos_token_id=None, pad_token_id=2)
    theirs = out[0, len(chat_prompt):].tolist()
    ours = greedy_run[1]
    assert ours == theirs, (tokenizer.decode(ours), tokenizer.decode(theirs))
    assert "Paris" in tokenizer.decode(ours)
