"""The train-step bench's chunked loss (trainer-style, no [B,T,V] logits) equals its full-logits loss."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgcd_jax.bench.train_step import chunked_next_token_loss, next_token_loss, train_step_flops
from sgcd_jax.models import Decoder, ModelConfig


def test_chunked_loss_and_gradients_equal_full_logits_loss():
    cfg = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, tie_word_embeddings=True)
    graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    tokens = jax.random.randint(jax.random.key(3), (3, 12), 0, cfg.vocab_size)
    # chunk 5 does not divide the 3*11 scored tokens: the padded tail chunk must not leak into the mean
    full = jax.value_and_grad(lambda p: next_token_loss(nnx.merge(graphdef, p), tokens))(params)
    chunked = jax.value_and_grad(lambda p: chunked_next_token_loss(nnx.merge(graphdef, p), tokens, 5))(params)
    np.testing.assert_allclose(chunked[0], full[0], rtol=1e-6)
    assert abs(float(full[0]) - np.log(cfg.vocab_size)) < 0.1  # near-uniform random init: loss ≈ log V
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=1e-6), full[1], chunked[1])


def test_train_step_flops_by_hand_for_a_small_config():
    cfg = ModelConfig(vocab_size=10, hidden_size=4, intermediate_size=6, num_layers=1, num_heads=2, num_kv_heads=1)
    # per token: q 4x4, k/v 4x2 each, o 4x4, mlp 3*4*6, head 4*10 → 2*(16+16+16+72) + 2*40 = 320
    # attention over T=3: 4 * L * B * H * T^2 * Dh = 4*1*1*2*9*2 = 144; fwd+bwd = 3x
    assert train_step_flops(cfg, batch=1, seq=3) == 3 * (320 * 3 + 144)
