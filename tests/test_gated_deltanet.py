"""Gated DeltaNet math: chunked form == recurrent form == a naive loop == transformers' torch fallback; gradients."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from sgcd_jax.models import ModelConfig
from sgcd_jax.models.gated_deltanet import (GatedDeltaNet, causal_depthwise_conv, gated_delta_rule_chunked,
                                            gated_delta_rule_recurrent, l2_normalize, next_conv_state,
                                            unit_lower_triangular_inverse)


@jax.jit
def naive_gated_delta_rule(q, k, v, g, beta, state):
    """The defining recurrence, one token per step, exactly as written in the module docstring."""
    def step(state, t):
        state = state * jnp.exp(g[:, t])[..., None, None]  # [B,H,Dk,Dv]
        error = v[:, t] - jnp.einsum("bhkv,bhk->bhv", state, k[:, t], precision="highest")
        state = state + beta[:, t][..., None, None] * k[:, t][..., :, None] * error[..., None, :]
        return state, jnp.einsum("bhkv,bhk->bhv", state, q[:, t], precision="highest")

    state, outputs = jax.lax.scan(step, state, jnp.arange(k.shape[1]))
    return jnp.moveaxis(outputs, 0, 1), state


chunked = jax.jit(gated_delta_rule_chunked, static_argnames="chunk_size")


def random_inputs(seed, batch=2, steps=13, heads=3, key_dim=8, value_dim=6, with_state=True):
    keys = jax.random.split(jax.random.key(seed), 6)
    q = l2_normalize(jax.random.normal(keys[0], (batch, steps, heads, key_dim))) / math.sqrt(key_dim)
    k = l2_normalize(jax.random.normal(keys[1], (batch, steps, heads, key_dim)))
    v = jax.random.normal(keys[2], (batch, steps, heads, value_dim))
    g = -jax.nn.softplus(jax.random.normal(keys[3], (batch, steps, heads))) * 2.0  # strong and weak decays
    beta = jax.nn.sigmoid(jax.random.normal(keys[4], (batch, steps, heads)))
    state = jax.random.normal(keys[5], (batch, heads, key_dim, value_dim)) if with_state else None
    return q, k, v, g, beta, state


def test_chunked_equals_recurrent_and_naive_loop():
    steps, chunk = 37, 16  # 3 chunks, the last one partial
    q, k, v, g, beta, state = random_inputs(0, steps=steps)
    naive_out, naive_state = naive_gated_delta_rule(q, k, v, g, beta, state)
    rec_out, rec_state = jax.jit(gated_delta_rule_recurrent)(q, k, v, g, beta, state)
    chunk_out, chunk_state = chunked(q, k, v, g, beta, state, chunk_size=chunk)
    np.testing.assert_allclose(rec_out, naive_out, atol=1e-5)
    np.testing.assert_allclose(chunk_out, naive_out, atol=1e-4)
    np.testing.assert_allclose(chunk_state, naive_state, atol=1e-4)
    np.testing.assert_allclose(rec_state, naive_state, atol=1e-5)


@pytest.mark.slow
def test_chunked_gradients_are_finite_and_match_naive_reference():
    q, k, v, g, beta, state = random_inputs(2, steps=11, heads=2)
    cotangent = jax.random.normal(jax.random.key(9), (2, 11, 2, 6))
    state_cotangent = jax.random.normal(jax.random.key(10), state.shape)

    def loss(fn, *args):
        out, final = fn(*args)
        return jnp.sum(out * cotangent) + jnp.sum(final * state_cotangent)

    ours = jax.jit(jax.grad(lambda *a: loss(lambda *b: gated_delta_rule_chunked(*b, chunk_size=4), *a),
                            argnums=tuple(range(6))))(q, k, v, g, beta, state)
    reference = jax.jit(jax.grad(lambda *a: loss(naive_gated_delta_rule, *a), argnums=tuple(range(6))))(
        q, k, v, g, beta, state)
    for name, mine, ref in zip("q k v g beta state".split(), ours, reference):
        assert np.all(np.isfinite(mine)), name
        np.testing.assert_allclose(mine, ref, atol=2e-4, rtol=1e-3, err_msg=name)


def test_gradients_stay_finite_under_very_strong_decay_and_long_chunks():
    q, k, v, g, beta, _ = random_inputs(3, steps=64, heads=1)
    g = g * 50.0  # cumulative log decay reaches -1e3 inside a chunk: exp(+γ) would overflow in a naive form
    grads = jax.jit(jax.grad(lambda g: jnp.sum(gated_delta_rule_chunked(q, k, v, g, beta, None, chunk_size=64)[0])))(g)
    assert np.all(np.isfinite(grads))


def test_chunked_is_exact_for_repeated_keys_full_writes_and_no_decay():
    """The worst-conditioned chunk: every key equal, β = 1, no decay (the WY system is all-ones lower triangular)."""
    q, k, v, g, beta, state = random_inputs(4, steps=32, heads=1)
    k = jnp.broadcast_to(k[:, :1], k.shape)
    g, beta = jnp.zeros_like(g), jnp.ones_like(beta)
    chunk_out, chunk_state = chunked(q, k, v, g, beta, state, chunk_size=32)
    naive_out, naive_state = naive_gated_delta_rule(q, k, v, g, beta, state)
    np.testing.assert_allclose(chunk_out, naive_out, atol=1e-4)
    np.testing.assert_allclose(chunk_state, naive_state, atol=1e-4)


def test_unit_lower_triangular_inverse_matches_numpy():
    lower = np.tril(np.random.default_rng(0).normal(size=(3, 16, 16)), -1).astype(np.float32)
    expected = np.linalg.inv(np.eye(16, dtype=np.float32) + lower)
    np.testing.assert_allclose(unit_lower_triangular_inverse(jnp.asarray(lower)), expected, atol=1e-3, rtol=1e-4)
    with pytest.raises(ValueError, match="power of two"):
        gated_delta_rule_chunked(*random_inputs(0, steps=4)[:5], chunk_size=6)


def test_matches_transformers_torch_fallback_chunked_and_recurrent():
    from transformers.models.qwen3_5 import modeling_qwen3_5 as ref

    rng = np.random.default_rng(0)
    batch, steps, key_heads, value_heads, key_dim, value_dim = 2, 45, 2, 4, 8, 6
    q = rng.normal(size=(batch, steps, key_heads, key_dim)).astype(np.float32)
    k = rng.normal(size=(batch, steps, key_heads, key_dim)).astype(np.float32)
    v = rng.normal(size=(batch, steps, value_heads, value_dim)).astype(np.float32)
    g = -np.log1p(np.exp(rng.normal(size=(batch, steps, value_heads)))).astype(np.float32)
    beta = (1 / (1 + np.exp(-rng.normal(size=(batch, steps, value_heads))))).astype(np.float32)
    state = rng.normal(size=(batch, value_heads, key_dim, value_dim)).astype(np.float32)
    t = lambda x: torch.from_numpy(x)  # noqa: E731
    their_chunk, their_chunk_state = ref.torch_chunk_gated_delta_rule(
        t(q), t(k), t(v), g=t(g), beta=t(beta), chunk_size=16, initial_state=t(state), output_final_state=True,
        use_qk_l2norm_in_kernel=True)
    their_rec, _ = ref.torch_recurrent_gated_delta_rule(
        t(q), t(k), t(v), g=t(g), beta=t(beta), initial_state=t(state), output_final_state=True,
        use_qk_l2norm_in_kernel=True)
    repeat = value_heads // key_heads
    qn = jnp.repeat(l2_normalize(jnp.asarray(q)), repeat, axis=2) / math.sqrt(key_dim)
    kn = jnp.repeat(l2_normalize(jnp.asarray(k)), repeat, axis=2)
    ours, our_state = chunked(qn, kn, jnp.asarray(v), jnp.asarray(g), jnp.asarray(beta),
                                               jnp.asarray(state), chunk_size=16)
    ours_rec, _ = jax.jit(gated_delta_rule_recurrent)(qn, kn, jnp.asarray(v), jnp.asarray(g), jnp.asarray(beta),
                                             jnp.asarray(state))
    np.testing.assert_allclose(ours, their_chunk.numpy(), atol=1e-4)
    np.testing.assert_allclose(our_state, their_chunk_state.numpy(), atol=1e-4)
    np.testing.assert_allclose(ours_rec, their_rec.numpy(), atol=1e-4)


def test_causal_conv_matches_torch_conv1d_and_continues_from_state():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 9, 5)).astype(np.float32)
    weight = rng.normal(size=(4, 5)).astype(np.float32)  # [K, C]
    expected = torch.nn.functional.conv1d(torch.from_numpy(x).transpose(1, 2),
                                          torch.from_numpy(weight.T[:, None, :].copy()), padding=3, groups=5)
    expected = expected[:, :, :9].transpose(1, 2).numpy()
    zeros = jnp.zeros((2, 3, 5))
    np.testing.assert_allclose(causal_depthwise_conv(jnp.asarray(x), jnp.asarray(weight), zeros), expected, atol=1e-5)
    # split after 4 tokens on row 0 and 2 on row 1 (right padding): continuing from the carried state is exact
    lengths = jnp.array([4, 2])
    state = next_conv_state(jnp.asarray(x[:, :4]), zeros, lengths)
    np.testing.assert_allclose(state[0], np.concatenate([np.zeros((0, 5)), x[0, 1:4]]), atol=0)
    np.testing.assert_allclose(state[1], np.concatenate([np.zeros((1, 5)), x[1, 0:2]]), atol=0)
    rest = causal_depthwise_conv(jnp.asarray(x[:1, 4:]), jnp.asarray(weight), state[:1])
    np.testing.assert_allclose(rest, expected[:1, 4:], atol=1e-5)


def tiny_deltanet_config(**extra) -> ModelConfig:
    settings = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                    linear_value_head_dim=6, linear_conv_kernel_dim=4, deltanet_chunk_size=8) | extra
    return ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                       num_kv_heads=1, extra=settings)


def jitted(module):
    graphdef, params = nnx.split(module)
    run = jax.jit(lambda params, *args: nnx.merge(graphdef, params)(*args))
    return functools.partial(run, params)


def test_layer_split_into_padded_chunks_equals_one_pass_and_padding_does_not_touch_state():
    layer = jitted(GatedDeltaNet(tiny_deltanet_config(), rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(0), (2, 23, 16))
    full_mask = jnp.ones((2, 23), bool)
    full, full_conv, full_state = layer(x, full_mask)
    # row 1 sends 7 real tokens then 3 pads in the first chunk; the rest follows in a second (chunked) call
    first_mask = jnp.array([[1] * 10, [1] * 7 + [0] * 3], bool)
    out1, conv, state = layer(x[:, :10], first_mask)
    second = jnp.concatenate([jnp.pad(x[:1, 10:], ((0, 0), (0, 3), (0, 0))), x[1:, 7:]], axis=0)  # [2, 16, D]
    second_mask = jnp.array([[1] * 13 + [0] * 3, [1] * 16], bool)
    out2, conv, state = layer(second, second_mask, conv, state)
    np.testing.assert_allclose(out1[0], full[0, :10], atol=1e-4)
    np.testing.assert_allclose(out1[1, :7], full[1, :7], atol=1e-4)
    np.testing.assert_allclose(out2[0, :13], full[0, 10:], atol=1e-4)
    np.testing.assert_allclose(out2[1], full[1, 7:], atol=1e-4)
    np.testing.assert_allclose(state, full_state, atol=1e-4)
    np.testing.assert_allclose(conv, full_conv, atol=1e-6)


def test_layer_decode_token_by_token_equals_chunked_pass():
    module = GatedDeltaNet(tiny_deltanet_config(deltanet_recurrent_max_len=1), rngs=nnx.Rngs(1))
    layer = jitted(module)
    x = jax.random.normal(jax.random.key(1), (2, 19, 16))
    full, _, _ = layer(x, jnp.ones((2, 19), bool))
    conv, state = (jnp.zeros(shape, dtype) for shape, dtype in module.state_shapes(2).values())
    outs = []
    for t in range(19):
        out, conv, state = layer(x[:, t:t + 1], jnp.ones((2, 1), bool), conv, state)
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-4)


def test_bf16_compute_keeps_fp32_state_and_stays_close_to_fp32():
    cfg32 = tiny_deltanet_config()
    module32 = GatedDeltaNet(cfg32, rngs=nnx.Rngs(2))
    module16 = GatedDeltaNet(cfg32.replace(dtype="bfloat16"), rngs=nnx.Rngs(2))  # same params, bf16 compute
    x = jax.random.normal(jax.random.key(2), (2, 40, 16))
    mask = jnp.ones((2, 40), bool)
    out32, _, state32 = jitted(module32)(x, mask)
    out16, conv16, state16 = jitted(module16)(x, mask)
    assert out16.dtype == jnp.bfloat16 and state16.dtype == jnp.float32 and conv16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out16, np.float32), out32, atol=3e-2, rtol=3e-2)
    np.testing.assert_allclose(state16, state32, atol=3e-2, rtol=3e-2)
