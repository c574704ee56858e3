"""Qwen3.5 hybrid text decoder as blocks of the shared `Decoder` family (no fork).

    layer_types[i] == "linear_attention":      x + GatedDeltaNet(RMSNorm(x));   x + SwiGLU(RMSNorm(x))
    layer_types[i] == "gated_full_attention":  x + GatedAttention(RMSNorm(x));  x + SwiGLU(RMSNorm(x))

GatedAttention is GQA softmax attention with q/k RMSNorm over head_dim, rotary on the first
`partial_rotary_factor · head_dim` dims, and an output gate: q_proj emits [query | gate] per head and the
attention output is multiplied by sigmoid(gate) before o_proj. All RMSNorms outside the DeltaNet are
zero-centred (scale = 1 + w, `cfg.extra["zero_centered_norm"]`), as in the checkpoints.
Accelerator knobs act as in decoder.py: GatedAttention computes softmax attention with
models/attention.attention (`cfg.attention_impl`: einsum path or jax.nn.dot_product_attention / cuDNN), the Decoder wraps every block,
hybrid ones too, in nnx.remat with `cfg.remat_policy`, and each token mixer's core output (attention before
the gate, the delta rule before its gated norm) is named "attention_out" for the "save_attention_out" policy.
HF's "full_attention" becomes "gated_full_attention" here because the family's "full_attention" block is
the plain Llama/Qwen3 one. The DeltaNet's per-row conv and recurrent states live in `KVCache.extra` under
"layers/{i}/conv" and "layers/{i}/recurrent" (KVCache.init creates them as zeros through
BLOCK_STATE_FACTORIES), so the sampler's prefill / decode / multi-turn append and `take_rows` work unchanged.

Importing this module registers the blocks and the HF architectures Qwen3_5ForCausalLM (text checkpoints)
and Qwen3_5ForConditionalGeneration (the released VLM checkpoints; the vision tower is not loaded).
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from sgcd_jax.models.attention import AttentionContext, attention
from sgcd_jax.models.cache import BLOCK_STATE_FACTORIES, KVCache, kv_layer_index, scatter_set
from sgcd_jax.models.config import ModelConfig
from sgcd_jax.models.decoder import Linear, RMSNorm, SwiGLU, apply_rope, register_block
from sgcd_jax.models.gated_deltanet import GatedDeltaNet, deltanet_state_shapes
from sgcd_jax.models.hf_format import ArchitectureAdapter, decoder_config_from_hf, register_architecture

log = logging.getLogger(__name__)

LINEAR, GATED_FULL = "linear_attention", "gated_full_attention"
_HF_TO_OURS = {"linear_attention": LINEAR, "full_attention": GATED_FULL}
_OURS_TO_HF = {v: k for k, v in _HF_TO_OURS.items()}
_LINEAR_KEYS = ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                "linear_conv_kernel_dim")

# Partition rules for the parameters the shared DEFAULT_RULES do not cover (pass as extra_rules=...).
QWEN3_5_PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"/linear_attn/mixer/(in_proj_qkv|in_proj_z)/kernel$", P("fsdp", "tp")),
    (r"/linear_attn/mixer/(in_proj_a|in_proj_b)/kernel$", P("fsdp", None)),
    (r"/linear_attn/mixer/out_proj/kernel$", P("tp", "fsdp")),
    (r"/linear_attn/mixer/conv_weight$", P("tp")),  # [C, 1, K]
    (r"/linear_attn/mixer/(A_log|dt_bias)$", P()),
    (r"/linear_attn/mixer/norm/weight$", P()),
    (r"/attn/o_proj/bias$", P()),
)


# ----------------------------------------------------------------------------- blocks
class GatedAttention(nnx.Module):
    """GQA attention with q/k norm, partial RoPE (via ctx) and a sigmoid output gate."""

    def __init__(self, cfg: ModelConfig, layer_index: int, *, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Linear(d, h * 2 * hd, use_bias=cfg.attention_bias, cfg=cfg, rngs=rngs)  # per head [query|gate]
        self.k_proj = Linear(d, kv * hd, use_bias=cfg.attention_bias, cfg=cfg, rngs=rngs)
        self.v_proj = Linear(d, kv * hd, use_bias=cfg.attention_bias, cfg=cfg, rngs=rngs)
        self.o_proj = Linear(h * hd, d, use_bias=cfg.attention_bias, cfg=cfg, rngs=rngs)
        self.q_norm = RMSNorm(hd, cfg=cfg)
        self.k_norm = RMSNorm(hd, cfg=cfg)
        self.shape = (h, kv, hd)
        self.kv_index = kv_layer_index(cfg, layer_index)  # only full-attention layers have k/v in the cache
        self.attention_impl = cfg.attention_impl
        self.attention_block = cfg.attention_block

    def __call__(self, x: jax.Array, ctx: AttentionContext, cache: KVCache | None) -> tuple[jax.Array, KVCache | None]:
        batch, steps, _ = x.shape
        num_heads, num_kv, head_dim = self.shape
        query_and_gate = self.q_proj(x).reshape(batch, steps, num_heads, 2 * head_dim)
        q, gate = query_and_gate[..., :head_dim], query_and_gate[..., head_dim:]
        q = apply_rope(self.q_norm(q), ctx.rope_cos, ctx.rope_sin)
        k = apply_rope(self.k_norm(self.k_proj(x).reshape(batch, steps, num_kv, head_dim)), ctx.rope_cos, ctx.rope_sin)
        v = self.v_proj(x).reshape(batch, steps, num_kv, head_dim)
        layer = None  # with a cache: this layer's index in the stacked cache k/v
        if cache is not None:
            rows, layer = jnp.arange(batch)[:, None], self.kv_index
            cache = cache.replace(
                k=scatter_set(cache.k, (layer, rows, ctx.write_slots), k, mode="drop"),
                v=scatter_set(cache.v, (layer, rows, ctx.write_slots), v, mode="drop"))
            k, v = cache.k, cache.v  # stacked [L,B,S,Hkv,Dh]: attention reads layer `layer` in place
        out = checkpoint_name(attention(q, k, v, ctx, self.attention_impl, self.attention_block, layer,
                                        None if cache is None else cache.prefix_store()), "attention_out")
        gated = out.astype(jnp.float32) * jax.nn.sigmoid(gate.astype(jnp.float32))
        return self.o_proj(gated.astype(x.dtype).reshape(batch, steps, num_heads * head_dim)), cache


class LinearAttention(nnx.Module):
    """Adapter from the block interface (x, ctx, cache) to GatedDeltaNet with its states in cache.extra."""

    def __init__(self, cfg: ModelConfig, layer_index: int, *, rngs: nnx.Rngs):
        self.mixer = GatedDeltaNet(cfg, rngs=rngs)
        self.conv_key, self.state_key = f"layers/{layer_index}/conv", f"layers/{layer_index}/recurrent"

    def __call__(self, x: jax.Array, ctx: AttentionContext, cache: KVCache | None) -> tuple[jax.Array, KVCache | None]:
        if cache is None:
            return self.mixer(x, ctx.token_mask)[0], None
        conv_state, recurrent_state = cache.extra.get(self.conv_key), cache.extra.get(self.state_key)
        out, conv_state, recurrent_state = self.mixer(x, ctx.token_mask, conv_state, recurrent_state)
        extra = {**cache.extra, self.conv_key: conv_state, self.state_key: recurrent_state}
        return out, cache.replace(extra=extra)


class HybridBlock(nnx.Module):
    """Pre-norm residual block whose token mixer is Gated DeltaNet or gated attention, then a SwiGLU MLP."""

    def __init__(self, cfg: ModelConfig, layer_index: int, *, rngs: nnx.Rngs):
        if not cfg.extra.get("zero_centered_norm"):
            raise ValueError("Qwen3.5 blocks need cfg.extra['zero_centered_norm']=True (RMSNorm scale = 1 + w); "
                             "build the config with sgcd_jax.models.qwen3_5.qwen3_5_config or from an HF checkpoint")
        if "full_attention" in cfg.layer_types:  # the plain block would index the compact k/v cache wrongly
            raise ValueError("a Qwen3.5 config mixes 'linear_attention' with the plain 'full_attention' block; use "
                             f"'{GATED_FULL}' for its attention layers (qwen3_5_config / the HF adapter do)")
        self.input_norm = RMSNorm(cfg.hidden_size, cfg=cfg)
        if cfg.layer_types[layer_index] == LINEAR:
            self.linear_attn = LinearAttention(cfg, layer_index, rngs=rngs)
        else:
            self.attn = GatedAttention(cfg, layer_index, rngs=rngs)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg=cfg)
        self.mlp = SwiGLU(cfg, rngs=rngs)
        self.is_linear = cfg.layer_types[layer_index] == LINEAR

    def __call__(self, x: jax.Array, ctx: AttentionContext, cache: KVCache | None) -> tuple[jax.Array, KVCache | None]:
        mixer = self.linear_attn if self.is_linear else self.attn
        mixed, cache = mixer(self.input_norm(x), ctx, cache)
        x = x + mixed
        return x + self.mlp(self.post_attention_norm(x)), cache


register_block(LINEAR)(HybridBlock)
register_block(GATED_FULL)(HybridBlock)


def _initial_deltanet_states(cfg: ModelConfig, layer_index: int, batch_size: int) -> dict[str, jax.Array]:
    shapes = deltanet_state_shapes(cfg, batch_size)
    return {f"layers/{layer_index}/{name}": jnp.zeros(*shapes[name]) for name in ("conv", "recurrent")}


BLOCK_STATE_FACTORIES[LINEAR] = _initial_deltanet_states  # KVCache.init(cfg, ...) now carries zero DeltaNet states


# ----------------------------------------------------------------------------- config
def qwen3_5_config(*, linear_num_key_heads: int, linear_num_value_heads: int, linear_key_head_dim: int,
                   linear_value_head_dim: int, linear_conv_kernel_dim: int = 4, full_attention_interval: int = 4,
                   deltanet_chunk_size: int = 64, layer_types: tuple[str, ...] | None = None,
                   partial_rotary_factor: float = 0.25, **decoder_fields: Any) -> ModelConfig:
    """A ModelConfig for the Qwen3.5 hybrid; `layer_types` defaults to 3 linear + 1 full per 4 layers."""
    num_layers = decoder_fields["num_layers"]
    if layer_types is None:
        layer_types = tuple(GATED_FULL if (i + 1) % full_attention_interval == 0 else LINEAR
                            for i in range(num_layers))
    extra = dict(decoder_fields.pop("extra", {}) or {})
    extra.update(linear_num_key_heads=linear_num_key_heads, linear_num_value_heads=linear_num_value_heads,
                 linear_key_head_dim=linear_key_head_dim, linear_value_head_dim=linear_value_head_dim,
                 linear_conv_kernel_dim=linear_conv_kernel_dim, deltanet_chunk_size=deltanet_chunk_size,
                 zero_centered_norm=True)
    decoder_fields.setdefault("architecture", "Qwen3_5ForCausalLM")
    return ModelConfig(layer_types=tuple(layer_types), partial_rotary_factor=partial_rotary_factor, qk_norm=True,
                       extra=extra, **decoder_fields)


def config_kwargs_from_hf(hf: dict[str, Any], architecture: str) -> dict[str, Any]:
    """HF Qwen3.5 config.json (text config, or the VLM config with text_config) → ModelConfig kwargs."""
    text = hf.get("text_config", hf)
    if "vision_config" in hf:
        log.warning("Qwen3.5 checkpoint has a vision tower (vision_config): loading the text decoder only; "
                    "model.visual.* and mtp.* tensors are ignored")
    kwargs = decoder_config_from_hf(text, qk_norm=True)
    if "text_config" in hf:  # the VLM's own flag decides tying in transformers
        kwargs["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", kwargs["tie_word_embeddings"]))
    rope = text.get("rope_parameters") or {}
    partial = rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))
    kwargs["rope_scaling"] = None  # text-only mrope with equal t/h/w positions is plain RoPE
    interval = text.get("full_attention_interval", 4)
    hf_types = text.get("layer_types") or ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                                           for i in range(text["num_hidden_layers"])]
    unknown = sorted(set(hf_types) - set(_HF_TO_OURS))
    if unknown:
        raise ValueError(f"Qwen3.5 layer_types {unknown} are not supported; expected {sorted(_HF_TO_OURS)}")
    linear = {key: text[key] for key in _LINEAR_KEYS if key in text}
    kwargs.pop("qk_norm")
    return dict(qwen3_5_config(layer_types=tuple(_HF_TO_OURS[t] for t in hf_types), partial_rotary_factor=partial,
                               architecture=architecture, **linear, **kwargs).__dict__)


def config_to_hf(cfg: ModelConfig, *, vlm: bool) -> dict[str, Any]:
    """ModelConfig → Qwen3.5 config.json (text config, or VLM config wrapping it with a default vision tower)."""
    eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    text = dict(
        model_type="qwen3_5_text", vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
        max_position_embeddings=cfg.max_position_embeddings, attention_bias=cfg.attention_bias,
        layer_types=[_OURS_TO_HF[t] for t in cfg.layer_types],
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta,
                         "partial_rotary_factor": cfg.partial_rotary_factor},
        bos_token_id=cfg.bos_token_id, eos_token_id=eos, pad_token_id=cfg.pad_token_id,
        torch_dtype="float32" if cfg.param_dtype.itemsize == 4 else "bfloat16",
        **{key: cfg.extra[key] for key in _LINEAR_KEYS})
    if not vlm:
        return {"architectures": ["Qwen3_5ForCausalLM"], **text}
    return {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5", "text_config": text,
            "tie_word_embeddings": cfg.tie_word_embeddings, "torch_dtype": text["torch_dtype"]}


# Public Qwen/Qwen3.5-4B text settings (loading always reads the checkpoint's own config.json; these feed the
# memory plan and the recipe). Linear-attention head counts/dims are the transformers Qwen3.5 defaults.
QWEN3_5_4B = dict(vocab_size=248320, hidden_size=2560, intermediate_size=9216, num_layers=32, num_heads=16,
                  num_kv_heads=4, head_dim=256, rope_theta=10_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  max_position_embeddings=262144, linear_num_key_heads=16, linear_num_value_heads=32,
                  linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4)


def num_params(cfg: ModelConfig) -> int:
    """Parameter count of a Qwen3.5 hybrid (ModelConfig.num_params counts every layer as plain attention)."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    x = cfg.extra
    keys = x["linear_num_key_heads"] * x["linear_key_head_dim"]
    values = x["linear_num_value_heads"] * x["linear_value_head_dim"]
    heads_v = x["linear_num_value_heads"]
    shared = 3 * d * f + 2 * d  # MLP + two block norms
    attention = d * (2 * h * hd + 2 * kv * hd) + h * hd * d + 2 * hd
    linear = d * (2 * keys + values) + d * values + 2 * d * heads_v + values * d \
        + (2 * keys + values) * x.get("linear_conv_kernel_dim", 4) + 2 * heads_v + x["linear_value_head_dim"]
    layers = sum(shared + (linear if kind == LINEAR else attention) for kind in cfg.layer_types)
    return v * d * (1 if cfg.tie_word_embeddings else 2) + layers + d


def cache_bytes(cfg: ModelConfig, batch: int, max_len: int, kv_bytes: int = 2) -> dict[str, int]:
    """Bytes of a rollout cache: k/v of the full-attention layers only, and the DeltaNet states (fp32 recurrent +
    conv, independent of max_len)."""
    per_layer_kv = 2 * batch * max_len * cfg.num_kv_heads * cfg.head_dim * kv_bytes
    num_attention = sum(kind != LINEAR for kind in cfg.layer_types)
    shapes = deltanet_state_shapes(cfg, batch)
    conv, recurrent = shapes["conv"][0], shapes["recurrent"][0]
    state = (cfg.num_layers - num_attention) * (4 * recurrent[0] * recurrent[1] * recurrent[2] * recurrent[3]
                                                + kv_bytes * conv[0] * conv[1] * conv[2])
    return {"kv": num_attention * per_layer_kv, "deltanet_states": state}


def name_rules(prefix: str) -> tuple[tuple[str, str, bool], ...]:
    """Our param paths ↔ HF tensor names under `prefix` ('model.' or 'model.language_model.')."""
    layer = prefix + r"layers.\1."
    return (
        (r"^embed_tokens$", prefix + "embed_tokens.weight", False),
        (r"^final_norm/scale$", prefix + "norm.weight", False),
        (r"^lm_head/kernel$", "lm_head.weight", True),
        (r"^layers/(\d+)/input_norm/scale$", layer + "input_layernorm.weight", False),
        (r"^layers/(\d+)/post_attention_norm/scale$", layer + "post_attention_layernorm.weight", False),
        (r"^layers/(\d+)/attn/(q|k|v|o)_proj/kernel$", layer + r"self_attn.\2_proj.weight", True),
        (r"^layers/(\d+)/attn/(q|k|v|o)_proj/bias$", layer + r"self_attn.\2_proj.bias", False),
        (r"^layers/(\d+)/attn/(q|k)_norm/scale$", layer + r"self_attn.\2_norm.weight", False),
        (r"^layers/(\d+)/mlp/(gate|up|down)_proj/kernel$", layer + r"mlp.\2_proj.weight", True),
        (r"^layers/(\d+)/linear_attn/mixer/(in_proj_qkv|in_proj_z|in_proj_b|in_proj_a|out_proj)/kernel$",
         layer + r"linear_attn.\2.weight", True),
        (r"^layers/(\d+)/linear_attn/mixer/conv_weight$", layer + "linear_attn.conv1d.weight", False),
        (r"^layers/(\d+)/linear_attn/mixer/(A_log|dt_bias)$", layer + r"linear_attn.\2", False),
        (r"^layers/(\d+)/linear_attn/mixer/norm/weight$", layer + "linear_attn.norm.weight", False),
    )


register_architecture("Qwen3_5ForCausalLM", ArchitectureAdapter(
    config_from_hf=lambda hf: config_kwargs_from_hf(hf, "Qwen3_5ForCausalLM"),
    config_to_hf=lambda cfg: config_to_hf(cfg, vlm=False),
    name_rules=name_rules("model.")))
register_architecture("Qwen3_5ForConditionalGeneration", ArchitectureAdapter(
    config_from_hf=lambda hf: config_kwargs_from_hf(hf, "Qwen3_5ForConditionalGeneration"),
    config_to_hf=lambda cfg: config_to_hf(cfg, vlm=True),
    name_rules=name_rules("model.language_model.")))
