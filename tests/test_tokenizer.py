"""Our GGUF-metadata tokenizer (no torch) vs transformers' own GGUF tokenizer on varied text + chat template."""

import os

import pytest

from sgcd_jax.models import load_tokenizer
from sgcd_jax.models.loading import resolve_model_path

TEXTS = [
    "Hello world!",
    "In 2024, 3.14159 × 12 = 37.7 apples; call 555-0134.",
    "  leading spaces\n\n\tand tabs   trailing  ",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "émigré naïve café — 東京 Привет 🙂🚀",
    "def f(x):\n    return x**2  # comment\n",
    '<tool_call>\n{"name": "get_user_details", "arguments": {"user_id": "mia_li_3668"}}\n</tool_call>',
    "I'm sure you'll see they've DONE it, haven't they?",
]


@pytest.fixture(scope="module")
def tokenizers():
    from transformers import AutoTokenizer
    path = resolve_model_path("smollm2-135m-instruct")
    ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return load_tokenizer("smollm2-135m-instruct"), ref


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_transformers_gguf_tokenizer(tokenizers, text):
    ours, ref = tokenizers
    assert ours(text)["input_ids"] == ref(text)["input_ids"]
    assert ours.decode(ours(text)["input_ids"]) == text


def test_chat_template_ids_equal_transformers(tokenizers):
    ours, ref = tokenizers
    messages = [{"role": "system", "content": "You are an airline agent."},
                {"role": "user", "content": "Change my flight HAT123 to 2024-05-17, please."},
                {"role": "assistant", "content": "Sure, what is your user id?"},
                {"role": "user", "content": "mia_li_3668"}]
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ours.apply_chat_template(messages, **kwargs) == ref.apply_chat_template(messages, **kwargs)


def test_special_tokens_are_single_ids(tokenizers):
    ours, _ = tokenizers
    assert ours.eos_token == "<|im_end|>" and ours.eos_token_id == 2
    assert ours("<|im_start|>")["input_ids"] == [1]
