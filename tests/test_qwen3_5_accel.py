"""Accelerator knobs on the Qwen3.5 hybrid: attention_impl reaches every gated full-attention layer (same logits
as the einsum path, padded batch and KV-cache decode), and remat policies keep the loss gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers.model_loss import nll_value_and_grads
from sgcd_jax.models import Decoder, KVCache
from sgcd_jax.models import qwen3_5
from sgcd_jax.models.config import REMAT_POLICIES

# 4 layers, a gated full-attention layer every 2nd: linear, full, linear, full
TINY = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4, num_kv_heads=2,
            head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
            linear_value_head_dim=8, full_attention_interval=2, deltanet_chunk_size=4, attention_bias=False)
NUM_FULL = 2


def tiny_config(**overrides):
    return qwen3_5.qwen3_5_config(**(TINY | overrides))


def _perturbed(model: Decoder, seed: int) -> Decoder:
    """Random offsets on every parameter (zero-centred norms, A_log, dt_bias) so nothing sits at a symmetric init."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(
        lambda leaf: jnp.asarray(np.asarray(leaf) + 0.1 * rng.standard_normal(leaf.shape, np.float32)), state))
    return model


@pytest.fixture(scope="module")
def reference():
    return _perturbed(Decoder(tiny_config(), rngs=nnx.Rngs(0)), seed=3)


def same_weights(reference: Decoder, **knobs) -> Decoder:
    model = Decoder(reference.cfg.replace(**knobs), rngs=nnx.Rngs(1))
    nnx.update(model, nnx.state(reference, nnx.Param))
    return model


LENGTHS = (11, 6, 3)  # right padding; row 2 shorter than one DeltaNet chunk
TOKENS = jax.random.randint(jax.random.key(1), (3, 11), 3, 61)
POSITIONS = jnp.broadcast_to(jnp.arange(11), (3, 11))
MASK = jnp.arange(11)[None, :] < jnp.array(LENGTHS)[:, None]


@nnx.jit
def forward(m: Decoder, tokens, positions, mask, cache=None):
    hidden, cache = m(tokens, positions, mask, cache)
    return m.logits(hidden), cache


def masked(x, mask=MASK):
    return np.where(np.asarray(mask)[..., None], np.asarray(x, np.float32), 0.0)


class AttentionCalls:
    """Wraps jax.nn.dot_product_attention, recording the `implementation` of every call (at trace time)."""

    def __init__(self, monkeypatch):
        self.implementations = []
        original = jax.nn.dot_product_attention

        def counting(*args, **kwargs):
            self.implementations.append(kwargs.get("implementation"))
            return original(*args, **kwargs)

        monkeypatch.setattr(jax.nn, "dot_product_attention", counting)


def test_layer_types_are_hybrid(reference):
    assert reference.cfg.layer_types.count(qwen3_5.GATED_FULL) == NUM_FULL
    assert reference.cfg.layer_types.count(qwen3_5.LINEAR) == TINY["num_layers"] - NUM_FULL


@pytest.mark.parametrize("impl,jax_value", [("dot_product_attention", "xla"), ("auto", None)])
def test_gated_attention_routes_through_attention_impl(reference, monkeypatch, impl, jax_value):
    """Every gated full-attention layer calls jax.nn.dot_product_attention with the configured implementation
    (no cache and with a cache); the default "xla" impl calls it never."""
    calls = AttentionCalls(monkeypatch)
    trace = lambda m, *cache: jax.eval_shape(lambda: m(TOKENS, POSITIONS, MASK, *cache))  # noqa: E731
    trace(reference)
    trace(reference, KVCache.init(reference.cfg, 3, 16))
    assert calls.implementations == []
    model = same_weights(reference, attention_impl=impl)
    trace(model)
    assert calls.implementations == [jax_value] * NUM_FULL
    trace(model, KVCache.init(model.cfg, 3, 16))
    assert calls.implementations == [jax_value] * (2 * NUM_FULL)


def test_cudnn_impl_reaches_the_gated_block(reference):
    """On CPU cuDNN attention cannot run: a config asking for it must fail in the gated block, not be ignored."""
    if jax.default_backend() != "cpu":
        pytest.skip("cuDNN may run here")
    model = same_weights(reference, attention_impl="cudnn")
    with pytest.raises(RuntimeError, match="cuDNN"):
        jax.eval_shape(lambda: model(TOKENS, POSITIONS, MASK))


def test_dot_product_attention_logits_equal_einsum_path_on_padded_batch(reference):
    model = same_weights(reference, attention_impl="dot_product_attention")
    expected, got = forward(reference, TOKENS, POSITIONS, MASK)[0], forward(model, TOKENS, POSITIONS, MASK)[0]
    np.testing.assert_allclose(masked(got), masked(expected), atol=1e-5)
    assert np.abs(masked(expected)).max() > 0.1  # the comparison is on non-trivial logits


def test_dot_product_attention_prefill_and_decode_equal_einsum_path(reference):
    """Prefill a right-padded prompt into a cache, then 3 decode steps: logits and cache contents agree."""
    model = same_weights(reference, attention_impl="dot_product_attention")
    prompt, prompt_mask = TOKENS[:, :6], MASK[:, :6]

    def run(m):
        logits, cache = forward(m, prompt, POSITIONS[:, :6], prompt_mask, KVCache.init(m.cfg, 3, 12))
        outs = [masked(logits, prompt_mask)]
        one = jnp.ones((3, 1), bool)
        for step in range(3):
            logits, cache = forward(m, TOKENS[:, 6 + step: 7 + step], cache.positions_for(one), one, cache)
            outs.append(np.asarray(logits))
        return outs, cache

    (expected, cache_a), (got, cache_b) = run(reference), run(model)
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b, a, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache_b.end), np.array(LENGTHS).clip(max=6) + 3)
    np.testing.assert_allclose(np.asarray(cache_b.k), np.asarray(cache_a.k), atol=2e-5)  # measured 3.7e-6 on the 2-core CI CPU: the reference cache path is blockwise online softmax now
    # decode logits equal a fresh no-cache forward over prompt + decoded tokens (row 0: no padding)
    fresh = forward(model, TOKENS[:1, :9], POSITIONS[:1, :9], jnp.ones((1, 9), bool))[0]
    np.testing.assert_allclose(got[-1][0, 0], np.asarray(fresh)[0, 8], atol=1e-5)


def _loss_grads(reference: Decoder, **knobs):
    return nll_value_and_grads(same_weights(reference, **knobs), TOKENS, POSITIONS, MASK, jit=True)


@pytest.fixture(scope="module")
def plain_grads(reference):
    return _loss_grads(reference)


# remat alone recomputes the same ops: equal to fp32 rounding. dot_product_attention sums in another order:
# its gradients differ by ~1e-5 at most here (largest gradient ~3), the loss not at all.
@pytest.mark.parametrize("knobs,atol", [
    (dict(remat_policy="full"), 1e-6), (dict(remat_policy="save_attention_out"), 1e-6),
    (dict(remat_policy="dots", attention_impl="dot_product_attention"), 3e-5)])
def test_remat_policies_keep_loss_and_gradients(reference, plain_grads, knobs, atol):
    loss_plain, plain = plain_grads
    loss_remat, remat = _loss_grads(reference, **knobs)
    np.testing.assert_allclose(loss_remat, loss_plain, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=atol), plain, remat)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(plain)) > 0.1  # gradients are not all ~0


def test_remat_policy_applies_to_every_hybrid_block(reference):
    """save_attention_out keeps one named "attention_out" per layer (gated attention and delta rule alike);
    "full" keeps none and fewer residuals than no remat."""
    from jax._src.ad_checkpoint import saved_residuals  # jax 0.10 exports only the printing variant
    saved, named = {}, {}
    for policy in ("none", "save_attention_out", "full"):
        graphdef, params = nnx.split(same_weights(reference, remat_policy=policy), nnx.Param)
        residuals = saved_residuals(lambda p: nnx.merge(graphdef, p)(TOKENS, POSITIONS, MASK)[0].sum(), params)
        saved[policy] = sum(int(np.prod(aval.shape)) for aval, _ in residuals)
        named[policy] = sum("named 'attention_out'" in why for _, why in residuals)
    assert named["save_attention_out"] == TINY["num_layers"] and named["full"] == 0
    assert saved["none"] > saved["save_attention_out"] > saved["full"], saved
    assert set(REMAT_POLICIES) >= set(saved)
