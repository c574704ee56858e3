"""GGUF (llama.cpp) → ModelConfig, dequantised parameters and a transformers fast tokenizer. No torch needed.

Two llama.cpp conventions are undone here: tensors are stored [out, in] like HF (we transpose to [in, out]),
and for `llama` files the Q and K rows are permuted from HF's half-split RoPE layout into interleaved pairs.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import gguf
import jax
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from sgcd_jax.models.config import ModelConfig

SUPPORTED_GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# our param path → (GGUF tensor name template, transposed)
_NAME_RULES = (
    (r"^embed_tokens$", "token_embd.weight", False),
    (r"^final_norm/scale$", "output_norm.weight", False),
    (r"^lm_head/kernel$", "output.weight", True),
    (r"^layers/(\d+)/input_norm/scale$", r"blk.\1.attn_norm.weight", False),
    (r"^layers/(\d+)/post_attention_norm/scale$", r"blk.\1.ffn_norm.weight", False),
    (r"^layers/(\d+)/attn/(q|k|v)_proj/kernel$", r"blk.\1.attn_\2.weight", True),
    (r"^layers/(\d+)/attn/o_proj/kernel$", r"blk.\1.attn_output.weight", True),
    (r"^layers/(\d+)/attn/(q|k|v)_proj/bias$", r"blk.\1.attn_\2.bias", False),
    (r"^layers/(\d+)/attn/(q|k)_norm/scale$", r"blk.\1.attn_\2_norm.weight", False),
    (r"^layers/(\d+)/mlp/(gate|up|down)_proj/kernel$", r"blk.\1.ffn_\2.weight", True),
)

# Pre-tokenizer split regexes by `tokenizer.ggml.pre` (the same as the models' own tokenizer.json files).
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"qwen2": _QWEN2_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT}
_CONTROL, _USER_DEFINED = 3, 4  # gguf.TokenType values


@functools.lru_cache(maxsize=4)
def _reader(path: str) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)  # memory-mapped


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(path: str) -> ModelConfig:
    reader = _reader(path)
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                         f"{sorted(SUPPORTED_GGUF_ARCHITECTURES)}. Use an HF checkpoint directory instead.")
    get = lambda key, default=None: _field(reader, f"{arch}.{key}", default)  # noqa: E731
    heads = get("attention.head_count")
    hidden = get("embedding_length")
    tensor_names = {t.name for t in reader.tensors}
    vocab = get("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens"))
    scaling = None
    if get("rope.scaling.type") not in (None, "none"):
        raise ValueError(f"{path}: rope scaling {get('rope.scaling.type')!r} in GGUF is not supported")
    return ModelConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=get("feed_forward_length"),
        num_layers=get("block_count"), num_heads=heads, num_kv_heads=get("attention.head_count_kv") or heads,
        head_dim=get("attention.key_length") or hidden // heads, rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling, rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in tensor_names, attention_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names, max_position_embeddings=get("context_length", 2048),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"), eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"), architecture=SUPPORTED_GGUF_ARCHITECTURES[arch])


def _unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert permute: rows [head, Dh/2, 2] (interleaved) → [head, 2, Dh/2] (HF halves)."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensor_name(path: str) -> tuple[str, bool]:
    for pattern, template, transposed in _NAME_RULES:
        match = re.match(pattern, path)
        if match:
            return match.expand(template), transposed
    raise ValueError(f"no GGUF tensor name rule for parameter {path!r}")


def tensor_reader(path: str, cfg: ModelConfig):
    reader = _reader(path)
    tensors = {t.name: t for t in reader.tensors}
    permuted = _field(reader, "general.architecture") == "llama"

    def read(param_path: str, leaf: jax.ShapeDtypeStruct, sharding: Any) -> jax.Array:
        from sgcd_jax.parallel.sharding import place
        name, transposed = gguf_tensor_name(param_path)
        if name not in tensors:
            raise KeyError(f"{path}: tensor {name!r} (for parameter {param_path}) is missing; the file is incomplete "
                           "or of an unsupported variant — re-convert it with llama.cpp's convert_hf_to_gguf.py")
        tensor = tensors[name]
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)  # [out, in] or [n]
        if permuted and re.search(r"attn_(q|k)\.weight$", name):
            weight = _unpermute_rope_rows(weight, cfg.num_heads if ".attn_q." in name else cfg.num_kv_heads)
        return place(weight.T if transposed else weight, leaf, sharding, f"{path}: tensor {name!r}")

    return read


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-unicode map (the alphabet byte-level BPE vocabularies are spelled in)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _pre_tokenizer(pre: str | None) -> Any:
    if pre == "smollm":  # SmolLM's own tokenizer.json: every digit its own pre-token, then GPT-2 byte-level split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in _SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def tokenizer_from_gguf(path: str) -> Any:
    """PreTrainedTokenizerFast from GGUF metadata: byte-level BPE vocab + merges, special tokens, chat template."""
    from transformers import PreTrainedTokenizerFast
    reader = _reader(path)
    model_type = _field(reader, "tokenizer.ggml.model")
    if model_type != "gpt2":
        raise ValueError(f"{path}: tokenizer model {model_type!r} is not supported (byte-level BPE 'gpt2' only); "
                         "load an HF checkpoint directory with its tokenizer.json instead")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    token_types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    alphabet = set(_bytes_to_unicode().values())
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre"))
    tokenizer.decoder = decoders.ByteLevel()
    special_id = lambda key: _field(reader, f"tokenizer.ggml.{key}_token_id")  # noqa: E731
    bos = special_id("bos")
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]}:0 $A:0", pair=f"{tokens[bos]}:0 $A:0 $B:1", special_tokens=[(tokens[bos], bos)])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control tokens (<|im_start|>, ...) must match whole; skip mislabelled ones outside the byte alphabet.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, token_types) if kind == _CONTROL and set(t) <= alphabet])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind in zip(tokens, token_types) if kind == _USER_DEFINED])
    name = lambda key: None if special_id(key) is None else tokens[special_id(key)]  # noqa: E731
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=name("bos"), eos_token=name("eos"), unk_token=name("unknown"),
        pad_token=name("padding"), chat_template=_field(reader, "tokenizer.chat_template"),
        clean_up_tokenization_spaces=False)
