"""The masked next-token NLL of a Decoder and its gradient over the nnx.Param leaves (accelerator-knob
tests compare these across attention implementations and remat policies)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def nll_value_and_grads(model: nnx.Module, tokens: jax.Array, positions: jax.Array, mask: jax.Array, *,
                        jit: bool = False):
    """(loss, grads) of the mean NLL of ``tokens[t+1]`` at the ``mask``-ed positions."""
    graphdef, params = nnx.split(model, nnx.Param)
    targets = jnp.roll(tokens, -1, axis=1)

    def loss(p):
        merged = nnx.merge(graphdef, p)
        logprobs = jax.nn.log_softmax(merged.logits(merged(tokens, positions, mask)[0]), axis=-1)
        token_logprobs = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
        return -jnp.sum(jnp.where(mask, token_logprobs, 0.0)) / mask.sum()

    step = jax.value_and_grad(loss)
    return (jax.jit(step) if jit else step)(params)
