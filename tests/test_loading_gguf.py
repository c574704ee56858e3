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


def test_logits_match_transformers_gguf_load(smollm2, smollm2_torch, chat_prompt):
    model, _ = smollm2
    tokens = jnp.asarray([chat_prompt])
    hidden, _ = nnx.jit(lambda m, t: m(t, jnp.arange(t.shape[1])[None], jnp.ones_like(t, bool)))(model, tokens)
    ours = np.asarray(model.logits(hidden))[0]
    with torch.no_grad():
        theirs = smollm2_torch(torch.tensor([chat_prompt])).logits.numpy()[0]
    assert np.abs(ours - theirs).max() <= LOGIT_ATOL


@nnx.jit
def _decode_step(model, tokens, cache):
    mask = jnp.ones_like(tokens, dtype=bool)
    hidden, cache = model(tokens, cache.positions_for(mask), mask, cache)
    return jnp.argmax(model.logits(hidden[:, -1:]), axis=-1).astype(jnp.int32), cache


def test_greedy_32_token_chat_answer_matches_transformers(smollm2, smollm2_torch, chat_prompt):
    model, tokenizer = smollm2
    cache = KVCache.init(model.cfg, 1, len(chat_prompt) + 32)
    next_token, cache = _decode_step(model, jnp.asarray([chat_prompt]), cache)
    ours = []
    for _ in range(32):
        ours.append(int(next_token[0, 0]))
        next_token, cache = _decode_step(model, next_token, cache)
    out = smollm2_torch.generate(torch.tensor([chat_prompt]), max_new_tokens=32, min_new_tokens=32,
                                 do_sample=False, eos_token_id=None, pad_token_id=2)
    theirs = out[0, len(chat_prompt):].tolist()
    assert ours == theirs, (tokenizer.decode(ours), tokenizer.decode(theirs))
    assert "Paris" in tokenizer.decode(ours)
