"""Streams on a bare socket: a ``POST /chat`` written by hand, its answer read as the
bytes arrive, and the connection dropped whenever the test says, with no HTTP client in
between to buffer, retry or close it politely.

``sse.post_chat(..., open=True)`` is the same request through ``requests``; use this one
when the test is about the socket itself (a disconnect, a half-read answer).
"""

from __future__ import annotations

import json
import socket

__all__ = ["open_stream", "read_until"]


def open_stream(port: int, stage_id: str, model: str, **extra: object) -> socket.socket:
    """A streamed ``POST /chat`` to the server on loopback ``port``, prompt "hi", and
    ``extra`` fields; the socket, its answer unread."""
    body = json.dumps(
        {"stage_id": stage_id, "model_name": model, "user_prompt": "hi", "stream": True, **extra}
    ).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /chat HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    return sock


def read_until(sock: socket.socket, marker: bytes, count: int = 1) -> bytes:
    """What ``sock`` has sent, read until ``marker`` has come ``count`` times (10 s at
    most); fails the test if the connection closes first."""
    wire = b""
    sock.settimeout(10)
    while wire.count(marker) < count:
        piece = sock.recv(65536)
        assert piece, f"connection closed early: {wire!r}"
        wire += piece
    return wire
