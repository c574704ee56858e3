"""HF checkpoint loading and export vs transformers+torch on tiny random Llama / Qwen2 / Qwen3 models."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from sgcd_jax.models import Decoder, KVCache, ModelConfig, load_model
from sgcd_jax.models.export import export_hf

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, initializer_range=0.2,
            rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
HF_MODELS = {
    # llama3 RoPE scaling with a short original context so all three frequency bands are exercised
    "llama": lambda: transformers.LlamaConfig(**TINY, tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE),
    "qwen2": lambda: transformers.Qwen2Config(**TINY, tie_word_embeddings=True, rope_parameters={
        "rope_type": "default", "rope_theta": 1e6}),
    "qwen3": lambda: transformers.Qwen3Config(**TINY, tie_word_embeddings=False),
}
MODEL_CLASSES = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                 "qwen3": transformers.Qwen3ForCausalLM}


@pytest.fixture(scope="module", params=sorted(HF_MODELS))
def hf_checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    ref = MODEL_CLASSES[request.param](HF_MODELS[request.param]()).eval()
    if request.param == "qwen2":  # random init leaves biases at zero; make them matter
        with torch.no_grad():
            for layer in ref.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    return str(path), ref


def hf_logits(ref, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return ref(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()


def padded_batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 128, size=(3, 10))
    lengths = np.array([10, 7, 4])
    mask = np.arange(10)[None] < lengths[:, None]
    return np.where(mask, tokens, 0), mask


def test_logits_equal_transformers_on_padded_batch(hf_checkpoint):
    path, ref = hf_checkpoint
    model, _ = load_model(path, with_tokenizer=False)
    tokens, mask = padded_batch()
    positions = np.broadcast_to(np.arange(10), tokens.shape)
    _, ours, _ = forward_logits(model, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask), None)
    ours, theirs = np.asarray(ours), hf_logits(ref, tokens, mask)
    assert np.abs(ours - theirs)[mask].max() <= 1e-4


@nnx.jit
def forward_logits(model: Decoder, tokens, positions, mask, cache):
    hidden, cache = model(tokens, positions, mask, cache)
    return hidden, model.logits(hidden), cache


def greedy_with_cache(model: Decoder, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Prefill a right-padded batch in one chunk, then decode T=1 steps with per-row positions."""
    width = max(map(len, prompts))
    tokens = np.array([p + [0] * (width - len(p)) for p in prompts])
    mask = np.arange(width)[None] < np.array([len(p) for p in prompts])[:, None]
    cache = KVCache.init(model.cfg, len(prompts), width + steps)
    _, logits, cache = forward_logits(model, jnp.asarray(tokens), cache.positions_for(jnp.asarray(mask)),
                                      jnp.asarray(mask), cache)
    last = logits[jnp.arange(len(prompts)), jnp.asarray(mask.sum(1) - 1)][:, None]  # [B, 1, V]
    generated = []
    for _ in range(steps):
        next_tokens = jnp.argmax(last, axis=-1).astype(jnp.int32)  # [B, 1]
        generated.append(np.asarray(next_tokens[:, 0]))
        ones = jnp.ones_like(next_tokens, dtype=bool)
        _, last, cache = forward_logits(model, next_tokens, cache.positions_for(ones), ones, cache)
    return np.stack(generated, 1).tolist()


def test_greedy_kv_cache_decode_equals_transformers_generate(hf_checkpoint):
    path, ref = hf_checkpoint
    model, _ = load_model(path, with_tokenizer=False)
    prompts = [[5, 17, 99, 42, 8, 61], [33, 7, 120]]  # different lengths: per-row positions and padding
    ours = greedy_with_cache(model, prompts, steps=8)
    for prompt, row in zip(prompts, ours):
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                           pad_token_id=0, eos_token_id=None)
        assert out[0, len(prompt):].tolist() == row


def test_bf16_compute_stays_close_to_fp32(hf_checkpoint):
    path, ref = hf_checkpoint
    model, _ = load_model(path, dtype="bfloat16", with_tokenizer=False)
    tokens, mask = padded_batch()
    hidden, ours, _ = forward_logits(model, jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(10), tokens.shape),
                                     jnp.asarray(mask), None)
    ours, theirs = np.asarray(ours), hf_logits(ref, tokens, mask)
    assert hidden.dtype == jnp.bfloat16
    # bf16 has an 8-bit mantissa: relative error ~1e-2 of the logit scale after a few layers
    assert np.abs(ours - theirs)[mask].max() <= 0.05 * np.abs(theirs).max()


def test_export_round_trip_loads_in_transformers_with_same_logits(tmp_path):
    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                      qk_norm=True, tie_word_embeddings=False, architecture="Qwen3ForCausalLM", rope_theta=1e6,
                      rms_norm_eps=1e-6, max_position_embeddings=256)
    model = Decoder(cfg, rngs=nnx.Rngs(3))
    # make every norm scale non-trivial so a dropped or misnamed norm changes the logits
    _, state = nnx.split(model, nnx.Param)
    nnx.update(model, jax.tree_util.tree_map_with_path(
        lambda p, x: x * 1.5 if "norm" in jax.tree_util.keystr(p) else x, state))
    export_hf(model, str(tmp_path / "export"), max_shard_bytes=60_000)  # forces the sharded-index form
    assert (tmp_path / "export" / "model.safetensors.index.json").exists()
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), dtype=torch.float32).eval()
    tokens, mask = padded_batch()
    _, ours, _ = forward_logits(model, jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(10), tokens.shape),
                                jnp.asarray(mask), None)
    assert np.abs(np.asarray(ours) - hf_logits(ref, tokens, mask))[mask].max() <= 1e-4
    reloaded, _ = load_model(str(tmp_path / "export"), with_tokenizer=False)
    np.testing.assert_array_equal(np.asarray(reloaded.lm_head_kernel()), np.asarray(model.lm_head_kernel()))


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def llama_dir(tmp_path):
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_missing_path_names_the_path_and_the_accepted_forms(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*HF checkpoint directory.*\.gguf"):
        load_model(str(tmp_path / "nowhere"))


def test_missing_config_json_names_the_file_and_the_fix(llama_dir):
    (llama_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing.*save_pretrained"):
        load_model(str(llama_dir), with_tokenizer=False)


def test_missing_weights_name_the_directory(llama_dir):
    for file in llama_dir.glob("*.safetensors"):
        file.unlink()
    with pytest.raises(FileNotFoundError, match=rf"no \*\.safetensors in {llama_dir}"):
        load_model(str(llama_dir), with_tokenizer=False)


def test_unknown_architecture_names_the_file_and_the_supported_ones(llama_dir):
    config = json.loads((llama_dir / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (llama_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: unknown architecture 'GPTNeoXForCausalLM'.*LlamaForCausalLM"):
        load_model(str(llama_dir), with_tokenizer=False)


def test_config_weight_shape_mismatch_names_tensor_file_and_fix(llama_dir):
    config = json.loads((llama_dir / "config.json").read_text())
    config["intermediate_size"] = 128
    (llama_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape"
                                         r".*config\.json and the weights disagree"):
        load_model(str(llama_dir), with_tokenizer=False)
