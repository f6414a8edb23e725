"""What a stage's stream carries, as typed values: the events, their usage, and the
non-streaming answer. Parsed leniently: a field this version does not know is kept in
``data`` and otherwise ignored, and an event type it does not know is skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from httpx_sse import ServerSentEvent


@dataclass(frozen=True)
class Usage:
    """Tokens a stage used. ``estimated`` is true when the server counted them itself
    because the upstream did not say (a stage cut short, an upstream without usage)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    estimated: bool = False

    @classmethod
    def parse(cls, value: Any) -> Usage | None:
        if not isinstance(value, dict):
            return None
        prompt, completion, total = (
            value.get(key) for key in ("prompt_tokens", "completion_tokens", "total_tokens")
        )
        if not (isinstance(prompt, int) and isinstance(completion, int) and isinstance(total, int)):
            return None
        return cls(prompt, completion, total, bool(value.get("estimated", False)))


@dataclass(frozen=True, kw_only=True)
class StageEventBase:
    """``id`` is the SSE id (``<stage_id>-<event>-<n>``), ``data`` the event's whole JSON."""

    id: str
    stage_id: str
    data: dict[str, Any] = field(repr=False)


@dataclass(frozen=True, kw_only=True)
class ChunkEvent(StageEventBase):
    """``chat_completion_chunk``: ``chunk`` is the upstream's OpenAI chunk, unchanged."""

    chunk: dict[str, Any]

    @property
    def text(self) -> str:
        """The content this chunk adds (empty for a role-only or final chunk)."""
        parts = []
        for choice in self.chunk.get("choices") or []:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str):
                parts.append(content)
        return "".join(parts)


@dataclass(frozen=True, kw_only=True)
class DoneEvent(StageEventBase):
    """``done``: the stage finished."""

    usage: Usage | None = None


@dataclass(frozen=True, kw_only=True)
class ErrorEvent(StageEventBase):
    """``error``: the stage failed; ``error`` says how, in words a caller can act on."""

    error: str


@dataclass(frozen=True, kw_only=True)
class CancelEvent(StageEventBase):
    """``cancel``: the stage was stopped (``POST /stages/<id>/cancel``, a disconnect of a
    stage that is not resumable, or nobody re-attaching to one that is)."""

    reason: str
    usage: Usage | None = None


@dataclass(frozen=True, kw_only=True)
class ContinuedEvent(StageEventBase):
    """``continued``: the answer was cut short after event ``after`` (``reason``:
    ``upstream_failed``, ``owner_lost``, ``drain``) and goes on from the text delivered,
    asked of ``model`` in ``mode``. The chunks after it carry the new request's ids."""

    after: int
    reason: str
    mode: str
    model: str


StageEvent = ChunkEvent | ContinuedEvent | DoneEvent | ErrorEvent | CancelEvent
TERMINAL_EVENTS = (DoneEvent, ErrorEvent, CancelEvent)


@dataclass(frozen=True)
class TextStageOutput:
    """The answer of ``POST /chat`` without streaming: ``type`` is ``text`` or ``error``."""

    stage_id: str
    type: str
    text: str | None
    error: str | None

    @classmethod
    def parse(cls, value: Any) -> TextStageOutput | None:
        """The output, or None when ``value`` does not have its shape."""
        if not isinstance(value, dict) or value.get("type") not in ("text", "error"):
            return None
        if not isinstance(value.get("stage_id"), str):
            return None
        text, error = value.get("text"), value.get("error")
        return cls(
            value["stage_id"],
            value["type"],
            text if isinstance(text, str) else None,
            error if isinstance(error, str) else None,
        )


def typed_event(sse: ServerSentEvent) -> StageEvent | None:
    """The stage event an SSE event carries; None for one this client does not know.
    ValueError when a known event's data is not a JSON object.

    An event without data is never one: that is a block holding only a comment or a
    ``retry:`` field, which httpx-sse hands over as an empty ``message`` event."""
    if not sse.data or sse.event not in _PARSERS:
        return None
    try:
        data = json.loads(sse.data)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ValueError(
            f"the server sent a {sse.event!r} event ({sse.id or 'no id'}) whose data is not "
            f"a JSON object: {sse.data[:200]!r}"
        )
    common: dict[str, Any] = {"id": sse.id, "stage_id": str(data.get("stage_id", "")), "data": data}
    return _PARSERS[sse.event](common, data)


def _chunk(common: dict[str, Any], data: dict[str, Any]) -> StageEvent:
    chunk = data.get("chunk")
    return ChunkEvent(**common, chunk=chunk if isinstance(chunk, dict) else {})


def _continued(common: dict[str, Any], data: dict[str, Any]) -> StageEvent:
    after = data.get("after")
    return ContinuedEvent(
        **common,
        after=after if isinstance(after, int) else -1,
        reason=str(data.get("reason", "")),
        mode=str(data.get("mode", "")),
        model=str(data.get("model", "")),
    )


def _done(common: dict[str, Any], data: dict[str, Any]) -> StageEvent:
    return DoneEvent(**common, usage=Usage.parse(data.get("usage")))


def _error(common: dict[str, Any], data: dict[str, Any]) -> StageEvent:
    return ErrorEvent(**common, error=str(data.get("error", "")))


def _cancel(common: dict[str, Any], data: dict[str, Any]) -> StageEvent:
    return CancelEvent(
        **common, reason=str(data.get("reason", "")), usage=Usage.parse(data.get("usage"))
    )


_PARSERS = {
    "chat_completion_chunk": _chunk,
    "continued": _continued,
    "done": _done,
    "error": _error,
    "cancel": _cancel,
}
