"""Decoder self-consistency: cached (chunked) forward equals the full forward; config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sgcd_jax.models import Decoder, KVCache, ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                num_kv_heads=2, qk_norm=True, attention_bias=True)
    return ModelConfig(**(base | overrides))


def test_chunked_cache_forward_equals_full_forward_on_padded_batch():
    cfg = tiny_config()
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
    mask = jnp.array([[1] * 6, [1] * 4 + [0] * 2], bool)
    full = model.logits(model(tokens, positions, mask)[0])
    cache = KVCache.init(cfg, 2, 16)
    # chunk 1 is full for both rows; chunk 2 is padded on row 1, so row 1's end must advance by 1 only
    h1, cache = model(tokens[:, :3], positions[:, :3], mask[:, :3], cache)
    h2, cache = model(tokens[:, 3:], positions[:, 3:], mask[:, 3:], cache)
    chunked = jnp.concatenate([model.logits(h1), model.logits(h2)], axis=1)
    np.testing.assert_array_equal(np.asarray(cache.end), [6, 4])
    np.testing.assert_allclose(np.where(mask[..., None], chunked, 0), np.where(mask[..., None], full, 0), atol=1e-5)


def test_take_rows_copies_prefill_to_siblings():
    cfg = tiny_config()
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    cache = KVCache.init(cfg, 1, 8)
    prompt = jnp.array([[5, 6, 7]])
    _, cache = model(prompt, jnp.arange(3)[None], jnp.ones((1, 3), bool), cache)
    siblings = cache.take_rows(jnp.zeros((3,), jnp.int32))
    assert siblings.k.shape[1] == 3 and siblings.end.tolist() == [3, 3, 3]
    next_tokens = jnp.array([[1], [2], [3]])
    hidden, siblings = model(next_tokens, siblings.positions_for(jnp.ones((3, 1), bool)), jnp.ones((3, 1), bool), siblings)
    full, _ = model(jnp.concatenate([jnp.repeat(prompt, 3, 0), next_tokens], 1), jnp.arange(4)[None].repeat(3, 0),
                    jnp.ones((3, 4), bool))
    np.testing.assert_allclose(hidden[:, 0], full[:, 3], atol=1e-5)


def test_config_rejects_bad_shapes_and_unknown_rope():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        tiny_config(num_kv_heads=3)
    with pytest.raises(ValueError, match="rope_scaling type"):
        tiny_config(rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="no block registered"):
        Decoder(tiny_config(layer_types=("full_attention", "mystery")), rngs=nnx.Rngs(0))


def test_config_is_hashable_for_jit_static_use():
    cfg = tiny_config(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    assert hash(cfg) == hash(cfg.replace())


def test_remat_gives_the_same_loss_gradient():
    tokens = jax.random.randint(jax.random.key(2), (2, 5), 0, 64)
    positions, mask = jnp.broadcast_to(jnp.arange(5), (2, 5)), jnp.ones((2, 5), bool)

    def grads_for(cfg):
        graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
        loss = lambda p: nnx.merge(graphdef, p).logits(nnx.merge(graphdef, p)(tokens, positions, mask)[0]).std()
        return jax.grad(loss)(params)

    plain, remat = grads_for(tiny_config()), grads_for(tiny_config(remat=True))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), plain, remat)


def test_llama3_rope_scaling_keeps_high_frequencies_and_divides_low_ones():
    from sgcd_jax.models.decoder import rope_inverse_frequencies
    base = rope_inverse_frequencies(tiny_config(head_dim=64, rope_theta=500000.0))
    scaled = rope_inverse_frequencies(tiny_config(head_dim=64, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}))
    wavelength = 2 * np.pi / base
    np.testing.assert_allclose(scaled[wavelength < 8192 / 4], base[wavelength < 8192 / 4])  # short: unchanged
    np.testing.assert_allclose(scaled[wavelength > 8192], base[wavelength > 8192] / 8, rtol=1e-6)  # long: / factor
