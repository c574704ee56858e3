"""Chat rendering for multi-turn tool use: prompt ids, continuation ids, end-of-turn tokens.

Templates that render `tools=` themselves (Qwen2.5, Qwen3, Llama 3.1) are used as they are ("native").
Templates without tool support (SmolLM2's) get the hermes format, applied to the messages before the
template runs:
  * the tool JSON schemas are listed in the system prompt inside <tools></tools>, with the instruction to
    answer a call as  <tool_call>{"name": ..., "arguments": {...}}</tool_call>;
  * an assistant message's `tool_calls` are written into its content in that form (unless already there);
  * consecutive `tool` messages become one user turn of <tool_response>...</tool_response> blocks.
Multi-turn rollouts append `continuation_ids(...)` after the generated assistant ids, which by construction
gives the same ids as re-rendering the whole conversation (the template's end-of-turn token is special, so
tokenisation restarts after it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

HERMES_TOOLS_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n"
    "</tool_call>")
_PROBE = "\u2063probe-assistant-text\u2063"
_STOP_TOKEN_CANDIDATES = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end|>", "<end_of_turn>")


def format_tool_call(name: str, arguments: dict[str, Any]) -> str:
    """One hermes tool call as the assistant should emit it."""
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n</tool_call>"


def _tool_call_parts(call: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    function = call.get("function", call)  # OpenAI/HF form {"type": "function", "function": {...}} or flat
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    return function["name"], arguments


def template_supports_tools(tokenizer: Any) -> bool:
    template = tokenizer.chat_template or ""
    return "tools" in (template if isinstance(template, str) else json.dumps(template))


def to_hermes_messages(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None
                       ) -> list[dict[str, Any]]:
    """Rewrite tool-use messages into plain system/user/assistant messages in the hermes format."""
    out: list[dict[str, Any]] = []
    messages = list(messages)
    if tools:
        listing = HERMES_TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": f"{messages[0]['content']}\n\n{listing}"})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": listing})
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls") and "<tool_call>" not in content:
            calls = "\n".join(format_tool_call(*_tool_call_parts(c)) for c in message["tool_calls"])
            out.append({"role": "assistant", "content": f"{content}\n{calls}" if content else calls})
        elif role == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("_tool_turn"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_turn": True})
        else:
            out.append({"role": role, "content": content})
    return [{k: v for k, v in m.items() if k != "_tool_turn"} for m in out]


class ChatRenderer:
    """Renders conversations for one tokenizer; tool_format 'auto' picks native when the template has tools."""

    def __init__(self, tokenizer: Any, tool_format: str = "auto"):
        if tool_format not in ("auto", "native", "hermes"):
            raise ValueError(f"tool_format must be 'auto', 'native' or 'hermes', got {tool_format!r}")
        if not tokenizer.chat_template:
            raise ValueError("tokenizer has no chat_template; load one from a model that has it, or set "
                             "tokenizer.chat_template to a jinja template")
        self.tokenizer = tokenizer
        self.native_tools = template_supports_tools(tokenizer) if tool_format == "auto" else tool_format == "native"
        self.end_of_turn_text, self.end_of_turn_id = self._detect_end_of_turn()

    def _prepare(self, messages, tools):
        if self.native_tools:
            return list(messages), (list(tools) if tools else None)
        return to_hermes_messages(messages, tools), None

    def render_text(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None,
                    add_generation_prompt: bool = False) -> str:
        messages, tools = self._prepare(messages, tools)
        return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        """Template text → ids; special tokens in the text are matched whole, nothing is added."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None,
                   add_generation_prompt: bool = True) -> list[int]:
        """The ids the policy sees before its first assistant turn."""
        return self.encode(self.render_text(messages, tools, add_generation_prompt))

    def continuation_ids(self, messages: Sequence[dict[str, Any]], new_messages: Sequence[dict[str, Any]],
                         tools: Sequence[dict[str, Any]] | None = None, add_generation_prompt: bool = True,
                         generated_ended_with_end_of_turn: bool = True) -> list[int]:
        """Ids to append after the generated assistant turn (the last message of `messages`) for new_messages.

        If generation stopped without the template's end-of-turn token (max tokens, another stop id), pass
        generated_ended_with_end_of_turn=False and the end-of-turn id is prepended.
        """
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("continuation_ids needs messages ending with the generated assistant message")
        before = self.render_text(messages, tools, add_generation_prompt=False)
        after = self.render_text(list(messages) + list(new_messages), tools, add_generation_prompt)
        cut = before.rfind(self.end_of_turn_text)
        if cut < 0 or not after.startswith(before[: cut + len(self.end_of_turn_text)]):
            raise ValueError("the chat template re-renders earlier turns differently once new messages follow, so "
                             "appending is not equal to a re-render; render the full conversation instead")
        ids = self.encode(after[cut + len(self.end_of_turn_text):])
        return ids if generated_ended_with_end_of_turn else [self.end_of_turn_id] + ids

    def stop_token_ids(self) -> tuple[int, ...]:
        """Ids that end an assistant turn during sampling: the template's end-of-turn plus eos-like specials."""
        ids = [self.end_of_turn_id]
        vocab = self.tokenizer.get_vocab()
        eos = self.tokenizer.eos_token_id
        ids += [eos] if isinstance(eos, int) else list(eos or [])
        ids += [vocab[t] for t in _STOP_TOKEN_CANDIDATES if t in vocab]
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    def _detect_end_of_turn(self) -> tuple[str, int]:
        # Render a probe assistant turn; the first token after its text is the template's end-of-turn.
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
        text = self.tokenizer.apply_chat_template(probe, tokenize=False)
        tail = text[text.rfind(_PROBE) + len(_PROBE):]
        tail_ids = self.encode(tail)
        if not tail_ids:
            raise ValueError("the chat template puts nothing after an assistant message; cannot find its "
                             "end-of-turn token")
        eot_id = tail_ids[0]
        return self.tokenizer.convert_ids_to_tokens(eot_id), eot_id
