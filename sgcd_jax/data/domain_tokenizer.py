"""A small byte-level BPE tokenizer trained on the environment's own text, with SmolLM2's special
tokens and chat template — for the CPU quickstart.

Why: a tiny random-init Decoder on SmolLM2's 49,152-token vocabulary spends >90% of its FLOPs in the
LM head (measured: score + update of 16×1024 tokens ≈ 25 s on 2 cores); with a 1,024-token domain
vocabulary the same step is a few seconds. Byte-level, so any text still round-trips; deterministic
given the corpus, and saved into the run dir so a resumed run uses the identical vocabulary.

Two choices that the quickstart's success depends on (measured, see configs/quickstart.py):
  * whitespace is its own token (pre-tokenizer), so an id or word has the same token ids wherever it
    appears: in the user's request (``flight HAT192``), in JSON arguments (``"HAT192"``) and in a tool
    response. GPT-2-style pre-tokenisation glues the leading space onto the word (``ĠHAT`` vs ``HAT``), so
    copying an id from the request into a tool call was a token *translation* the tiny model never
    learned: after SFT it wrote well-formed calls with memorised ids and scored 0.
  * every long line that recurs verbatim in all system prompts (the env's rules, the hermes tool
    instructions, the tool schemas) is one added token, so the ~450-token boilerplate prefix becomes ~15
    tokens; rollouts, scoring and SFT are several times shorter.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def train_domain_tokenizer(texts: Iterable[str], vocab_size: int, template_tokenizer: Any,
                           boilerplate: Sequence[str] = ()) -> Any:
    """Byte-level BPE over ``texts`` (digits and whitespace split off), SmolLM2-style specials and
    ``template_tokenizer``'s chat template; each ``boilerplate`` string becomes one added token."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\s"), behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(list(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tokenizer.chat_template = template_tokenizer.chat_template
    if boilerplate:
        # longest first, ties by text: a set's order changes with PYTHONHASHSEED, and equal-length lines
        # ("step 0 helpful", "step 1 helpful") then got other ids in every process (another vocabulary)
        tokenizer.add_tokens([AddedToken(line, normalized=False, special=False)
                              for line in sorted(set(boilerplate), key=lambda s: (-len(s), s))])
    return tokenizer


def boilerplate_lines(system_texts: Sequence[str], min_chars: int = 16) -> list[str]:
    """Lines of at least ``min_chars`` characters present in every one of ``system_texts``, in order,
    without special tokens (an added token must never swallow an end-of-turn)."""
    if not system_texts:
        return []
    common = set(system_texts[0].split("\n"))
    for text in system_texts[1:]:
        common &= set(text.split("\n"))
    return [line for line in dict.fromkeys(system_texts[0].split("\n"))
            if line in common and len(line) >= min_chars and not any(t in line for t in SPECIAL_TOKENS)]


def domain_corpus(env_factory: Any, split: str, renderer_factory: Any) -> tuple[list[str], list[str]]:
    """(rendered oracle conversations of every ``split`` task as the policy sees them, their rendered
    system prompts) — airline_lite."""
    from sgcd_jax.envs.airline_lite import oracle_demos

    renderer = renderer_factory()
    texts, systems = [], []
    for demo in oracle_demos(env_factory, split):
        texts.append(renderer.render_text(demo["messages"], demo["tools"], add_generation_prompt=False))
        systems.append(renderer.render_text(demo["messages"][:1], demo["tools"], add_generation_prompt=False))
    return texts, systems


def load_or_train(run_dir: str, env_factory: Any, split: str, vocab_size: int, template_name: str) -> Any:
    """The run's tokenizer: loaded from ``run_dir/tokenizer`` if saved, else trained and saved."""
    from transformers import PreTrainedTokenizerFast

    from sgcd_jax.credit.teacher import compact_reference_vocabulary
    from sgcd_jax.models import load_tokenizer
    from sgcd_jax.models.chat import ChatRenderer

    path = os.path.join(run_dir, "tokenizer")
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return PreTrainedTokenizerFast.from_pretrained(path)
    template = load_tokenizer(template_name)
    texts, systems = domain_corpus(env_factory, split, lambda: ChatRenderer(template))
    # one token per compact credit-reference line (credit/teacher.py): a reference costs a token per step
    tokenizer = train_domain_tokenizer(texts, vocab_size, template,
                                       boilerplate_lines(systems) + compact_reference_vocabulary())
    os.makedirs(path, exist_ok=True)
    tokenizer.save_pretrained(path)
    return tokenizer
