"""Sampling rules on one step of logits: temperature, top-k, top-p (nucleus), greedy.

All functions are pure and jittable; `SamplingParams` is frozen and hashable so it can be a jit static
argument. Order of operations (the same as HF `generate` and vLLM): logits / temperature → top-k mask →
top-p mask → renormalise → sample.

Which logprob is returned: `sample_tokens` returns log p(token) under the distribution it actually
sampled from, i.e. after temperature *and* after top-k/top-p truncation and renormalisation
(`logprob_mode="sampled"`, the default). With `logprob_mode="tempered"` it returns the log-prob under
softmax(logits / temperature) with no truncation — what a trainer that recomputes logprobs at the
same temperature sees. With the RL default (temperature=1, top_p=1, top_k=0) both coincide with the
plain model logprob. Greedy decoding samples from a point mass, so its "sampled" logprob is 0; use
"tempered" (then temperature 1 is used) if you want the model's logprob of the argmax token.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so masked logits stay NaN-free through softmax/log_softmax


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability mass reaches top_p
    top_k: int = 0  # 0 disables
    logprob_mode: str = "sampled"  # "sampled" | "tempered" (see module docstring)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables), got {self.top_k}")
        if self.logprob_mode not in ("sampled", "tempered"):
            raise ValueError(f"logprob_mode must be 'sampled' or 'tempered', got {self.logprob_mode!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    """Bool [.., V]: True for the k largest logits (ties at the k-th value are all kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return jnp.ones(logits.shape, jnp.bool_)
    kth_value = jax.lax.top_k(logits, k)[0][..., -1:]  # [.., 1]
    return logits >= kth_value


def top_p_mask(logits: jax.Array, top_p: float) -> jax.Array:
    """Bool [.., V]: the smallest set of most-probable tokens whose softmax mass reaches top_p.

    A token is kept when the mass of the tokens strictly more probable than it is < top_p, so the most
    probable token is always kept. Tokens tied with the last kept one are kept too.
    """
    if top_p >= 1.0:
        return jnp.ones(logits.shape, jnp.bool_)
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]  # [.., V] descending
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # exclusive cumsum
    keep_sorted = mass_before < top_p
    # threshold = smallest kept logit; everything >= it is kept
    num_kept = jnp.sum(keep_sorted, axis=-1, keepdims=True)  # [.., 1] >= 1
    threshold = jnp.take_along_axis(sorted_logits, num_kept - 1, axis=-1)
    return logits >= threshold


def processed_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """float32 [.., V]: logits of the distribution that is actually sampled from (masked = NEG_INF)."""
    logits = logits.astype(jnp.float32)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    keep = top_k_mask(logits, params.top_k) & top_p_mask(logits, params.top_p)
    return jnp.where(keep, logits, NEG_INF)


def sample_tokens(logits: jax.Array, key: jax.Array, params: SamplingParams) -> tuple[jax.Array, jax.Array]:
    """Sample one token per row. logits [B, V] → (tokens [B] int32, logprobs [B] float32).

    ``key``: one key for the batch, or keys [B] (one per row: row b's token then depends only on its
    own key and logits, not on which other rows share the batch — what multi-host rollouts need)."""
    logits = logits.astype(jnp.float32)
    if params.greedy:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        if params.logprob_mode == "tempered":
            logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[:, None], -1)[:, 0]
        else:
            logprobs = jnp.zeros(tokens.shape, jnp.float32)
        return tokens, logprobs
    final_logits = processed_logits(logits, params)
    if key.ndim == 1:  # per-row keys
        tokens = jax.vmap(lambda k, row: jax.random.categorical(k, row))(key, final_logits).astype(jnp.int32)
    else:
        tokens = jax.random.categorical(key, final_logits, axis=-1).astype(jnp.int32)
    scored = final_logits if params.logprob_mode == "sampled" else logits / params.temperature
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(scored, -1), tokens[:, None], -1)[:, 0]
    return tokens, logprobs
