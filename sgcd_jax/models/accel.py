"""Accelerator knobs the model reads by name: ``remat_policy(name)`` (→ a ``jax.checkpoint`` policy for
``nnx.remat(..., policy=...)``) and ``attention_implementation(name)`` (→ the
``jax.nn.dot_product_attention(implementation=...)`` value). They live next to the model code so the
model never imports the memory-planning tool (``sgcd_jax.memory_plan`` re-exports them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

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


def recompute_after_cotangent(fn: Callable[..., jax.Array], policy: Any) -> Callable[..., jax.Array]:
    """``jax.checkpoint(fn, policy=policy)`` whose backward recomputes only once its incoming cotangent exists.

    Plain remat leaves the recomputation free to run as soon as its saved inputs exist, and XLA's CPU
    scheduler ran the recomputed forward of every layer ahead of the backward, so remat "full" kept as much
    temp memory as "none". ``lax.optimization_barrier`` cannot order it: the CPU pipeline expands barriers
    before scheduling. Here every floating residual gets ``0 * cotangent[0]`` added (exact for finite
    cotangents; a non-finite cotangent gives non-finite gradients either way), a data dependency no
    pass removes: layer i's recomputation waits for layer i+1's backward, so about one layer's activations
    are live at a time. ``fn(*args) -> array``; gradients equal plain remat's.
    """
    remat_fn = jax.checkpoint(fn, policy=policy)

    @jax.custom_vjp
    def run(*args):
        return fn(*args)

    def forward(*args):
        return jax.vjp(remat_fn, *args)  # (out, backward): backward is a pytree of what the policy saved

    def backward(saved, cotangent):
        zero = jnp.ravel(cotangent)[0].astype(jnp.float32) * 0.0  # not constant-folded: 0 * inf/nan is nan
        saved = jax.tree.map(lambda leaf: leaf + zero.astype(leaf.dtype)
                             if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf, saved)
        return saved(cotangent)

    run.defvjp(forward, backward)
    return run


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
