"""Blockwise (online-softmax) attention equals the einsum path; the Pallas splash kernel (interpret mode)
too. The reference is attention.grouped_attention with the full [B, T, S] mask (today's einsum path)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sgcd_jax.models import Decoder, KVCache, ModelConfig
from sgcd_jax.models.attention import blockwise_attention, grouped_attention, splash_attention

# measured spread blockwise vs einsum on these shapes (fp32): ≤ 6e-7 values, ≤ 1e-6 grads; 20× margin
ATOL = 2e-5


def _qkv(rng, batch, steps, slots, heads=4, kv_heads=2, dim=8):
    q = jnp.asarray(rng.normal(size=(batch, steps, heads, dim)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(batch, slots, kv_heads, dim)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(batch, slots, kv_heads, dim)), jnp.float32)
    return q, k, v


def _mask(valid, query_slots):
    return valid[:, None, :] & (jnp.arange(valid.shape[1])[None, None, :] <= query_slots[:, :, None])


@pytest.mark.parametrize("steps,slots,block", [(37, 70, 16), (1, 70, 16), (40, 40, 8), (5, 9, 32)])
def test_blockwise_equals_einsum_with_holes_values_and_grads(steps, slots, block):
    rng = np.random.default_rng(steps + slots)
    q, k, v = _qkv(rng, 2, steps, slots)
    valid = jnp.asarray(rng.random((2, slots)) < 0.7)  # holes anywhere (padding written mid-cache)
    query_slots = jnp.asarray(np.sort(rng.integers(0, slots, (2, steps)), axis=1), jnp.int32)
    mask = _mask(valid, query_slots)
    assert np.asarray(mask.any(-1)).any()
    _assert_equals_einsum(lambda q, k, v: blockwise_attention(q, k, v, valid, query_slots, block), q, k, v, mask)


def _assert_equals_einsum(fn, q, k, v, mask):
    """``fn(q, k, v)`` equals grouped_attention under ``mask`` in values and in q/k/v gradients on rows that see
    a key; rows that see none (padding: the reference gives a uniform mean there) must be exactly 0."""
    seen = np.asarray(mask.any(-1))
    ref = grouped_attention(q, k, v, mask)
    out = jax.jit(fn)(q, k, v)
    np.testing.assert_allclose(np.asarray(out)[seen], np.asarray(ref)[seen], atol=ATOL)
    np.testing.assert_array_equal(np.asarray(out)[~seen], 0.0)

    def loss(f, q, k, v):
        return (f(q, k, v) * jnp.asarray(seen)[..., None, None] * jnp.cos(q)).sum()

    # jitted: one compile per program instead of one per eager op (≈1.6× faster on the 2-core CPU)
    g_ref = jax.jit(jax.grad(lambda *a: loss(lambda q, k, v: grouped_attention(q, k, v, mask), *a),
                             argnums=(0, 1, 2)))(q, k, v)
    g_out = jax.jit(jax.grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_out, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=ATOL)


def test_blockwise_never_builds_t_by_s_scores():
    """The jaxpr of a 1024 × 4096 blockwise call holds no array with a 1024 × 4096 (or bigger) trailing pair."""
    q = jnp.zeros((1, 1024, 2, 8)); k = v = jnp.zeros((1, 4096, 1, 8))
    valid = jnp.ones((1, 4096), bool); slots = jnp.arange(1024, dtype=jnp.int32)[None] + 3000
    jaxpr = jax.make_jaxpr(lambda q, k, v: blockwise_attention(q, k, v, valid, slots, 256))(q, k, v)
    sizes = []

    def walk(jp):
        for eqn in jp.eqns:
            sizes.extend(int(np.prod(o.aval.shape)) for o in eqn.outvars if hasattr(o.aval, "shape"))
            for sub in jax.core.jaxprs_in_params(eqn.params) if hasattr(jax.core, "jaxprs_in_params") else []:
                walk(sub)
            for p in eqn.params.values():
                inner = getattr(p, "jaxpr", None)
                if inner is not None:
                    walk(getattr(inner, "jaxpr", inner))
                if isinstance(p, (tuple, list)):
                    for x in p:
                        inner = getattr(x, "jaxpr", None)
                        if inner is not None:
                            walk(getattr(inner, "jaxpr", inner))
    walk(jaxpr.jaxpr)
    # biggest allowed: a block's scores [1, 1, 2, 256, 256] or the k/v blocks; T × S would be 4.2M per head
    assert max(sizes) <= 2 * 256 * 256 * 2
    ref = jax.make_jaxpr(lambda q, k, v: grouped_attention(q, k, v, _mask(valid, slots)))(q, k, v)
    assert max(int(np.prod(o.aval.shape)) for e in ref.jaxpr.eqns for o in e.outvars) >= 2 * 1024 * 4096


def _tiny(**overrides):
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                num_kv_heads=2, qk_norm=True, attention_bias=True)
    return ModelConfig(**(base | overrides))


@pytest.mark.parametrize("cache_len", [16, 18])
def test_decoder_cache_prefill_continuation_decode_blockwise_equals_full_forward(cache_len):
    """Cache path (always blockwise, small blocks: many key blocks, unused cache blocks skipped) with a
    padded chunk (a hole in the cache) equals the no-cache einsum forward over the real tokens. 18 slots:
    the last key block is read overlapping the one before (slots 14-17), the overlap masked."""
    cfg = _tiny(attention_block=4)
    ref_model = Decoder(_tiny(), rngs=nnx.Rngs(0))
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 64, (2, 13)), jnp.int32)
    lengths = [(5, 7, 1), (3, 7, 1)]  # per-row real tokens of prefill, continuation, decode chunks
    cache = KVCache.init(cfg, 2, cache_len)  # 4+ key blocks; row 0 ends at slot 13: the last block partly unused
    got = [[], []]
    offset = [0, 0]
    for chunk in range(3):
        width = max(row[chunk] for row in lengths)
        ids = np.zeros((2, width), np.int32)
        mask = np.zeros((2, width), bool)
        for b in range(2):
            n = lengths[b][chunk]
            ids[b, :n] = np.asarray(tokens[b, offset[b]:offset[b] + n]); mask[b, :n] = True
        hidden, cache = model(jnp.asarray(ids), cache.positions_for(jnp.asarray(mask)), jnp.asarray(mask), cache)
        for b in range(2):
            got[b].append(np.asarray(hidden[b, :lengths[b][chunk]])); offset[b] += lengths[b][chunk]
    for b in range(2):
        n = offset[b]
        full, _ = ref_model(tokens[b:b + 1, :n], jnp.arange(n)[None], jnp.ones((1, n), bool))
        np.testing.assert_allclose(np.concatenate(got[b]), np.asarray(full[0]), atol=ATOL)


def test_blockwise_reads_a_layer_of_the_stacked_cache_without_copying_it():
    """A compiled decode chunk allocates no per-layer copy of the stacked cache [L,B,S,Hkv,Dh]: key blocks
    are sliced from it in place. Measured: XLA temp 23,664 bytes vs one layer's k of 1,048,576; slicing
    cache.k[layer] before attending (the old code) took 2,137,136 (that layer's k and v copied)."""
    from sgcd_jax.sampling import SamplingParams
    from sgcd_jax.sampling.kernels import decode_chunk

    cfg = _tiny(attention_bias=False, qk_norm=False, attention_block=64)
    graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    cache = KVCache.init(cfg, 2, 8192)
    layer_bytes = cache.k[0].nbytes  # 2 rows × 8192 slots × 2 heads × 8 dims × 4 bytes = 1 MiB
    compiled = decode_chunk.lower(graphdef, state, cache, jnp.zeros((2, cfg.vocab_size)), jnp.ones(2, bool),
                                  jnp.full(2, 4, jnp.int32), jax.random.key(0), params=SamplingParams(),
                                  num_steps=4, stop_ids=()).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < layer_bytes // 4


def test_decoder_no_cache_long_sequence_blockwise_equals_einsum():
    """No cache, T > attention_block: the blockwise path (query and key blocks) on a right-padded batch."""
    tokens = jax.random.randint(jax.random.key(1), (2, 40), 0, 64)
    positions = jnp.broadcast_to(jnp.arange(40), (2, 40))
    mask = jnp.asarray(np.arange(40)[None] < np.array([[40], [29]]))
    ref, _ = Decoder(_tiny(), rngs=nnx.Rngs(0))(tokens, positions, mask)
    out, _ = Decoder(_tiny(attention_block=8), rngs=nnx.Rngs(0))(tokens, positions, mask)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=ATOL)


def test_splash_kernel_interpret_mode_equals_einsum():
    """JAX's Pallas TPU splash-attention kernel, run by the Pallas interpreter on CPU, on a padded batch."""
    rng = np.random.default_rng(3)
    q, k, v = _qkv(rng, 2, 128, 128)
    token_mask = jnp.asarray(np.arange(128)[None] < np.array([[100], [128]]))
    ref = grouped_attention(q, k, v, jnp.tril(jnp.ones((128, 128), bool))[None] & token_mask[:, None, :])
    out = splash_attention(q, k, v, token_mask, interpret=True)
    real = np.asarray(token_mask)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=ATOL)
    with pytest.raises(ValueError, match="multiples of 128"):
        splash_attention(q[:, :100], k[:, :100], v[:, :100], token_mask[:, :100], interpret=True)


@pytest.mark.parametrize("steps,block", [(37, 8), (40, 8), (9, 4)])
def test_causal_blockwise_equals_einsum_with_padding_values_and_grads(steps, block):
    """The no-cache path beyond attention_block: query blocks visit only key blocks up to the diagonal;
    uneven last block, a right-padded row and a left-padded one (whose leading queries see no key: 0)."""
    from sgcd_jax.models.attention import causal_blockwise_attention
    rng = np.random.default_rng(steps)
    q, k, v = _qkv(rng, 3, steps, steps)
    index = np.arange(steps)
    valid = jnp.asarray(np.stack([index < steps, index < steps - 5, index >= 3]))
    query_slots = jnp.broadcast_to(jnp.arange(steps, dtype=jnp.int32), (3, steps))
    mask = _mask(valid, query_slots)
    assert not np.asarray(mask.any(-1)).all()  # the left-padded row's leading queries see no key
    _assert_equals_einsum(lambda q, k, v: causal_blockwise_attention(q, k, v, valid, block), q, k, v, mask)
