"""The one Server-Sent Events encoder: what goes on the wire, byte for byte.

An event is ``id:``, then ``event:``, then one ``data:`` line per line of data, then a blank
line. ``id`` and ``event`` may not contain a line break: a caller-chosen value with one
would let that caller write events of its own into the stream.

Two kinds of line end no block, so that they join the block of the next event:

- the heartbeat, a comment line (``: heartbeat``), which every client ignores;
- the ``retry:`` line a stream starts with (how long a client waits to reconnect).

A blank line after either would make a block of its own, and common clients dispatch
such a block as an event with empty data: ``httpx-sse`` (and so ``stageserver.client``)
and the ``openai`` SDK's decoder do for a lone ``retry:`` block, and for any block once
an ``id:`` has been seen; ``json.loads("")`` then fails. A stream never sends one.
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
    """Comment lines that end no block: they join the next event's, and dispatch nothing."""
    return b"".join(b": " + line.encode() + b"\n" for line in text.splitlines() or [""])


HEARTBEAT = encode_comment("heartbeat")


def encode_retry(milliseconds: int) -> bytes:
    """The ``retry:`` line: a client's reconnection delay. It ends no block: it joins the
    block of the first event, and dispatches nothing of its own."""
    return b"retry: %d\n" % milliseconds


def compact_json(value: Any) -> bytes:
    """``value`` as JSON, with no spaces, in UTF-8. A string with a lone surrogate (an
    upstream may escape one, ``"\\ud800"``) cannot be UTF-8: such a value is written with
    JSON's escapes instead, as the upstream sent it."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":")).encode()
