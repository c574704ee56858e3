"""Batched KV-cache generation: sampling rules, jitted prefill/decode, multi-turn sessions."""

from sgcd_jax.sampling.rules import SamplingParams, sample_tokens
from sgcd_jax.sampling.session import GenerationSession, Sampler, TurnOutput

__all__ = ["SamplingParams", "sample_tokens", "Sampler", "GenerationSession", "TurnOutput"]
