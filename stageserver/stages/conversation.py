"""What a stage asks its upstream for: a conversation, and how to sample its answer.

Every dialect's request becomes one: the seed's ``system_prompt`` and ``user_prompt``
(two messages), a Chat Completions request (its messages as given), a Responses request
(its ``instructions`` and ``input`` items, after the conversation of its
``previous_response_id``). The messages are OpenAI chat messages, as an upstream takes
them: roles ``system``, ``developer``, ``user``, ``assistant`` and ``tool``; content a
string or text parts; an assistant's ``tool_calls`` and a tool's ``tool_call_id``.

Each upstream kind keeps its quirks: ``upstream/request_body.py`` builds the body of each
attempt from the conversation and the replica it goes to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: The sampling fields a conversation may carry, as Chat Completions names them.
SAMPLING_FIELDS = (
    "temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty",
)  # fmt: skip


@dataclass(frozen=True)
class Conversation:
    messages: Sequence[Mapping[str, Any]]
    #: The model the request named (an upstream may serve it under another name).
    model: str
    #: The most tokens the answer may have; None: ``STAGESERVER_DEFAULT_MAX_TOKENS``.
    max_tokens: int | None = None
    #: Given sampling fields only (``SAMPLING_FIELDS``), as the request gave them.
    sampling: Mapping[str, Any] = field(default_factory=dict)
    #: Function tools, ``tool_choice``, ``parallel_tool_calls`` and ``response_format``,
    #: in Chat Completions' shape; each None when the request did not give it.
    tools: Sequence[Mapping[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: Mapping[str, Any] | None = None

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
        sampling = {} if temperature is None else {"temperature": temperature}
        return cls(messages, model, max_tokens, sampling)

    def request_fields(self) -> dict[str, Any]:
        """The fields beside ``model``, ``messages`` and the token limit that every
        upstream request of this conversation carries."""
        fields = dict(self.sampling)
        for name in ("tools", "tool_choice", "parallel_tool_calls", "response_format"):
            value = getattr(self, name)
            if value is not None:
                fields[name] = value
        return fields


def message_text(message: Mapping[str, Any]) -> str:
    """The text of a message: its string content, or its text parts joined."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    return ""


def conversation_record(conversation: Conversation) -> dict[str, Any]:
    """The conversation as JSON, for the shared store; ``conversation_of`` reads it back."""
    return {
        "messages": list(conversation.messages),
        "model": conversation.model,
        "max_tokens": conversation.max_tokens,
        "sampling": dict(conversation.sampling),
        "tools": None if conversation.tools is None else list(conversation.tools),
        "tool_choice": conversation.tool_choice,
        "parallel_tool_calls": conversation.parallel_tool_calls,
        "response_format": conversation.response_format,
    }


def conversation_of(record: Mapping[str, Any]) -> Conversation:
    return Conversation(**record)
