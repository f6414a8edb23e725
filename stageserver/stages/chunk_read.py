"""What an upstream chunk says: ``upstream/chunks.py`` reads it, the stage records it,
and its dialect renders it."""

from __future__ import annotations

from typing import Any, NamedTuple


class ChunkRead(NamedTuple):
    """What an upstream chunk says (``upstream/chunks.py`` reads it), of its choice 0."""

    #: The text it adds to the answer.
    content: str | None = None
    finish_reason: str | None = None
    #: The upstream's usage, where the chunk carries it.
    usage: dict[str, Any] | None = None
    #: The whole delta, as sent (a dialect may render it: role, content, tool calls).
    delta: dict[str, Any] | None = None
    #: Its ``logprobs`` object, as sent (``{"content": [...]}``), when it has one.
    logprobs: dict[str, Any] | None = None
    #: A reasoning model's reasoning text (``reasoning_content``, or vLLM's ``reasoning``).
    reasoning: str | None = None
    #: False when it carries tool calls or reasoning, which a continuation cannot extend.
    continuable: bool = True
