"""The one Server-Sent Events encoder: what goes on the wire, byte for byte.

An event is ``id:``, then ``event:``, then one ``data:`` line per line of data, then a blank
line. ``id`` and ``event`` may not contain a line break: a caller-chosen value with one
would let that caller write events of its own into the stream. A comment (``: text``) is
ignored by clients; stageserver sends one as a heartbeat. A ``retry:`` field alone sets
how long a client waits before it reconnects, and dispatches no event.
"""

from __future__ import annotations

import json
from typing import Any


def encode_event(event: str, data: bytes, event_id: str | None = None) -> bytes:
    # Called once per relayed chunk: plain `in` tests, one join.
    if "\n" in event or "\r" in event:
        raise ValueError(f"SSE event may not contain a line break: {event!r}")
    if event_id:
        if "\n" in event_id or "\r" in event_id:
            raise ValueError(f"SSE id may not contain a line break: {event_id!r}")
        head = f"id: {event_id}\nevent: {event}\ndata: ".encode()
    else:
        head = f"event: {event}\ndata: ".encode()
    if b"\n" in data or b"\r" in data:
        lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        data = b"\ndata: ".join(lines)
    return b"".join((head, data, b"\n\n"))


def encode_comment(text: str) -> bytes:
    return b"".join(b": " + line.encode() + b"\n" for line in text.splitlines() or [""]) + b"\n"


HEARTBEAT = encode_comment("heartbeat")


def encode_retry(milliseconds: int) -> bytes:
    """The ``retry:`` field alone: a client's reconnection delay, no event."""
    return b"retry: %d\n\n" % milliseconds


def compact_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
