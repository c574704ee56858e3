"""sgcd_jax: RL for long-horizon tool-use LLM agents in JAX/Flax NNX, reference implementation of
SGCD (Sibling-Guided Credit Distillation)."""

__version__ = "0.1.0"
