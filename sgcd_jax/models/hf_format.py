"""HF transformers checkpoint format: config.json ↔ ModelConfig and our parameter paths ↔ HF tensor names.

Architectures register an adapter so new families (e.g. Qwen3.5) plug in without touching the loader.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

from sgcd_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ArchitectureAdapter:
    config_from_hf: Callable[[dict[str, Any]], dict[str, Any]]  # HF config.json → ModelConfig kwargs
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]  # ModelConfig → HF config.json
    # (our regex over param paths, HF name template with \1.., transposed): kernels are [in,out] here, [out,in] in HF
    name_rules: tuple[tuple[str, str, bool], ...]


ADAPTERS: dict[str, ArchitectureAdapter] = {}


def register_architecture(name: str, adapter: ArchitectureAdapter) -> None:
    ADAPTERS[name] = adapter


def adapter_for(architecture: str, source: str) -> ArchitectureAdapter:
    if architecture not in ADAPTERS:
        raise ValueError(f"{source}: unknown architecture {architecture!r}. Supported: {sorted(ADAPTERS)}. "
                         "Convert the checkpoint to one of these or register an ArchitectureAdapter "
                         "with sgcd_jax.models.hf_format.register_architecture.")
    return ADAPTERS[architecture]


DECODER_NAME_RULES: tuple[tuple[str, str, bool], ...] = (
    (r"^embed_tokens$", "model.embed_tokens.weight", False),
    (r"^final_norm/scale$", "model.norm.weight", False),
    (r"^lm_head/kernel$", "lm_head.weight", True),
    (r"^layers/(\d+)/input_norm/scale$", r"model.layers.\1.input_layernorm.weight", False),
    (r"^layers/(\d+)/post_attention_norm/scale$", r"model.layers.\1.post_attention_layernorm.weight", False),
    (r"^layers/(\d+)/attn/(q|k|v|o)_proj/kernel$", r"model.layers.\1.self_attn.\2_proj.weight", True),
    (r"^layers/(\d+)/attn/(q|k|v)_proj/bias$", r"model.layers.\1.self_attn.\2_proj.bias", False),
    (r"^layers/(\d+)/attn/(q|k)_norm/scale$", r"model.layers.\1.self_attn.\2_norm.weight", False),
    (r"^layers/(\d+)/mlp/(gate|up|down)_proj/kernel$", r"model.layers.\1.mlp.\2_proj.weight", True),
)


def hf_tensor_name(path: str, adapter: ArchitectureAdapter) -> tuple[str, bool]:
    """Our param path ('layers/3/attn/q_proj/kernel') → (HF tensor name, stored transposed)."""
    for pattern, template, transposed in adapter.name_rules:
        match = re.match(pattern, path)
        if match:
            return match.expand(template), transposed
    raise ValueError(f"no HF tensor name rule for parameter {path!r}; add one to the architecture adapter")


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    # transformers >= 5 nests theta and scaling in rope_parameters; older configs use rope_theta/rope_scaling.
    params = dict(hf.get("rope_parameters") or {})
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or params or None
    if scaling is not None:
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        if scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
    return float(theta), scaling


def decoder_config_from_hf(hf: dict[str, Any], *, qkv_bias: bool | None = None, qk_norm: bool = False) -> dict[str, Any]:
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported (SwiGLU with silu only)")
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported")
    if hf.get("use_sliding_window"):
        raise ValueError("sliding-window attention (use_sliding_window=True) is not supported")
    theta, scaling = _rope_from_hf(hf)
    heads = hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim"), rope_theta=theta, rope_scaling=scaling, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)) if qkv_bias is None else qkv_bias, qk_norm=qk_norm,
        max_position_embeddings=hf.get("max_position_embeddings", 2048), bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"))


def decoder_config_to_hf(cfg: ModelConfig, architecture: str, model_type: str) -> dict[str, Any]:
    hf = dict(
        architectures=[architecture], model_type=model_type, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        hidden_act="silu", rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
        max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
        bos_token_id=cfg.bos_token_id, pad_token_id=cfg.pad_token_id,
        eos_token_id=list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
        torch_dtype="float32" if cfg.param_dtype.itemsize == 4 else "bfloat16")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {**dict(cfg.rope_scaling), "rope_theta": cfg.rope_theta}
        hf["rope_scaling"] = dict(cfg.rope_scaling)
    hf["rope_parameters"] = rope
    if model_type == "llama":
        hf["attention_bias"] = cfg.attention_bias
        hf["mlp_bias"] = False
    return hf


register_architecture("LlamaForCausalLM", ArchitectureAdapter(
    config_from_hf=lambda hf: {**decoder_config_from_hf(hf), "architecture": "LlamaForCausalLM"},
    config_to_hf=lambda cfg: decoder_config_to_hf(cfg, "LlamaForCausalLM", "llama"),
    name_rules=DECODER_NAME_RULES))
register_architecture("MistralForCausalLM", ArchitectureAdapter(
    config_from_hf=lambda hf: {**decoder_config_from_hf(hf), "architecture": "MistralForCausalLM"},
    config_to_hf=lambda cfg: decoder_config_to_hf(cfg, "MistralForCausalLM", "mistral"),
    name_rules=DECODER_NAME_RULES))
register_architecture("Qwen2ForCausalLM", ArchitectureAdapter(
    config_from_hf=lambda hf: {**decoder_config_from_hf(hf, qkv_bias=True), "architecture": "Qwen2ForCausalLM"},
    config_to_hf=lambda cfg: decoder_config_to_hf(cfg, "Qwen2ForCausalLM", "qwen2"),
    name_rules=DECODER_NAME_RULES))
register_architecture("Qwen3ForCausalLM", ArchitectureAdapter(
    config_from_hf=lambda hf: {**decoder_config_from_hf(hf, qk_norm=True), "architecture": "Qwen3ForCausalLM"},
    config_to_hf=lambda cfg: decoder_config_to_hf(cfg, "Qwen3ForCausalLM", "qwen3"),
    name_rules=DECODER_NAME_RULES))
