"""Mesh construction, partition rules, and sharded forward == unsharded forward on 8 simulated devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P

from sgcd_jax.models import Decoder, ModelConfig, load_model
from sgcd_jax.parallel.sharding import (DEFAULT_RULES, MeshConfig, jit_sharded_forward, make_mesh, partition_spec,
                               state_shardings)

CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  attention_bias=True, qk_norm=True, tie_word_embeddings=False)


def test_mesh_fills_the_minus_one_axis_with_the_remaining_devices():
    assert jax.device_count() == 8
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1, tp=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tp": 2}
    with pytest.raises(ValueError, match="needs 12 devices"):
        make_mesh(MeshConfig(data=3, fsdp=2, tp=2))
    with pytest.raises(ValueError, match="at most one may be -1"):
        MeshConfig(data=-1, fsdp=-1)


def test_every_parameter_matches_a_rule_and_tp_shards_heads():
    mesh = make_mesh(MeshConfig(fsdp=4, tp=2))
    _, state = nnx.split(nnx.eval_shape(lambda: Decoder(CFG, rngs=nnx.Rngs(0))))
    shardings = state_shardings(state, mesh)
    q_kernel = shardings["layers"][0]["attn"]["q_proj"]["kernel"]
    assert q_kernel.spec == P("fsdp", "tp")
    assert shardings["layers"][0]["mlp"]["down_proj"]["kernel"].spec == P("tp", "fsdp")
    assert shardings["final_norm"]["scale"].spec == P(None)


def test_axis_that_does_not_divide_a_dimension_is_replicated():
    mesh = make_mesh(MeshConfig(fsdp=4, tp=2))
    assert partition_spec("layers/0/attn/k_proj/kernel", (6, 3), mesh, DEFAULT_RULES) == P(None, None)


def test_unknown_parameter_error_says_how_to_add_a_rule():
    mesh = make_mesh(MeshConfig(fsdp=8))
    with pytest.raises(ValueError, match=r"no partition rule matches parameter 'layers/0/mixer/A_log'.*extra_rules"):
        partition_spec("layers/0/mixer/A_log", (4,), mesh, DEFAULT_RULES)


@pytest.mark.parametrize("mesh_config", [MeshConfig(fsdp=4, tp=2), MeshConfig(data=2, fsdp=2, tp=2)])
def test_sharded_forward_equals_unsharded(mesh_config):
    model = Decoder(CFG, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (8, 12), 0, CFG.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(12), (8, 12))
    mask = jnp.arange(12)[None] < jnp.array([12, 9, 5, 12, 1, 7, 12, 3])[:, None]
    expected, _ = model(tokens, positions, mask)
    mesh = make_mesh(mesh_config)
    forward, state = jit_sharded_forward(model, mesh)
    hidden = forward(state, tokens, positions, mask)
    assert state["layers"][0]["mlp"]["gate_proj"]["kernel"].sharding.spec == P("fsdp", "tp")
    assert len(hidden.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(expected), atol=1e-5)


def test_load_model_places_each_tensor_with_its_named_sharding(tmp_path):
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    ref = transformers.Qwen2ForCausalLM(config).eval()
    ref.save_pretrained(tmp_path)
    mesh = make_mesh(MeshConfig(fsdp=4, tp=2))
    model, _ = load_model(str(tmp_path), mesh=mesh, with_tokenizer=False)
    kernel = model.layers[1].attn.q_proj.kernel[...]
    assert kernel.sharding.spec == P("fsdp", "tp") and kernel.addressable_shards[0].data.shape == (16, 32)
    expected = ref.model.layers[1].self_attn.q_proj.weight.detach().numpy().T
    np.testing.assert_array_equal(np.asarray(kernel), expected)
