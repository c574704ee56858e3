"""Accelerator knobs of the Decoder: attention_impl, remat_policy, bf16 compute — each against the default path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers.model_loss import nll_value_and_grads
from sgcd_jax.models import Decoder, KVCache, ModelConfig
from sgcd_jax.models.config import ATTENTION_IMPLS, REMAT_POLICIES


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                num_kv_heads=2, qk_norm=True, attention_bias=True)
    return ModelConfig(**(base | overrides))


def same_weights(cfg: ModelConfig, reference: Decoder) -> Decoder:
    """A Decoder for `cfg` holding `reference`'s parameters (knobs differ, weights do not)."""
    model = Decoder(cfg, rngs=nnx.Rngs(1))
    nnx.update(model, nnx.state(reference, nnx.Param))
    return model


# left padding on row 1, a hole in row 2: the mask, not a length, must decide what is attended
TOKENS = jax.random.randint(jax.random.key(1), (3, 7), 0, 64)
POSITIONS = jnp.broadcast_to(jnp.arange(7), (3, 7))
MASK = jnp.array([[1] * 7, [0, 0] + [1] * 5, [1, 1, 1, 0, 1, 1, 0]], bool)


def masked(x, mask=MASK):
    return np.where(np.asarray(mask)[..., None], np.asarray(x, np.float32), 0.0)


def test_config_validates_knob_names():
    with pytest.raises(ValueError, match="attention_impl"):
        tiny_config(attention_impl="flash")
    with pytest.raises(ValueError, match="remat_policy"):
        tiny_config(remat_policy="everything")
    assert tiny_config().attention_impl == "xla" and tiny_config().effective_remat_policy == "none"
    assert tiny_config(remat=True).effective_remat_policy == "full"  # the legacy switch keeps its meaning
    assert tiny_config(remat=True, remat_policy="dots").effective_remat_policy == "dots"


@pytest.mark.parametrize("impl", ["dot_product_attention", "auto"])
def test_dot_product_attention_equals_einsum_path_with_padding(impl):
    reference = Decoder(tiny_config(), rngs=nnx.Rngs(0))
    model = same_weights(tiny_config(attention_impl=impl), reference)
    expected = reference.logits(reference(TOKENS, POSITIONS, MASK)[0])
    got = model.logits(model(TOKENS, POSITIONS, MASK)[0])
    np.testing.assert_allclose(masked(got), masked(expected), atol=1e-5)
    # and the knob really changes the computation: the XLA program calls no dot_product_attention otherwise
    text = jax.jit(lambda t: model(t, POSITIONS, MASK)[0]).lower(TOKENS).as_text()
    assert text != jax.jit(lambda t: reference(t, POSITIONS, MASK)[0]).lower(TOKENS).as_text()


def test_dot_product_attention_with_cache_equals_einsum_path():
    """Prefill with a padded row, then two decode steps: cache slots, valid mask and end offsets."""
    reference = Decoder(tiny_config(), rngs=nnx.Rngs(0))
    model = same_weights(tiny_config(attention_impl="dot_product_attention"), reference)
    prompt_mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool)
    prompt = TOKENS[:2, :4]

    def run(m):
        cache = KVCache.init(m.cfg, 2, 12)
        h, cache = m(prompt, jnp.broadcast_to(jnp.arange(4), (2, 4)), prompt_mask, cache)
        outs = [masked(m.logits(h), prompt_mask)]
        for step in range(2):
            token = TOKENS[:2, 4 + step: 5 + step]
            one = jnp.ones((2, 1), bool)
            h, cache = m(token, cache.positions_for(one), one, cache)
            outs.append(np.asarray(m.logits(h)))
        return outs, cache

    (expected, cache_a), (got, cache_b) = run(reference), run(model)
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b, a, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache_b.end), [6, 4])
    np.testing.assert_allclose(np.asarray(cache_b.k), np.asarray(cache_a.k), atol=1e-6)


@pytest.mark.parametrize("steps,blocks", [(200, 3), (128, 8)])
def test_causal_blocked_attention_equals_full_square(steps, blocks):
    """Skipping the masked upper blocks changes nothing on real tokens (values and gradients)."""
    from sgcd_jax.models.attention import causal_blocked_attention, grouped_attention
    keys = jax.random.split(jax.random.key(4), 3)
    q = jax.random.normal(keys[0], (2, steps, 4, 8))
    k, v = (jax.random.normal(key, (2, steps, 2, 8)) for key in keys[1:])
    token_mask = jnp.arange(steps)[None, :] < jnp.array([[steps], [steps - 37]])  # row 1 right-padded
    mask = jnp.tril(jnp.ones((steps, steps), bool))[None] & token_mask[:, None, :]
    weights = jax.random.normal(jax.random.key(5), q.shape) * token_mask[:, :, None, None]

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) * weights)

    # jitted: one compile per side instead of an eager dispatch (and compile) per op and block
    plain = jax.jit(jax.value_and_grad(lambda *a: loss(lambda q, k, v: grouped_attention(q, k, v, mask), *a),
                                       (0, 1, 2)))
    blocked = jax.jit(jax.value_and_grad(
        lambda *a: loss(lambda q, k, v: causal_blocked_attention(q, k, v, mask, blocks), *a), (0, 1, 2)))
    (value_a, grads_a), (value_b, grads_b) = plain(q, k, v), blocked(q, k, v)
    np.testing.assert_allclose(value_b, value_a, rtol=1e-5)
    for a, b in zip(grads_a, grads_b):
        np.testing.assert_allclose(b, a, atol=1e-5)


def test_decoder_uses_blocked_attention_on_long_chunks_and_matches_cache_path():
    """T=259 → 2 uneven blocks: the no-cache forward still equals the cached (prefill) forward on real tokens."""
    from sgcd_jax.models.attention import CAUSAL_MAX_BLOCKS, causal_blocks
    assert causal_blocks(259) == 2 and causal_blocks(255) == 1 and causal_blocks(1 << 16) == CAUSAL_MAX_BLOCKS
    cfg = tiny_config()
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(6), (2, 259), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(259), (2, 259))
    mask = jnp.arange(259)[None, :] < jnp.array([[259], [201]])
    full = model(tokens, positions, mask)[0]
    cached = model(tokens, positions, mask, KVCache.init(cfg, 2, 259))[0]
    np.testing.assert_allclose(masked(full, mask), masked(cached, mask), atol=1e-5)


def _loss_grads(cfg: ModelConfig, reference: Decoder):
    return nll_value_and_grads(same_weights(cfg, reference), TOKENS, POSITIONS, MASK)


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
def test_remat_policies_give_the_same_gradients(policy):
    reference = Decoder(tiny_config(), rngs=nnx.Rngs(0))
    loss_plain, plain = _loss_grads(tiny_config(), reference)
    loss_remat, remat = _loss_grads(tiny_config(remat_policy=policy), reference)
    np.testing.assert_allclose(loss_remat, loss_plain, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=1e-6), plain, remat)


def test_remat_policy_changes_what_the_backward_pass_keeps():
    """Saved residuals (elements) per policy: none > dots > dots_no_batch > save_attention_out > full."""
    from jax._src.ad_checkpoint import saved_residuals  # jax 0.10 exports only the printing variant
    reference = Decoder(tiny_config(), rngs=nnx.Rngs(0))
    saved, named = {}, {}
    for policy in REMAT_POLICIES:
        graphdef, params = nnx.split(same_weights(tiny_config(remat_policy=policy), reference), nnx.Param)
        fn = lambda p: nnx.merge(graphdef, p)(TOKENS, POSITIONS, MASK)[0].sum()  # noqa: E731
        residuals = saved_residuals(fn, params)
        saved[policy] = sum(int(np.prod(aval.shape)) for aval, _ in residuals)
        named[policy] = sum("named 'attention_out'" in why for _, why in residuals)
    order = ["none", "dots", "dots_no_batch", "save_attention_out", "full"]
    assert [saved[p] for p in order] == sorted((saved[p] for p in order), reverse=True), saved
    assert len(set(saved.values())) == len(order), saved
    assert named["save_attention_out"] == tiny_config().num_layers and named["full"] == 0


def test_dot_product_attention_gradients_equal_einsum_path():
    reference = Decoder(tiny_config(), rngs=nnx.Rngs(0))
    loss_a, grads_a = _loss_grads(tiny_config(), reference)
    loss_b, grads_b = _loss_grads(tiny_config(attention_impl="dot_product_attention", remat_policy="dots"),
                                  reference)
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=1e-6), grads_a, grads_b)


@pytest.mark.parametrize("impl", ["xla", "dot_product_attention"])
def test_bf16_compute_is_close_to_fp32_and_keeps_fp32_logits(impl):
    """fp32 params, bf16 compute: hidden is bf16, logits/softmax/norms accumulate in fp32.

    Tolerance: bf16 has an 8-bit mantissa (rel. error ~4e-3 per rounding); over 2 layers the logits
    (std ~0.2 here) may drift by a few 1e-2 at worst — a path that did the softmax or the logits in bf16
    over 64 classes, or skipped the fp32 norm, is still inside this, so we also check the dtypes.
    """
    cfg = tiny_config(hidden_size=64, num_layers=3, attention_impl=impl)
    reference = Decoder(cfg, rngs=nnx.Rngs(0))
    model = same_weights(cfg.replace(dtype="bfloat16"), reference)
    hidden32 = reference(TOKENS, POSITIONS, MASK)[0]
    hidden16 = model(TOKENS, POSITIONS, MASK)[0]
    assert hidden16.dtype == jnp.bfloat16 and model.embed_tokens[...].dtype == jnp.float32
    logits32, logits16 = reference.logits(hidden32), model.logits(hidden16)
    assert logits16.dtype == jnp.float32
    scale = np.abs(masked(logits32)).max()
    np.testing.assert_allclose(masked(logits16), masked(logits32), atol=0.03 * scale)
    p32, p16 = jax.nn.softmax(logits32), jax.nn.softmax(logits16)
    assert float(jnp.max(jnp.abs(jnp.where(MASK[..., None], p16 - p32, 0)))) < 5e-3
    # bf16 really computed: not bit-identical to fp32
    assert np.abs(masked(logits16) - masked(logits32)).max() > 0


def test_bf16_gradients_close_to_fp32():
    reference = Decoder(tiny_config(), rngs=nnx.Rngs(0))
    loss32, grads32 = _loss_grads(tiny_config(), reference)
    loss16, grads16 = _loss_grads(tiny_config(dtype="bfloat16"), reference)
    assert abs(float(loss16) - float(loss32)) < 1e-2 * abs(float(loss32))
    leaves32, leaves16 = jax.tree.leaves(grads32), jax.tree.leaves(grads16)
    for a, b in zip(leaves32, leaves16):
        assert b.dtype == jnp.float32  # gradients land in the param dtype
        rel = np.linalg.norm(np.asarray(b) - np.asarray(a)) / (np.linalg.norm(np.asarray(a)) + 1e-12)
        assert rel < 5e-2, rel


def test_all_attention_impls_are_known_to_memory_plan():
    from sgcd_jax.memory_plan import attention_implementation
    for impl in ATTENTION_IMPLS[1:]:
        if impl == "splash":  # the Pallas splash kernel, not jax.nn.dot_product_attention (test_blockwise_attention)
            continue
        attention_implementation("xla" if impl == "dot_product_attention" else impl)


def test_remat_full_lowers_compiled_temp_memory_with_the_same_gradients():
    """XLA's CPU scheduler ran plain remat's recomputed forward of every layer before the backward (temp
    memory equal to no remat); accel.recompute_after_cotangent ties each recomputation to its cotangent.
    Measured at these shapes (6 layers, 2 x 256 tokens): no remat 61.2 MiB, plain remat 56.2 MiB, tied 14.4 MiB."""
    cfg = tiny_config(vocab_size=256, hidden_size=128, intermediate_size=512, num_layers=6, qk_norm=False,
                      attention_bias=False)
    reference = Decoder(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(2), (2, 256), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(256), (2, 256))
    mask = jnp.arange(256)[None, :] < jnp.array([[256], [200]])  # row 1 right-padded
    temps, results = {}, {}
    for policy in ("none", "full"):
        graphdef, params = nnx.split(same_weights(cfg.replace(remat_policy=policy), reference), nnx.Param)

        def loss(p, graphdef=graphdef):
            hidden = nnx.merge(graphdef, p)(tokens, positions, mask)[0]
            return jnp.sum(jnp.where(mask[..., None], hidden, 0.0) ** 2) / mask.sum()

        compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
        temps[policy] = compiled.memory_analysis().temp_size_in_bytes
        results[policy] = compiled(params)
    assert temps["full"] < 0.35 * temps["none"], temps
    np.testing.assert_allclose(results["full"][0], results["none"][0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=1e-6), results["none"][1], results["full"][1])
