"""A small SSE client for tests: exact wire bytes in, events out."""

from __future__ import annotations

import json
import time
from typing import Any

import requests

TERMINAL = ("done", "error", "cancel")


def parse_events(wire: bytes) -> list[dict[str, Any]]:
    """The complete events of an SSE body; comments are kept as {"comment": text}."""
    events: list[dict[str, Any]] = []
    for block in wire.decode().split("\n\n")[:-1]:
        if block.startswith(":"):
            events.append({"comment": block[2:]})
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        event = {"event": fields["event"], "data": json.loads(fields["data"])}
        if "id" in fields:
            event["id"] = fields["id"]
        events.append(event)
    return events


def terminal(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") in TERMINAL]


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

    def events(self) -> list[dict[str, Any]]:
        return parse_events(self.wire)

    def close(self) -> None:
        self.response.close()


def post_stream(url: str, **fields: Any) -> OpenStream:
    body = {"model_name": "fake", "user_prompt": "hi", "stream": True, **fields}
    return OpenStream(requests.post(f"{url}/chat", json=body, stream=True, timeout=30))


def stage_status(base_url: str, stage_id: str) -> dict[str, Any]:
    status: dict[str, Any] = requests.get(f"{base_url}/stages/{stage_id}", timeout=5).json()
    return status


def wait_for_status(
    base_url: str, stage_id: str, wanted: str, timeout: float = 10
) -> dict[str, Any]:
    """The stage's status once it is ``wanted``; fails the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (current := stage_status(base_url, stage_id)).get("status") != wanted:
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
    assert chunk_text(events) == "".join(f"tok{n} " for n in range(chunks))
