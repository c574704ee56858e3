"""Decoder model family, KV cache, loading (HF dir / GGUF / short names), tokenizer and chat rendering."""

from sgcd_jax.models.attention import AttentionContext
from sgcd_jax.models.cache import KVCache
from sgcd_jax.models.config import ModelConfig
from sgcd_jax.models.decoder import BLOCK_FACTORIES, Decoder, register_block
from sgcd_jax.models import qwen3_5 as _qwen3_5  # noqa: F401,E402  registers the Qwen3.5 blocks + HF architectures

__all__ = ["ModelConfig", "Decoder", "KVCache", "AttentionContext", "register_block", "BLOCK_FACTORIES",
           "load_model", "load_tokenizer", "export_hf", "ChatRenderer"]
_LAZY = {"load_model": "loading", "load_tokenizer": "loading", "export_hf": "export", "ChatRenderer": "chat"}


def __getattr__(name: str):
    # Loading/chat/export pull in transformers/gguf/safetensors; import lazily so `from sgcd_jax.models import Decoder` stays light.
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"sgcd_jax.models.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'sgcd_jax.models' has no attribute {name!r}")
