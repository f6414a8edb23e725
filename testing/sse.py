"""A small SSE client for stageserver: a chat posted, exact wire bytes in, events out."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping
from typing import Any, Literal, overload

import requests

__all__ = [
    "TERMINAL",
    "OpenStream",
    "assert_each_once",
    "assert_resumed_exactly_once",
    "assert_whole_once",
    "chunk_text",
    "estimated_usage",
    "ids_of",
    "parse_events",
    "post_chat",
    "read_rest",
    "seq",
    "stage_status",
    "terminal",
    "toks",
    "wait_for_status",
    "with_ids",
]

TERMINAL = ("done", "error", "cancel")


RETRY = b"retry: 3000\n"  # how every stream starts, with STAGESERVER_SSE_RETRY_MS's default
HEARTBEAT = b": heartbeat\n"  # a comment line, ending no block


def parse_events(wire: bytes) -> list[dict[str, Any]]:
    """The complete events of an SSE body, in order. A comment line is listed as
    {"comment": text} where it stands; a ``retry:`` line is no event. A block that would
    dispatch an event without data (what breaks httpx-sse's and the openai SDK's users)
    fails the parse."""
    events: list[dict[str, Any]] = []
    for block in wire.decode().split("\n\n")[:-1]:
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                events.append({"comment": line[2:]})
            elif not line.startswith("retry: "):
                name, _, value = line.partition(": ")
                fields[name] = value
        assert "data" in fields, f"a block that dispatches no data: {block!r}"
        event: dict[str, Any] = {"event": fields["event"], "data": json.loads(fields["data"])}
        if "id" in fields:
            event["id"] = fields["id"]
        events.append(event)
    return events


def terminal(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") in TERMINAL]


def toks(count: int) -> str:
    """The text of the fake upstream's scripted answer of ``count`` pieces:
    ``"tok0 tok1 ... "``."""
    return "".join(f"tok{n} " for n in range(count))


def seq(event: dict[str, Any]) -> int:
    """An event's number in its stage's log: the last part of its id."""
    return int(event["id"].rpartition("-")[2])


def with_ids(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stage's events: those with an id (not a comment, not a response's own end)."""
    return [e for e in events if "id" in e]


def ids_of(events: list[dict[str, Any]]) -> list[str]:
    return [e["id"] for e in events if "id" in e]


def chunk_text(events: list[dict[str, Any]]) -> str:
    return "".join(
        (choice.get("delta") or {}).get("content") or ""
        for e in events
        if e.get("event") == "chat_completion_chunk"
        for choice in e["data"]["chunk"]["choices"]
    )


class OpenStream:
    """A streaming response read a piece at a time; close() drops the connection."""

    def __init__(self, response: requests.Response) -> None:
        self.response = response
        self.wire = b""
        self._pieces = response.iter_content(None)

    def read_until(self, marker: bytes, count: int = 1) -> bytes:
        while self.wire.count(marker) < count:
            self.wire += next(self._pieces)
        return self.wire

    def read_to_end(self) -> list[dict[str, Any]]:
        for piece in self._pieces:
            self.wire += piece
        return self.events()

    def events(self) -> list[dict[str, Any]]:
        return parse_events(self.wire)

    def close(self) -> None:
        self.response.close()


def read_rest(stream: OpenStream) -> list[dict[str, Any]]:
    """What a stream still delivers, then closed; its host may cut it (a host killed)."""
    with contextlib.suppress(requests.RequestException):
        stream.read_to_end()
    stream.close()
    return stream.events()


@overload
def post_chat(
    base_url: str,
    *,
    stream: bool = True,
    open: Literal[False] = False,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30,
    **fields: Any,
) -> requests.Response: ...


@overload
def post_chat(
    base_url: str,
    *,
    stream: bool = True,
    open: Literal[True],
    headers: Mapping[str, str] | None = None,
    timeout: float = 30,
    **fields: Any,
) -> OpenStream: ...


def post_chat(
    base_url: str,
    *,
    stream: bool = True,
    open: bool = False,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30,
    **fields: Any,
) -> requests.Response | OpenStream:
    """``POST /chat`` with ``fields`` (``model_name`` "fake" and ``user_prompt`` "hi" unless
    given) and ``"stream": stream``. Returns the whole response; with ``open``, the
    response as it arrives, which must be a 200 (a stream to read)."""
    body = {"model_name": "fake", "user_prompt": "hi", "stream": stream, **fields}
    response = requests.post(
        f"{base_url}/chat", json=body, headers=headers, stream=open, timeout=timeout
    )
    if not open:
        return response
    assert response.status_code == 200, response.text
    return OpenStream(response)


def estimated_usage(completion_tokens: int, prompt_tokens: int = 5) -> dict[str, Any]:
    """The usage a stage reports when the upstream sent none, as stageserver/usage.py
    estimates it: by default for the prompt "hi" (1 token, and 4 for its message)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "estimated": True,
    }


def stage_status(
    base_url: str, stage_id: str, headers: Mapping[str, str] | None = None
) -> dict[str, Any]:
    url = f"{base_url}/stages/{stage_id}"
    status: dict[str, Any] = requests.get(url, headers=headers, timeout=5).json()
    return status


def wait_for_status(
    base_url: str,
    stage_id: str,
    wanted: str,
    timeout: float = 10,
    headers: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The stage's status once it is ``wanted``; fails the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (current := stage_status(base_url, stage_id, headers)).get("status") != wanted:
        assert time.monotonic() < deadline, current
        time.sleep(0.02)
    return current


def assert_resumed_exactly_once(
    stage_id: str, before: list[dict[str, Any]], after: list[dict[str, Any]], chunks: int
) -> None:
    """The events a client got before it dropped, then after it re-attached, are the
    whole stage once, in order: every id once, the text with no gap and no repeat."""
    events = [e for e in before + after if "id" in e]
    ids = [e["id"] for e in events]
    last = len(ids) - 1
    assert ids == [f"{stage_id}-chunk-{n}" for n in range(last)] + [f"{stage_id}-done-{last}"]
    assert chunk_text(events) == toks(chunks)


def assert_each_once(stage_id: str, events: list[dict[str, Any]], end: str) -> None:
    """The events of a whole stage: ids from 0 up, no gap, no repeat, one ``end`` last."""
    ids = ids_of(events)
    last = len(ids) - 1
    assert ids == [f"{stage_id}-chunk-{n}" for n in range(last)] + [f"{stage_id}-{end}-{last}"], (
        terminal(events)
    )
    assert [e["event"] for e in terminal(events)] == [end], terminal(events)


def assert_whole_once(stage_id: str, events: list[dict[str, Any]], chunks: int) -> dict[str, Any]:
    """A seed stage's events, from the first, are its whole answer once, continued once:
    the ids count up from 0 with no gap and no repeat, the text is the fake's answer of
    ``chunks`` pieces, one ``continued`` and, last, ``done``, and no ``error`` anywhere.
    Returns the ``continued`` event."""
    assert [e for e in events if e.get("event") == "error"] == []
    ided = with_ids(events)
    assert [seq(e) for e in ided] == list(range(len(ided)))
    assert chunk_text(ided) == toks(chunks)
    [continued] = [e for e in ided if e["event"] == "continued"]
    assert continued["id"] == f"{stage_id}-continued-{seq(continued)}"
    assert terminal(ided) == [ided[-1]] and ided[-1]["event"] == "done"
    for event in ided:
        kind = "chunk" if event["event"] == "chat_completion_chunk" else event["event"]
        assert event["id"] == f"{stage_id}-{kind}-{seq(event)}"
    return continued
