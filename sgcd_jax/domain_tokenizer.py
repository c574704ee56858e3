"""A small byte-level BPE tokenizer trained on the environment's own text, with SmolLM2's special
tokens and chat template — for the CPU quickstart.

Why: a tiny random-init Decoder on SmolLM2's 49,152-token vocabulary spends >90% of its FLOPs in the
LM head (measured: score + update of 16×1024 tokens ≈ 25 s on 2 cores); with a 1,024-token domain
vocabulary the same step is a few seconds. Byte-level, so any text still round-trips; deterministic
given the corpus, and saved into the run dir so a resumed run uses the identical vocabulary.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def train_domain_tokenizer(texts: Iterable[str], vocab_size: int, template_tokenizer: Any) -> Any:
    """BPE over ``texts`` with ``template_tokenizer``'s pre-tokenizer, specials and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(list(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tokenizer.chat_template = template_tokenizer.chat_template
    return tokenizer


def domain_corpus(env_factory: Any, split: str, renderer_factory: Any) -> list[str]:
    """Rendered oracle conversations + every task's prompt (airline_lite), as the policy sees them."""
    from sgcd_jax.envs.airline_lite import oracle_demos

    renderer = renderer_factory()
    texts = []
    for demo in oracle_demos(env_factory, split):
        texts.append(renderer.render_text(demo["messages"], demo["tools"], add_generation_prompt=False))
    return texts


def load_or_train(run_dir: str, env_factory: Any, split: str, vocab_size: int, template_name: str) -> Any:
    """The run's tokenizer: loaded from ``run_dir/tokenizer`` if saved, else trained and saved."""
    from transformers import PreTrainedTokenizerFast

    from sgcd_jax.models import load_tokenizer
    from sgcd_jax.models.chat import ChatRenderer

    path = os.path.join(run_dir, "tokenizer")
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return PreTrainedTokenizerFast.from_pretrained(path)
    template = load_tokenizer(template_name)
    texts = domain_corpus(env_factory, split, lambda: ChatRenderer(template))
    tokenizer = train_domain_tokenizer(texts, vocab_size, template)
    os.makedirs(path, exist_ok=True)
    tokenizer.save_pretrained(path)
    return tokenizer
