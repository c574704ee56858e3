"""Qwen3.5 hybrid decoder vs transformers' pure-torch Qwen3.5 on tiny random checkpoints written by save_pretrained:
logits on a padded batch (several DeltaNet chunks, lengths not dividing the chunk), cached decode vs fresh forward,
greedy generation through the project's Sampler, VLM checkpoint loading (vision tower ignored), export round trip,
partition rules."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import Mesh

from sgcd_jax.models import KVCache, load_model
from sgcd_jax.models import qwen3_5
from sgcd_jax.models.export import export_hf
from sgcd_jax.models.loading import hf_config
from sgcd_jax.sampling.rules import SamplingParams
from sgcd_jax.sampling.session import Sampler
from sgcd_jax.parallel.sharding import state_shardings

CHUNK = 8  # our DeltaNet chunk; transformers uses 64 (the math must not depend on it)
TEXT = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
            linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4, rms_norm_eps=1e-6,
            tie_word_embeddings=False, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Perturb every weight (norm offsets, A_log, dt_bias too) so no parameter sits at a symmetric init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.3 if name.endswith(("norm.weight", "dt_bias", "A_log")) else 0.15
            param.add_(torch.randn(param.shape, generator=generator) * scale)


@pytest.fixture(scope="module")
def hf_text(tmp_path_factory):
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig
    torch.manual_seed(0)
    config = Qwen3_5TextConfig(**TEXT)
    config._attn_implementation = "eager"
    model = Qwen3_5ForCausalLM(config).eval()
    _randomize(model, 0)
    path = tmp_path_factory.mktemp("qwen3_5_text")
    model.save_pretrained(path)
    return model, str(path)


def _load(path):
    extra = {**hf_config(path).extra, "deltanet_chunk_size": CHUNK}
    return load_model(path, with_tokenizer=False, extra=extra)[0]


@functools.partial(jax.jit, static_argnums=0)
def _forward_logits(graphdef, state, tokens, mask):
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return model.logits(model(tokens, positions, mask)[0])


def forward_logits(model, tokens, mask):
    graphdef, state = nnx.split(model)
    return np.asarray(_forward_logits(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask)))


def hf_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].numpy()


LENGTHS = (29, 17, 5)  # 29 = 3 chunks + 5: several chunks, not divisible by CHUNK; row 2 shorter than one chunk


def padded_batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = np.zeros((len(LENGTHS), max(LENGTHS)), np.int32)
    mask = np.zeros_like(tokens, bool)
    for row, n in enumerate(LENGTHS):
        tokens[row, :n] = rng.integers(3, TEXT["vocab_size"], n)
        mask[row, :n] = True
    return tokens, mask


def test_config_maps_layer_types_partial_rotary_and_linear_dims(hf_text):
    cfg = _load(hf_text[1]).cfg
    assert cfg.layer_types == ("linear_attention",) * 3 + ("gated_full_attention",)
    assert cfg.rotary_dim == 4 and cfg.head_dim == 16 and cfg.architecture == "Qwen3_5ForCausalLM"
    assert cfg.extra["linear_num_value_heads"] == 4 and cfg.extra["zero_centered_norm"]


def test_param_count_matches_transformers(hf_text):
    assert qwen3_5.num_params(_load(hf_text[1]).cfg) == sum(p.numel() for p in hf_text[0].parameters())


def test_logits_equal_transformers_on_padded_batch(hf_text):
    hf_model, path = hf_text
    model = _load(path)
    tokens, mask = padded_batch()
    ours = forward_logits(model, tokens, mask)
    for row, n in enumerate(LENGTHS):
        np.testing.assert_allclose(ours[row, :n], hf_logits(hf_model, tokens[row, :n].tolist()), atol=2e-4, rtol=1e-4)


def test_cached_prefill_append_and_decode_equal_fresh_forward(hf_text):
    model = _load(hf_text[1])
    graphdef, state = nnx.split(model)
    tokens, mask = padded_batch(1)

    @jax.jit
    def cached(state, cache, chunk, chunk_mask):
        m = nnx.merge(graphdef, state)
        positions = cache.positions_for(chunk_mask)
        hidden, cache = m(chunk, positions, chunk_mask, cache)
        return m.logits(hidden), cache

    full = forward_logits(model, tokens, mask)
    cache = KVCache.init(model.cfg, len(LENGTHS), 64)  # no DeltaNet states yet: the first call creates them
    # chunks of width 12, 10, then 1: row r takes up to width - 2r of its next tokens, so rows 1 and 2 get right
    # padding mid-sequence and continue afterwards (padding must leave their DeltaNet states untouched)
    widths = iter([12, 10] + [1] * 40)
    while cache.end.tolist() != list(LENGTHS):
        width = next(widths)
        chunk_mask = np.zeros((len(LENGTHS), width), bool)
        chunk = np.zeros_like(chunk_mask, np.int32)
        for row, n in enumerate(LENGTHS):
            done = int(cache.end[row])
            take = max(0, min(n - done, width - 2 * row if width > 1 else 1))
            chunk[row, :take] = tokens[row, done:done + take]
            chunk_mask[row, :take] = True
        logits, cache = cached(state, cache, jnp.asarray(chunk), jnp.asarray(chunk_mask))
        for row in range(len(LENGTHS)):
            take = int(chunk_mask[row].sum())
            done = int(cache.end[row]) - take
            np.testing.assert_allclose(np.asarray(logits[row, :take]), full[row, done:done + take], atol=2e-4)
    assert cache.end.tolist() == list(LENGTHS)
    assert cache.extra["layers/0/recurrent"].shape == (3, 4, 8, 8)
    assert cache.k.shape[0] == 1  # k/v only for the one full-attention layer


def test_greedy_generation_through_the_sampler_equals_transformers(hf_text):
    hf_model, path = hf_text
    model = _load(path)
    sampler = Sampler(model, params=SamplingParams(temperature=0.0), stop_token_ids=(), min_cache_len=64,
                      decode_steps_per_chunk=16)
    prompts = [[5, 9, 33, 12, 7, 81, 40, 3, 66, 21, 9, 14], [44, 8, 91]]
    outs = sampler.generate(prompts, max_new_tokens=12, rng=jax.random.key(0))
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                         min_new_tokens=12)[0, len(prompt):].tolist()
        assert list(out.token_ids) == expected


@pytest.mark.slow
def test_multi_turn_session_with_shared_prefix_siblings_equals_fresh_generation(hf_text):
    """Sampler session: two siblings share a prefilled prompt prefix (take_rows copies DeltaNet states too), then a
    second turn appends an observation to each row's cache; it must equal generating from the whole history."""
    sampler = Sampler(_load(hf_text[1]), params=SamplingParams(temperature=0.0), stop_token_ids=(),
                      min_cache_len=64, decode_steps_per_chunk=8)
    prompt, observations = [5, 9, 33, 12, 7, 81, 40, 3, 66], {"a": [21, 9, 14, 50, 61, 70, 71, 72, 73, 74], "b": [8]}
    session = sampler.session()
    first = session.step({"a": prompt, "b": prompt[:-1] + [17]}, max_new_tokens=5, rng=jax.random.key(0))
    second = session.step(observations, max_new_tokens=6, rng=jax.random.key(1))
    for key, head in (("a", prompt), ("b", prompt[:-1] + [17])):
        history = head + list(first[key].token_ids) + observations[key]
        fresh = sampler.generate([history], max_new_tokens=6, rng=jax.random.key(2))[0]
        assert list(second[key].token_ids) == list(fresh.token_ids)


def test_vlm_checkpoint_loads_text_decoder_ignoring_vision_tower(tmp_path, caplog):
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration
    torch.manual_seed(1)
    config = Qwen3_5Config(text_config=TEXT, vision_config=dict(depth=1, hidden_size=16, intermediate_size=32,
                                                                num_heads=2, out_hidden_size=32, patch_size=4),
                           tie_word_embeddings=False)
    config.text_config._attn_implementation = "eager"
    vlm = Qwen3_5ForConditionalGeneration(config).eval()
    _randomize(vlm, 1)
    vlm.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="sgcd_jax.models.qwen3_5"):
        model = _load(str(tmp_path))
    assert "vision tower" in caplog.text and "ignored" in caplog.text
    tokens, mask = padded_batch(2)
    ours = forward_logits(model, tokens[:1], mask[:1])
    with torch.no_grad():
        expected = vlm(input_ids=torch.tensor(tokens[:1, :LENGTHS[0]])).logits[0].numpy()
    np.testing.assert_allclose(ours[0, :LENGTHS[0]], expected, atol=2e-4, rtol=1e-4)


def test_export_round_trip_loads_in_transformers_with_equal_logits(hf_text, tmp_path):
    from transformers import AutoModelForCausalLM
    model = _load(hf_text[1])
    export_hf(model, str(tmp_path))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    ids = padded_batch(3)[0][0].tolist()
    np.testing.assert_allclose(hf_logits(reloaded, ids), hf_logits(hf_text[0], ids), atol=1e-5)


def test_every_parameter_of_the_4b_model_has_a_partition_rule_and_the_count_is_4_2b():
    from sgcd_jax.models import Decoder
    cfg = qwen3_5.qwen3_5_config(**qwen3_5.QWEN3_5_4B, attention_bias=False)
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    state = nnx.split(abstract)[1]
    assert sum(leaf.size for leaf in jax.tree.leaves(state)) == qwen3_5.num_params(cfg) == 4_205_751_296
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(1, 2, 4), ("data", "fsdp", "tp"))
    shardings = state_shardings(state, mesh, qwen3_5.QWEN3_5_PARTITION_RULES)  # raises on an uncovered parameter
    by_path = {"/".join(map(str, k)): v.spec for k, v in jax.tree_util.tree_leaves_with_path(shardings)}
    assert any("tp" in str(spec) for path, spec in by_path.items() if "in_proj_qkv" in path)


def test_recipe_config_validates():
    from sgcd_jax.config_files import configs_dir, load_config_file
    cfg = load_config_file(f"{configs_dir()}/tau3_airline_qwen3_5_4b.py")
    assert cfg.env.name == "tau3_airline" and cfg.loss.credit == "sgcd" and cfg.model.dtype == "bfloat16"
