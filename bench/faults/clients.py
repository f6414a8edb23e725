"""The clients the faults use, each in a thread of its own, and what they must have seen.

- ``Follower``: one SSE response read to its end, with the moment its terminal event
  arrived;
- ``EventSourceClient``: what a browser's ``EventSource`` does with a stage's events:
  reconnects ``retry`` ms after each end with the last id it got, stops on 204;
- ``raw_chat``: a ``POST /chat`` written on a bare socket, for clients that misbehave
  (never read, half-close);
- the checks: one terminal event, last; a resumed stage's events exactly once.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import requests

from testing.sse import TERMINAL, chunk_text, parse_events, post_chat, stage_status

# The seed's terminal events, and the Messages API's last (its error is the seed's name).
_TERMINAL_MARKS = (*(f"event: {name}\n".encode() for name in TERMINAL), b"event: message_stop\n")
# A chunk's event: the seed's, and the Messages API's.
_CHUNK_MARKS = (b"event: chat_completion_chunk\n", b"event: content_block_delta\n")


class Follower(threading.Thread):
    """One request whose SSE answer is read to its end; ``first_chunk`` is set at the
    first chunk event, ``ended_at`` (monotonic) when a terminal event arrived, and
    ``arrivals`` has the wire's length and the moment after each read."""

    def __init__(
        self,
        method: str,
        url: str,
        *,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(daemon=True)
        self.method, self.url, self.body, self.headers = method, url, body, headers
        self.status: int | None = None
        self.wire = b""
        self.arrivals: list[tuple[int, float]] = []
        self.first_chunk = threading.Event()
        self.ended_at: float | None = None
        self.failure: str | None = None
        self.start()

    def run(self) -> None:
        try:
            with requests.request(
                self.method, self.url, json=self.body, headers=self.headers, stream=True,
                timeout=(5, 60),
            ) as response:  # fmt: skip
                self.status = response.status_code
                for piece in response.iter_content(None):
                    seen = self.wire[-64:] + piece  # a mark split across two reads
                    self.wire += piece
                    self.arrivals.append((len(self.wire), time.monotonic()))
                    if any(mark in seen for mark in _CHUNK_MARKS):
                        self.first_chunk.set()
                    if self.ended_at is None and any(m in seen for m in _TERMINAL_MARKS):
                        self.ended_at = time.monotonic()
        except requests.RequestException as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
        finally:
            self.first_chunk.set()  # nobody waits for a chunk that will not come

    def events(self) -> list[dict[str, Any]]:
        return parse_events(self.wire)


def chat(url: str, stage_id: str, model: str, **fields: Any) -> Follower:
    body = {"stage_id": stage_id, "model_name": model, "user_prompt": "hi", "stream": True}
    return Follower("POST", f"{url}/chat", body={**body, **fields})


def watch(url: str, stage_id: str, last_event_id: str | None = None) -> Follower:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else None
    return Follower("GET", f"{url}/stages/{stage_id}/events", headers=headers)


def start_and_leave(url: str, stage_id: str, model: str) -> list[dict[str, Any]]:
    """Start a resumable stage, read its first chunk, leave: it runs on. Its events so far."""
    stream = post_chat(url, stage_id=stage_id, model_name=model, resumable=True, open=True)
    stream.read_until(b"event: chat_completion_chunk")
    stream.close()
    return stream.events()


def status_of(url: str, stage_id: str) -> str | None:
    """The stage's status; None while the server cannot say (a store in a failover)."""
    try:
        value = stage_status(url, stage_id).get("status")
    except (requests.RequestException, ValueError):
        return None
    return value if isinstance(value, str) else None


def one_terminal(events: list[dict[str, Any]]) -> str | None:
    """A problem, or None when exactly one terminal event came, and last."""
    ends = [n for n, e in enumerate(events) if e.get("event") in TERMINAL]
    if len(ends) != 1:
        return f"{len(ends)} terminal events"
    if ends[0] != len(events) - 1:
        return "events after the terminal one"
    return None


def resumed_exactly_once(
    stage_id: str, before: list[dict[str, Any]], after: list[dict[str, Any]], chunks: int
) -> str | None:
    """A problem, or None when the events before a drop and after the resume are the
    whole stage once, in order, ending in ``done`` (``testing.sse``'s test, as a value)."""
    events = [e for e in before + after if "id" in e]
    ids = [e["id"] for e in events]
    last = len(ids) - 1
    if ids != [f"{stage_id}-chunk-{n}" for n in range(last)] + [f"{stage_id}-done-{last}"]:
        lost = [e for e in after if "id" not in e]
        if lost:
            return f"ended with {lost[-1]['event']}: {lost[-1]['data'].get('error')}"
        return f"ids not each once in order: {ids[:3]}...{ids[-3:]}"
    if chunk_text(events) != "".join(f"tok{n} " for n in range(chunks)):
        return "the text has a gap or a repeat"
    return None


def raw_chat(port: int, stage_id: str, model: str, *, rcvbuf: int | None = None) -> socket.socket:
    """A ``POST /chat`` (streamed, not resumable) written on a bare socket."""
    body = json.dumps(
        {"stage_id": stage_id, "model_name": model, "user_prompt": "hi", "stream": True}
    ).encode()
    sock = socket.socket()
    if rcvbuf is not None:  # before connecting, so that the window is small from the start
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        b"POST /chat HTTP/1.1\r\nHost: f\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    return sock


def read_to_close(sock: socket.socket, timeout: float) -> bytes | None:
    """What the server sent until it closed the connection; None if it did not close it
    within ``timeout``."""
    sock.settimeout(timeout)
    got = bytearray()
    try:
        while piece := sock.recv(1 << 20):
            got += piece
    except ConnectionResetError:
        pass  # closed with data unread: a reset
    except OSError:
        return None
    return bytes(got)


class EventSourceClient(threading.Thread):
    """A browser's ``EventSource`` on ``GET /stages/<id>/events``, in Python.

    As the HTML standard has it: each event's id becomes the last event id; when a
    response ends, it waits the last ``retry:`` and connects again with ``Last-Event-ID``;
    a 204 (or any status but 200) makes it stop for good. A page would also stop on its
    own at the ``done`` event; this one does not, which is the case under test. It gives
    up ``watch_seconds`` after the stage's end.
    """

    def __init__(self, url: str, stage_id: str, watch_seconds: float) -> None:
        super().__init__(daemon=True)
        self.url = f"{url}/stages/{stage_id}/events"
        self.watch_seconds = watch_seconds
        self.retry = 3.0  # the standard's default, until the server says otherwise
        self.last_id = ""
        self.ids: list[str] = []
        self.requests: list[tuple[float, int]] = []  # (when sent, status)
        self.ended_at: float | None = None  # the stage's terminal event arrived
        self.stopped_at: float | None = None  # a 204, or any status but 200
        self.failure: str | None = None
        self.start()

    def run(self) -> None:
        while True:
            if self.ended_at is not None and time.monotonic() - self.ended_at > self.watch_seconds:
                return
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
            if self.last_id:
                headers["Last-Event-ID"] = self.last_id
            sent = time.monotonic()
            try:
                with requests.get(self.url, headers=headers, stream=True, timeout=30) as response:
                    self.requests.append((sent, response.status_code))
                    if response.status_code != 200:
                        self.stopped_at = time.monotonic()
                        return
                    self._read(response.iter_content(None))
            except requests.RequestException as exc:
                self.failure = f"{type(exc).__name__}: {exc}"
            time.sleep(self.retry)

    def _read(self, pieces: Any) -> None:
        buf = b""
        for piece in pieces:
            buf += piece
            *blocks, buf = buf.split(b"\n\n")
            for block in blocks:
                fields = dict(
                    line.split(": ", 1) for line in block.decode().split("\n") if ": " in line
                )
                if "retry" in fields:
                    self.retry = int(fields["retry"]) / 1000
                if "id" in fields:
                    self.last_id = fields["id"]
                    self.ids.append(fields["id"])
                if fields.get("event") in TERMINAL and self.ended_at is None:
                    self.ended_at = time.monotonic()
