"""Accelerator knobs the model reads by name: ``remat_policy(name)`` (→ a ``jax.checkpoint`` policy for
``nnx.remat(..., policy=...)``) and ``attention_implementation(name)`` (→ the
``jax.nn.dot_product_attention(implementation=...)`` value). They live next to the model code so the
model never imports the memory-planning tool (``sgcd_jax.memory_plan`` re-exports them).
"""

from __future__ import annotations

from typing import Any

import jax

REMAT_POLICY_NAMES = ("none", "full", "dots", "dots_no_batch", "save_attention_out")


def remat_policy(name: str) -> Any:
    """Config name → ``jax.checkpoint`` policy (None = no remat: keep every intermediate).

    "full": save nothing inside a block (recompute it in the backward pass; least memory);
    "dots": save all matmul outputs; "dots_no_batch": save matmuls without batch dims (weights·x);
    "save_attention_out": save only values named "attention_out" via ``checkpoint_name``.
    """
    policies = jax.checkpoint_policies
    table = {
        "none": None,
        "full": policies.nothing_saveable,
        "dots": policies.checkpoint_dots,
        "dots_no_batch": policies.dots_with_no_batch_dims_saveable,
        "save_attention_out": policies.save_only_these_names("attention_out"),
    }
    if name not in table:
        raise ValueError(f"remat policy {name!r} is not one of {REMAT_POLICY_NAMES}")
    return table[name]


ATTENTION_IMPLS = {"xla": "xla", "cudnn": "cudnn", "auto": None}  # config name → jax value


def attention_implementation(name: str) -> str | None:
    """Config name → ``jax.nn.dot_product_attention(implementation=...)`` value.

    "xla": portable (CPU/TPU/GPU); "cudnn": cuDNN flash attention (GPU, bf16/fp16 only);
    "auto": implementation=None, JAX's choice — in jax 0.10.2 that is always the XLA path (it
    materialises [T, S] scores); ask for "cudnn" explicitly on GPUs.
    """
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation {name!r}; use one of {sorted(ATTENTION_IMPLS)}")
    return ATTENTION_IMPLS[name]
