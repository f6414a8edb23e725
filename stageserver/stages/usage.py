"""A stage's token usage: the upstream's own count, else an estimate that says so.

Every finished stage has usage, ``{"prompt_tokens", "completion_tokens",
"total_tokens"}``. It is the upstream's usage chunk (asked for with
``stream_options.include_usage``) when the upstream sent one. When it did not (an
upstream that ignores the option, as llama-cpp-python's server does, or a stage
cancelled before the upstream's last chunk), it is estimated and carries
``"estimated": true``:

- prompt tokens: the characters of the messages divided by 4 (about a token per four
  characters of English), rounded up, plus 4 per message for the chat template's markers;
- completion tokens: the chunks that carried content so far. Streaming servers send one
  token per chunk (llama.cpp, vLLM, Ollama); a server that batches tokens is undercounted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from .conversation import message_text

_CHARS_PER_TOKEN = 4
_TOKENS_PER_MESSAGE = 4


def estimate_prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """The prompt's tokens, estimated from its characters: the text of each message, and
    the arguments of an assistant's tool calls."""
    chars = [
        len(message_text(m)) + (len(json.dumps(m["tool_calls"])) if m.get("tool_calls") else 0)
        for m in messages
    ]
    return sum(-(-n // _CHARS_PER_TOKEN) + _TOKENS_PER_MESSAGE for n in chars)


def final_usage(
    reported: dict[str, Any] | None, prompt_estimate: int, content_chunks: int
) -> dict[str, Any]:
    """The usage a finished stage reports."""
    if reported is not None:
        prompt, completion = reported.get("prompt_tokens"), reported.get("completion_tokens")
        if isinstance(prompt, int) and isinstance(completion, int):
            if isinstance(reported.get("total_tokens"), int):
                return reported
            return {**reported, "total_tokens": prompt + completion}
    return {
        "prompt_tokens": prompt_estimate,
        "completion_tokens": content_chunks,
        "total_tokens": prompt_estimate + content_chunks,
        "estimated": True,
    }


def sum_usage(earlier: dict[str, Any] | None, segment: dict[str, Any]) -> dict[str, Any]:
    """The usage of an answer continued after ``earlier`` (None: it was not): the
    segments' counts summed, estimated if any of them was."""
    if earlier is None:
        return segment
    summed: dict[str, Any] = {
        name: int(earlier.get(name, 0)) + int(segment.get(name, 0))
        for name in ("prompt_tokens", "completion_tokens", "total_tokens")
    }
    if earlier.get("estimated") or segment.get("estimated"):
        summed["estimated"] = True
    return summed
