"""The fake upstream's chat template: ChatML, as SmolLM2 (the embedded model) renders it.

Each message is ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; the generation prompt is
``<|im_start|>assistant\\n``. A turn left *open* is a final assistant message without its
``<|im_end|>\\n``: the prompt a server builds to continue a partial answer. llama-server
pops the message, renders the rest with the generation prompt and appends its text raw;
vLLM renders all and cuts after the message's text; Ollama's library templates omit the
last assistant message's end. For ChatML all three give the same string, so one
``render`` serves every probe (``probes.py``), and ``open_turn`` reads it back for the
raw ``/v1/completions`` (``openai.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["GENERATION_PROMPT", "ends_with_assistant", "open_turn", "render"]

GENERATION_PROMPT = "<|im_start|>assistant\n"
_START, _END = "<|im_start|>", "<|im_end|>\n"
_ROLES = ("system", "user", "assistant")


def render(messages: Any, *, open_final: bool = False, generation_prompt: bool = True) -> str:
    """The prompt for ``messages``: every turn closed and, with ``generation_prompt``, the
    generation prompt; with ``open_final`` (the final message must be the assistant's),
    that message's turn left open instead. Messages that are not a list of objects with a
    string ``role`` raise ValueError, for a 400."""
    turns = [_turn(message) for message in _checked(messages)]
    if open_final:
        if not turns or turns[-1][0] != "assistant":
            raise ValueError("an open turn needs a final assistant message")
        role, content = turns.pop()
        return _closed(turns) + f"{_START}{role}\n{content}"
    return _closed(turns) + (GENERATION_PROMPT if generation_prompt else "")


def ends_with_assistant(messages: Any) -> bool:
    """Whether ``messages`` is a list whose final message is the assistant's."""
    if not isinstance(messages, list) or not messages:
        return False
    last = messages[-1]
    return isinstance(last, Mapping) and last.get("role") == "assistant"


def open_turn(prompt: Any) -> str | None:
    """The partial answer of a ChatML prompt that ends in an open assistant turn: each
    earlier turn whole (``<|im_start|>role\\n...<|im_end|>\\n``), the last one open."""
    if not isinstance(prompt, str) or GENERATION_PROMPT not in prompt:
        return None
    turns, _, partial = prompt.rpartition(GENERATION_PROMPT)
    for turn in turns.split(_END)[:-1] if turns else ():
        role = turn.removeprefix(_START).partition("\n")[0]
        if not turn.startswith(_START) or role not in _ROLES:
            return None
    if turns and not turns.endswith(_END):
        return None
    return partial if "<|im_end|>" not in partial else None


def _checked(messages: Any) -> Sequence[Mapping[str, Any]]:
    if not isinstance(messages, list):
        raise ValueError("'messages' must be a list")
    for message in messages:
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ValueError("each message must be an object with a string 'role'")
    return messages


def _turn(message: Mapping[str, Any]) -> tuple[str, str]:
    """A message's role and text: a string content, the text parts of a list, or ""."""
    content = message.get("content")
    if isinstance(content, list):
        parts = (part.get("text") for part in content if isinstance(part, Mapping))
        content = "".join(text for text in parts if isinstance(text, str))
    return str(message["role"]), content if isinstance(content, str) else ""


def _closed(turns: Sequence[tuple[str, str]]) -> str:
    return "".join(f"{_START}{role}\n{content}{_END}" for role, content in turns)
