"""The one Server-Sent Events encoder: what goes on the wire, byte for byte.

An event is ``id:``, then ``event:``, then one ``data:`` line per line of data, then a blank
line. ``id`` and ``event`` may not contain a line break: a caller-chosen value with one
would let that caller write events of its own into the stream. A comment (``: text``) is
ignored by clients; stageserver sends one as a heartbeat.
"""

from __future__ import annotations

import json
from typing import Any

_LINE_BREAKS = ("\r", "\n")


def encode_event(event: str, data: bytes, event_id: str | None = None) -> bytes:
    for name, value in (("event", event), ("id", event_id or "")):
        if any(brk in value for brk in _LINE_BREAKS):
            raise ValueError(f"SSE {name} may not contain a line break: {value!r}")
    head = f"id: {event_id}\nevent: {event}\n" if event_id else f"event: {event}\n"
    if b"\n" in data or b"\r" in data:
        lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        body = b"".join(b"data: " + line + b"\n" for line in lines)
    else:
        body = b"data: " + data + b"\n"
    return head.encode() + body + b"\n"


def encode_comment(text: str) -> bytes:
    return b"".join(b": " + line.encode() + b"\n" for line in text.splitlines() or [""]) + b"\n"


def compact_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
