"""What a stage asks its upstream for: a conversation, and how to sample its answer.

Every dialect's request becomes one: the seed's ``system_prompt`` and ``user_prompt``
(two messages), a Chat Completions request (its messages as given), a Responses request
(its ``instructions`` and ``input`` items, after the conversation of its
``previous_response_id``). The messages are OpenAI chat messages, as an upstream takes
them: roles ``system``, ``developer``, ``user``, ``assistant`` and ``tool``; content a
string or content parts; an assistant's ``tool_calls`` and a tool's ``tool_call_id``.

Each upstream kind keeps its quirks: ``upstream/request_body.py`` builds the body of each
attempt from the conversation and the replica it goes to. Content parts other than text
(images, audio) go to the upstream as given; only text counts where stageserver reads a
message (``message_text``: the prompt's estimate, a continuation's prefix).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Conversation:
    messages: Sequence[Mapping[str, Any]]
    #: The model the request named (an upstream may serve it under another name).
    model: str
    #: The most tokens the answer may have; None: ``STAGESERVER_DEFAULT_MAX_TOKENS``.
    max_tokens: int | None = None
    #: The fields of OpenAI's Chat Completions request that every upstream request of
    #: this conversation carries, as given: sampling (``temperature``, ``seed``, ...),
    #: ``logprobs``, ``reasoning_effort``, tools, ``response_format`` (the dialects decide
    #: which: ``openai_api/fields.py``).
    passed: Mapping[str, Any] = field(default_factory=dict)
    #: Fields beyond OpenAI's API (vLLM's ``top_k``, llama.cpp's ``grammar``), sent only
    #: to an upstream whose ``extra_fields`` takes them.
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: Fields beyond OpenAI's API that a dialect adds where they mean what the request
    #: asked (the Messages API's ``thinking`` as Qwen3's ``chat_template_kwargs``): sent
    #: to an upstream whose ``extra_fields`` takes them, left out elsewhere, never refused.
    #: A field of ``extra`` with the same name wins; two objects are merged, ``extra``'s
    #: keys over these.
    hints: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of_prompts(
        cls,
        model: str,
        user_prompt: str,
        system_prompt: str = "",
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> Conversation:
        """The seed's request: a user prompt, after a system prompt if there is one."""
        messages: list[Mapping[str, Any]] = [{"role": "user", "content": user_prompt}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        passed = {} if temperature is None else {"temperature": temperature}
        return cls(messages, model, max_tokens, passed)


def message_text(message: Mapping[str, Any]) -> str:
    """The text of a message: its string content, or its text parts joined."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    return ""


def conversation_record(conversation: Conversation) -> dict[str, Any]:
    """The conversation as JSON, for the shared store; ``conversation_of`` reads it back.
    ``hints`` only when it has some: a worker from before them reads every other record."""
    record = {
        "messages": list(conversation.messages),
        "model": conversation.model,
        "max_tokens": conversation.max_tokens,
        "passed": dict(conversation.passed),
        "extra": dict(conversation.extra),
    }
    if conversation.hints:
        record["hints"] = dict(conversation.hints)
    return record


def conversation_of(record: Mapping[str, Any]) -> Conversation:
    return Conversation(**record)
