"""The Messages dialect: a stage as ``POST /v1/messages`` streams it, and its Message.

Every event is one SSE block named by its ``type`` (``event: content_block_delta``), in
Anthropic's order:

- ``message_start``, with the Message as it starts (no content; ``usage.input_tokens``
  the prompt's estimate, corrected at the end);
- for each block, ``content_block_start``, its deltas, ``content_block_stop``: a reasoning
  model's reasoning (``reasoning_content``) is a ``thinking`` block (``thinking_delta``...,
  then one ``signature_delta`` at its end), before the text; the text a ``text`` block
  (``text_delta``...); each tool call a ``tool_use`` block, its arguments
  ``input_json_delta``s as the upstream streams them. A block ends when another starts;
- ``message_delta`` with ``stop_reason`` (``end_turn``, ``max_tokens``, ``stop_sequence``,
  ``tool_use``, ``refusal`` for a content filter) and the usage, then ``message_stop``.

A failure after the stream has started, and a cancel, is an ``error`` event with the
Messages API's error body (``errors.py``): the stream ends there, as Anthropic's does.

Each event carries an ``id:``, ``<message id>-<event type>-<n>``, ``n`` its place in the
stage's log: the Messages API has no resume, and these let a client that lost the
stream resume it with ``GET /stages/<id>/events`` and ``Last-Event-ID``, on any host (as
it resumes a seed stage). Anthropic's SDKs ignore ids (both decoders dispatch on the
event's name). The heartbeat is a ``ping`` event without an id (``PING``), as
Anthropic's SDKs expect one and skip it.

A thinking block's ``signature`` is a digest of its text, there because the SDKs and
clients expect one: nothing checks it, here or anywhere (an Anthropic signature cannot
be made by anyone but Anthropic), and one sent back is dropped with its block.

An answer continued after a failure is one answer: the same Message, its text block
going on.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..sse import compact_json, encode_event
from ..stages.chunk_read import ChunkRead
from ..stages.dialect import Ending
from ..stages.records import ContinuationRecord
from .errors import CANCELLED, OVERLOADED, error_body, status_of

#: The heartbeat of a Messages stream: Anthropic's SDKs skip ``ping`` events.
PING = encode_event("ping", b'{"type":"ping"}')
#: Finish reasons of Chat Completions, as Anthropic's stop reasons.
STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


class _Block:
    """One content block of the Message: its ``index``, its ``kind`` (``text``,
    ``thinking``, ``tool_use``) and what it holds so far."""

    __slots__ = ("index", "kind", "head", "start", "end", "parts", "call_id", "name")

    def __init__(self, index: int, kind: str, head: bytes) -> None:
        self.index = index
        self.kind = kind
        #: The JSON of its delta events, up to the delta's value.
        self.head = head
        #: A text block: where its text starts and ends in the stage's text.
        self.start = self.end = 0
        #: A thinking block's text, a tool call's arguments, as they came.
        self.parts: list[str] = []
        self.call_id = ""
        self.name = ""


class MessagesDialect:
    name = "messages"

    def __init__(
        self,
        stage_id: str,
        model: str,
        *,
        input_tokens: int,
        stop_sequences: Sequence[str] = (),
        params: Mapping[str, str] | None = None,
        omit_thinking: bool = False,
    ) -> None:
        """``input_tokens``: the prompt's estimate, for ``message_start``;
        ``stop_sequences``: the request's, to tell which one stopped the answer;
        ``params``: what the upstream's names of the request's fields stand for in the
        request (``requests.MessagesRequest.params``), for an upstream's error that
        names one; ``omit_thinking``: thinking blocks are shown empty (``display:
        omitted``)."""
        self.stage_id = stage_id
        self.model = model
        self.input_tokens = input_tokens
        self.stop_sequences = tuple(stop_sequences)
        self.params = dict(params or {})
        self.omit_thinking = omit_thinking
        self._ids = f"{stage_id}-"
        self._blocks: list[_Block] = []
        self._open: _Block | None = None
        self._calls: dict[int, _Block] = {}  # the tool calls' blocks, by the upstream's index
        self._text_length = 0  # the characters of text so far, where text blocks start
        self._stop_sequence: str | None = None

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "stage_id": self.stage_id,
            "model": self.model,
            "input_tokens": self.input_tokens,
            "stop_sequences": list(self.stop_sequences),
            "params": self.params,
            "omit_thinking": self.omit_thinking,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> MessagesDialect:
        return cls(
            str(record["stage_id"]),
            str(record["model"]),
            input_tokens=int(record["input_tokens"]),
            stop_sequences=record["stop_sequences"],
            params=record["params"],
            omit_thinking=bool(record["omit_thinking"]),
        )

    # -- events ---------------------------------------------------------------------------

    def _event(self, seq: int, kind: str, data: bytes) -> bytes:
        return encode_event(kind, data, f"{self._ids}{kind}-{seq}")

    def opening(self, seq: int) -> list[bytes]:
        message: dict[str, Any] = {
            "id": self.stage_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": 0},
        }
        data = compact_json({"type": "message_start", "message": message})
        return [self._event(seq, "message_start", data)]

    def chunk(self, seq: int, payload: bytes, read: ChunkRead) -> list[bytes]:
        events: list[bytes] = []
        if read.reasoning:
            events += self._thinking(seq, read.reasoning)
        if read.content:
            events += self._text(seq + len(events), read.content)
        calls = read.delta.get("tool_calls") if read.delta is not None else None
        if isinstance(calls, list):
            for call in calls:
                if isinstance(call, Mapping):
                    events += self._call(seq + len(events), call)
        if read.finish_reason == "stop" and self.stop_sequences:
            self._stop_sequence = stop_sequence_of(payload, self.stop_sequences)
        return events

    def continued(self, seq: int, record: ContinuationRecord) -> list[bytes]:
        return []

    def resume(self, text: str) -> None:
        """Continuations are made for text answers only: what the log holds is the
        opening, then one text block, open, with ``text``."""
        if not text:
            return
        block = self._start(0, "text", b'"text_delta","text":')[1]
        self._text_length = block.end = len(text)

    def _start(self, seq: int, kind: str, head: bytes, **content: Any) -> tuple[bytes, _Block]:
        """A new block, open, and its ``content_block_start`` event."""
        index = len(self._blocks)
        delta_head = b'{"type":"content_block_delta","index":%d,"delta":{"type":%s' % (
            index,
            head,
        )
        block = _Block(index, kind, delta_head)
        self._blocks.append(block)
        self._open = block
        started = {"type": "content_block_start", "index": index, "content_block": content}
        return self._event(seq, "content_block_start", compact_json(started)), block

    def _text(self, seq: int, text: str) -> list[bytes]:
        block = self._open
        events = []
        if block is None or block.kind != "text":
            events = self._close(seq)
            start, block = self._start(
                seq + len(events), "text", b'"text_delta","text":', type="text", text=""
            )
            block.start = block.end = self._text_length
            events.append(start)
        self._text_length += len(text)
        block.end = self._text_length
        data = block.head + compact_json(text) + b"}}"
        events.append(self._event(seq + len(events), "content_block_delta", data))
        return events

    def _thinking(self, seq: int, text: str) -> list[bytes]:
        block = self._open
        events = []
        if block is None or block.kind != "thinking":
            events = self._close(seq)
            start, block = self._start(
                seq + len(events),
                "thinking",
                b'"thinking_delta","thinking":',
                type="thinking",
                thinking="",
                signature="",
            )
            events.append(start)
        block.parts.append(text)
        if not self.omit_thinking:
            data = block.head + compact_json(text) + b"}}"
            events.append(self._event(seq + len(events), "content_block_delta", data))
        return events

    def _call(self, seq: int, call: Mapping[str, Any]) -> list[bytes]:
        index = call.get("index", 0)
        if not isinstance(index, int):
            return []
        function = call.get("function")
        function = function if isinstance(function, Mapping) else {}
        events = []
        block = self._calls.get(index)
        if block is None:
            events = self._close(seq)
            given, named = call.get("id"), function.get("name")
            call_id = f"toolu_{self.stage_id}_{index}"
            if isinstance(given, str) and given:
                call_id = given
            name = named if isinstance(named, str) else ""
            start, block = self._start(
                seq + len(events),
                "tool_use",
                b'"input_json_delta","partial_json":',
                type="tool_use",
                id=call_id,
                name=name,
                input={},
            )
            block.call_id, block.name = call_id, name
            self._calls[index] = block
            events.append(start)
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            block.parts.append(arguments)
            data = block.head + compact_json(arguments) + b"}}"
            events.append(self._event(seq + len(events), "content_block_delta", data))
        return events

    def _close(self, seq: int) -> list[bytes]:
        """The events that end the open block, if one is open."""
        block, self._open = self._open, None
        if block is None:
            return []
        events = []
        if block.kind == "thinking":
            signature = {"type": "signature_delta", "signature": signature_of(block.parts)}
            delta = {"type": "content_block_delta", "index": block.index, "delta": signature}
            events.append(self._event(seq, "content_block_delta", compact_json(delta)))
        stop = b'{"type":"content_block_stop","index":%d}' % block.index
        events.append(self._event(seq + len(events), "content_block_stop", stop))
        return events

    def ending(self, seq: int, ending: Ending) -> list[bytes]:
        if ending.status != "done":
            _, body = self._error(ending)
            return [self._event(seq, "error", compact_json(body))]
        events = self._close(seq)
        delta = {
            "type": "message_delta",
            "delta": {
                "stop_reason": self._stop_reason(ending.finish_reason),
                "stop_sequence": self._stop_sequence,
            },
            "usage": message_usage(ending.usage),
        }
        events.append(self._event(seq + len(events), "message_delta", compact_json(delta)))
        stop = b'{"type":"message_stop"}'
        events.append(self._event(seq + len(events), "message_stop", stop))
        return events

    def _stop_reason(self, finish_reason: str | None) -> str:
        if finish_reason == "length":
            return "max_tokens"
        if self._stop_sequence is not None:
            return "stop_sequence"
        if self._calls:
            return "tool_use"  # whatever the upstream called its finish
        return STOP_REASONS.get(finish_reason or "stop", "end_turn")

    # -- the whole answer ------------------------------------------------------------------

    def answer(self, ending: Ending) -> tuple[dict[str, Any], int]:
        if ending.status != "done":
            status, body = self._error(ending)
            return body, status
        return {
            "id": self.stage_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [self._content(block, ending.text) for block in self._blocks],
            "stop_reason": self._stop_reason(ending.finish_reason),
            "stop_sequence": self._stop_sequence,
            "usage": message_usage(ending.usage),
        }, 200

    def _content(self, block: _Block, text: str) -> dict[str, Any]:
        if block.kind == "text":
            return {"type": "text", "text": text[block.start : block.end]}
        if block.kind == "thinking":
            thinking = "" if self.omit_thinking else "".join(block.parts)
            signature = signature_of(block.parts)
            return {"type": "thinking", "thinking": thinking, "signature": signature}
        return {"type": "tool_use", "id": block.call_id, "name": block.name, "input": _input(block)}

    def _error(self, ending: Ending) -> tuple[int, dict[str, Any]]:
        """The status of a stage that ended so, and the Messages API's error body."""
        if ending.status == "cancelled":
            return CANCELLED, error_body(CANCELLED, f"cancelled: {ending.reason}")
        failure = ending.failure
        message = ending.error or "the message failed"
        if failure is None:
            return 502, error_body(502, message)
        if failure.refused_request:
            param = self._param(failure.field)
            return 400, error_body(400, f"{param}: {message}" if param else message)
        if failure.outcome == "http_429":  # the upstream is busy: so is this server
            return OVERLOADED, error_body(OVERLOADED, message)
        status = status_of(failure.http_status)
        return status, error_body(status, message)

    def _param(self, upstream_param: str | None) -> str | None:
        """The request's field that the upstream's name (``messages[2].content``,
        ``reasoning_effort``) stands for."""
        if upstream_param is None:
            return None
        if upstream_param.startswith("messages["):
            return self.params.get(upstream_param.partition("]")[0] + "]")
        return self.params.get(re.split(r"[.\[]", upstream_param, maxsplit=1)[0])


def message_usage(usage: Mapping[str, Any]) -> dict[str, Any]:
    """A stage's usage as the Messages API reports it: the tokens read from the
    upstream's prompt cache (its ``cached_tokens``) apart from the input tokens, as
    Anthropic counts them; the thinking tokens (its ``reasoning_tokens``) where it gave
    them."""
    prompt = int(usage.get("prompt_tokens", 0))
    cached = _detail(usage, "prompt_tokens_details", "cached_tokens")
    reported: dict[str, Any] = {
        "input_tokens": prompt - cached,
        "output_tokens": int(usage.get("completion_tokens", 0)),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }
    thinking = _detail(usage, "completion_tokens_details", "reasoning_tokens")
    if thinking:
        reported["output_tokens_details"] = {"thinking_tokens": thinking}
    return reported


def _detail(usage: Mapping[str, Any], details: str, name: str) -> int:
    found = usage.get(details)
    value = found.get(name) if isinstance(found, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _input(block: _Block) -> dict[str, Any]:
    """A tool call's input: its arguments, parsed; ``{}`` for none, or for arguments that
    are not a JSON object (the stream gave them as they came)."""
    try:
        found = json.loads("".join(block.parts) or "{}")
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def signature_of(parts: Sequence[str]) -> str:
    """A thinking block's signature: the SHA-256 of its text, in base64. Nothing checks it."""
    return base64.b64encode(hashlib.sha256("".join(parts).encode()).digest()).decode()


def stop_sequence_of(payload: bytes, stop_sequences: Sequence[str]) -> str | None:
    """Which of ``stop_sequences`` stopped the answer, where the upstream's last chunk
    says (vLLM's ``stop_reason``); None where it does not."""
    try:
        chunk = json.loads(payload)
    except ValueError:
        return None
    for choice in chunk.get("choices") or () if isinstance(chunk, dict) else ():
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            reason = choice.get("stop_reason")
            if isinstance(reason, str) and reason in stop_sequences:
                return reason
    return None


def lost(stage_id: str, message: str) -> bytes:
    """The id-less ``error`` that ends one response which cannot follow its stage further."""
    return encode_event("error", compact_json(error_body(500, message)))
