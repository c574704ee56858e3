"""ModelConfig: one frozen, hashable description of every decoder the project runs.

Covers Llama (SmolLM2, Llama 3 with llama3 RoPE scaling), Qwen2/2.5 (qkv bias) and Qwen3 (q/k RMSNorm)
by flags; `layer_types` lets a hybrid model (Qwen3.5) pick another block per layer and `extra` carries
settings only such a block reads. Hashable so it can sit in an NNX graphdef / be a jit static argument.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# "xla": with a cache (prefill / continuation / decode) attention.blockwise_attention (online softmax over key
# blocks of `attention_block` slots: never [T, S] scores); without a cache up to T = attention_block the
# explicit einsum + masked softmax (attention.causal_blocked_attention: query blocks skip the all-masked upper
# key blocks), attention.causal_blockwise_attention beyond; "splash": JAX's Pallas TPU splash-attention kernel for the no-cache forward
# (T a multiple of 128; Pallas interpreter off TPU), blockwise with a cache;
# the others route full attention through jax.nn.dot_product_attention with implementation=
# "xla" ("dot_product_attention"), "cudnn" (cuDNN flash attention: GPU, bf16/fp16) or None ("auto": JAX's
# choice, which in jax 0.10.2 is always the XLA path — request "cudnn" explicitly on GPUs).
ATTENTION_IMPLS = ("xla", "dot_product_attention", "cudnn", "auto", "splash")
# names of sgcd_jax.memory_plan.remat_policy (kept here too: memory_plan imports this module)
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attention_out")


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return FrozenDict({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # None -> hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None  # None | {"rope_type": "llama3"|"linear", ...} (HF keys)
    partial_rotary_factor: float = 1.0  # fraction of head_dim that is rotated (first dims)
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projection bias (Qwen2)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    max_position_embeddings: int = 2048
    param_dtype: Any = "float32"
    dtype: Any = "float32"  # compute dtype
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    layer_types: tuple[str, ...] | None = None  # default: ("full_attention",) * num_layers
    remat: bool = False  # legacy switch: True == remat_policy "full" (used when remat_policy is "none")
    remat_policy: str = "none"  # one of REMAT_POLICIES: what a block saves for the backward pass (no-cache forward)
    attention_impl: str = "xla"  # one of ATTENTION_IMPLS (see above)
    attention_block: int = 512  # key/query block of attention.blockwise_attention (memory O(block²) per head)
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # block-specific settings
    architecture: str = "LlamaForCausalLM"  # HF architecture name used for export

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                    "pass head_dim explicitly")
            set_("head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        set_("param_dtype", jnp.dtype(self.param_dtype))
        set_("dtype", jnp.dtype(self.dtype))
        if isinstance(self.eos_token_id, list):
            set_("eos_token_id", tuple(self.eos_token_id))
        if self.layer_types is None:
            set_("layer_types", ("full_attention",) * self.num_layers)
        else:
            set_("layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries but num_layers={self.num_layers}")
        if self.rope_scaling is not None:
            scaling = dict(self.rope_scaling)
            rope_type = scaling.get("rope_type", scaling.get("type", "default"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise ValueError(f"rope_scaling type {rope_type!r} is not supported; use one of {SUPPORTED_ROPE_TYPES}")
            scaling["rope_type"] = rope_type
            set_("rope_scaling", None if rope_type == "default" else _freeze(scaling))
        set_("extra", _freeze(self.extra))
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r} is not one of {REMAT_POLICIES}")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")

    @property
    def effective_remat_policy(self) -> str:
        """remat_policy, or "full" when only the legacy `remat=True` is set."""
        return "full" if self.remat and self.remat_policy == "none" else self.remat_policy

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count of the full-attention decoder described by this config."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = d * (q + 2 * kv) + q * d + 3 * d * f + 2 * d
        per_layer += (q + 2 * kv) if self.attention_bias else 0
        per_layer += 2 * self.head_dim if self.qk_norm else 0
        return v * d * (1 if self.tie_word_embeddings else 2) + self.num_layers * per_layer + d


def dtype_name(dtype: Any) -> str:
    return np.dtype(dtype).name if dtype != jnp.bfloat16 else "bfloat16"
