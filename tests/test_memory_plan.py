"""memory_plan: byte counts agree with the real model/cache arrays; the table is generated, not typed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sgcd_jax import memory_plan
from sgcd_jax.memory_plan import Workload
from sgcd_jax.models import Decoder, KVCache, ModelConfig


@pytest.mark.parametrize("tied", [True, False])
def test_param_bytes_match_the_decoder_arrays(tied):
    cfg = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                      num_kv_heads=2, qk_norm=True, tie_word_embeddings=tied)
    params = nnx.state(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    actual = sum(x.nbytes for x in jax.tree.leaves(params))
    assert memory_plan.param_bytes(cfg, 4) == actual


def test_kv_cache_bytes_match_kvcache_init():
    cfg = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                      num_kv_heads=2)
    cache = KVCache.init(cfg, batch_size=3, max_len=40, dtype=jnp.bfloat16)
    actual = sum(x.nbytes for x in jax.tree.leaves(cache))
    assert memory_plan.kv_cache_bytes(cfg, 3, 40, 2) == actual


def test_hybrid_cache_bytes_match_kvcache_init():
    from sgcd_jax.models import qwen3_5

    cfg = qwen3_5.qwen3_5_config(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=4,
                                 num_heads=4, num_kv_heads=2, head_dim=8, linear_num_key_heads=2,
                                 linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8)
    cache = KVCache.init(cfg, batch_size=3, max_len=40, dtype=jnp.float32)
    assert memory_plan.kv_cache_bytes(cfg, 3, 40, 4) == sum(x.nbytes for x in jax.tree.leaves(cache))


def test_qwen3_configs_have_their_published_sizes():
    # Model cards: Qwen3-4B "4.0B" parameters, Qwen3-8B "8.2B".
    assert abs(memory_plan.model_config("Qwen3-4B").num_params() / 1e9 - 4.0) < 0.05
    assert abs(memory_plan.model_config("Qwen3-8B").num_params() / 1e9 - 8.2) < 0.05
    assert memory_plan.model_config("Qwen3-4B").tie_word_embeddings
    hybrid = memory_plan.model_config("Qwen3.5-4B")
    assert abs(memory_plan.num_params(hybrid) / 1e9 - 4.2) < 0.05
    # 1 layer in 4 keeps k/v: the 16k-token rollout cache is far smaller than Qwen3-4B's.
    dense = memory_plan.model_config("Qwen3-4B")
    assert memory_plan.kv_cache_bytes(hybrid, 64, 16384, 2) < 0.5 * memory_plan.kv_cache_bytes(dense, 64, 16384, 2)


def test_activation_estimate_orders_remat_policies_and_attention():
    cfg = memory_plan.model_config("Qwen3-4B")
    size = lambda **kw: memory_plan.activation_bytes(cfg, Workload(**kw))  # noqa: E731
    assert size(remat="full") < size(remat="dots") < size(remat="none")
    naive_scores = 2 * 32 * 16384 ** 2 * 4
    assert size(attention="naive") - size(attention="flash") > 0.9 * naive_scores
    assert memory_plan.activation_bytes(cfg, Workload(), tp=4) < size()


def test_prefill_working_set_is_bounded_by_the_chunk_not_the_conversation():
    """Chunked prefill + blockwise attention: the rollout working set beside the cache does not grow with
    max_total_tokens, and is far below one [H, chunk, S] fp32 score matrix of the old cache path."""
    cfg = memory_plan.model_config("Qwen3-4B")
    short, long = Workload(seq_len=4096), Workload(seq_len=16384)
    assert memory_plan.prefill_bytes(cfg, short, 8) == memory_plan.prefill_bytes(cfg, long, 8)
    assert memory_plan.prefill_bytes(cfg, long, 8) == 2 * memory_plan.prefill_bytes(cfg, long, 4)  # per row
    old_scores = 8 * cfg.num_heads * 512 * 16384 * 4
    assert memory_plan.prefill_bytes(cfg, long, 8) < 0.3 * old_scores
    assert memory_plan.prefill_bytes(cfg, Workload(prefill_chunk=256), 8) < memory_plan.prefill_bytes(cfg, long, 8)
    size = lambda **kw: memory_plan.activation_bytes(cfg, Workload(**kw))  # noqa: E731
    assert size(attention="flash") < size(attention="blockwise") < size(attention="naive")


def test_every_plan_uses_all_devices_and_fits_or_says_why():
    for model in memory_plan.MODELS:
        for hardware in memory_plan.HARDWARE:
            plan = memory_plan.plan(model, hardware)
            assert int(np.prod(plan.mesh)) == hardware.devices
            assert plan.fits == (plan.peak <= 0.9 * hardware.hbm_gib)
            assert plan.fits or plan.note


def test_too_small_hardware_shrinks_the_rollout_batch_then_the_state_dtype():
    tiny = memory_plan.Hardware("tiny", 8, 15.0, "")
    plan = memory_plan.plan("Qwen3-8B", tiny)
    assert "bf16" in plan.note and plan.work.param_bytes == 2 and plan.work.master_bytes == 0
    roomy = memory_plan.plan("Qwen3-4B", memory_plan.Hardware("big", 8, 80.0, ""))
    assert roomy.note == "" and roomy.work.rollout_batch == 64


def test_docs_table_is_the_generated_one(tmp_path):
    out = tmp_path / "plan.md"
    text = memory_plan.main(["--out", str(out)])
    committed = (memory_plan.Path(memory_plan.__file__).resolve().parents[1] / "docs" / "memory_plan.md")
    assert committed.read_text() == text, "docs/memory_plan.md is stale: run python -m sgcd_jax.memory_plan"
    assert text.count("| Qwen3-") == 6 and text.count("| Qwen3.5-4B") == 3


def test_plan_reads_the_recipe_dtypes_and_its_header_follows_them(tmp_path):
    work = memory_plan.workload_from_recipe("configs/tau3_airline_qwen3_4b.py")
    # bf16 params → fp32 master + fp32 moments (optim.master_dtype default), recipe lengths and batch
    assert (work.param_bytes, work.master_bytes, work.optimizer_bytes) == (2, 4, 4)
    assert work.seq_len == 16384 and work.rollout_batch == 16 * 8 and work.attention == "flash"
    cfg = memory_plan.model_config("Qwen3-4B")
    assert memory_plan.optimizer_bytes(cfg, work) == memory_plan.num_params(cfg) * (4 + 4 + 4 + 4)
    text = memory_plan.main(["--recipe", "configs/tau3_airline_qwen3_4b.py", "--out", str(tmp_path / "a.md")])
    assert "bf16 params + fp32 master weights + AdamW (fp32 μ, ν; fp32 gradient)" in text
    text = memory_plan.main(["--param_bytes", "2", "--optimizer_bytes", "2", "--out", str(tmp_path / "b.md")])
    assert "bf16 params + AdamW (bf16 μ, ν; fp32 gradient)" in text and "fp32 params" not in text


@pytest.mark.parametrize("name", ["full", "dots", "dots_no_batch", "none"])
def test_remat_policies_keep_gradients(name):
    def f(w, x):
        return jnp.sum(jnp.tanh(x @ w) @ w.T)

    w, x = jnp.ones((4, 4)) * 0.1, jnp.arange(8.0).reshape(2, 4)
    policy = memory_plan.remat_policy(name)
    wrapped = f if policy is None else jax.checkpoint(f, policy=policy)
    np.testing.assert_allclose(jax.grad(wrapped)(w, x), jax.grad(f)(w, x), rtol=1e-6)


def test_unknown_knob_names_are_rejected():
    with pytest.raises(ValueError, match="remat"):
        memory_plan.remat_policy("some")
    with pytest.raises(ValueError, match="cudnn"):
        memory_plan.attention_implementation("flash2")


def test_xla_attention_matches_softmax_reference():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 5, 2, 8)), jnp.float32) for _ in range(3))
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                       implementation=memory_plan.attention_implementation("xla"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
    scores = jnp.where(jnp.tril(jnp.ones((5, 5), bool)), scores, -jnp.inf)
    expected = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
