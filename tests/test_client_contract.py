"""The Python client and the parts of the wire contract that stageserver does not send yet
(401, 429, ``retry:``, usage on ``done``, 204 on resume), against a small real HTTP
server that answers each request from a script."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from stageserver.client import (
    ChunkEvent,
    DoneEvent,
    RateLimited,
    StageClient,
    StreamLost,
    Unauthorized,
    Usage,
)

Answer = tuple[int, dict[str, str], bytes]


class ScriptedServer(ThreadingHTTPServer):
    """Answers ``(method, path)`` with the next answer scripted for it, then closes the
    connection: a stream without its terminal event is a dropped one."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.script: dict[tuple[str, str], list[Answer]] = {}
        self.seen: list[tuple[str, str, dict[str, str]]] = []


class _Handler(BaseHTTPRequestHandler):
    server: ScriptedServer

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.server.seen.append((self.command, self.path, dict(self.headers)))
        status, headers, body = self.server.script[(self.command, self.path)].pop(0)
        self.send_response(status)
        for name, value in {**headers, "Connection": "close"}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    server = ScriptedServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def sse(event_id: str, event: str, data: dict[str, Any]) -> bytes:
    stage_id = event_id.split("-")[0]
    body = json.dumps({"stage_id": stage_id, **data})
    return f"id: {event_id}\nevent: {event}\ndata: {body}\n\n".encode()


STREAM = {"Content-Type": "text/event-stream"}
CHUNK = {"chunk": {"choices": [{"index": 0, "delta": {"content": "Hi"}}], "new": 1}}


def test_a_resumed_stream_after_retry_reads_usage_and_skips_what_it_does_not_know(
    scripted: ScriptedServer,
) -> None:
    first = b"retry: 10\n\n: heartbeat\n\n" + sse("u-chunk-0", "chat_completion_chunk", CHUNK)
    scripted.script[("POST", "/chat")] = [(200, STREAM, first)]
    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4, "estimated": True}
    rest = sse("u-progress-1", "progress", {"step": 1}) + sse("u-done-2", "done", {"usage": usage})
    scripted.script[("GET", "/stages/u/events")] = [(200, STREAM, rest.replace(b"\n", b"\r\n"))]

    with StageClient(scripted.url, api_key="secret") as client:
        events = list(client.stream(stage_id="u", model_name="m", user_prompt="x"))

    assert [type(e) for e in events] == [ChunkEvent, DoneEvent]
    chunk, done = events
    assert isinstance(chunk, ChunkEvent) and isinstance(done, DoneEvent)
    assert (chunk.id, chunk.text) == ("u-chunk-0", "Hi")
    assert (done.id, done.usage) == ("u-done-2", Usage(3, 1, 4, estimated=True))
    (_, _, posted), (_, _, resumed) = scripted.seen
    assert posted["Authorization"] == resumed["Authorization"] == "Bearer secret"
    assert resumed["Last-Event-ID"] == "u-chunk-0"


def test_204_on_resume_before_the_terminal_event_is_a_lost_stream(
    scripted: ScriptedServer,
) -> None:
    chunk = sse("g-chunk-0", "chat_completion_chunk", CHUNK)
    scripted.script[("POST", "/chat")] = [(200, STREAM, chunk)]
    scripted.script[("GET", "/stages/g/events")] = [(204, {}, b"")]
    with StageClient(scripted.url, resume_delay=0.01) as client:
        stream = client.stream(stage_id="g", model_name="m", user_prompt="x")
        assert next(stream).id == "g-chunk-0"
        with pytest.raises(StreamLost) as lost:
            next(stream)
    assert str(lost.value) == (
        "the server says stage 'g' is over (204 after g-chunk-0), but its terminal event never "
        "arrived; GET /stages/g has its outcome"
    )


def test_401_and_429_become_their_errors(scripted: ScriptedServer) -> None:
    scripted.script[("GET", "/stages/a")] = [
        (401, {"WWW-Authenticate": "Bearer"}, b'{"error": "missing API key"}'),
        (429, {"Retry-After": "7"}, b'{"error": "too many stages for this key", "limit": 5}'),
    ]
    with StageClient(scripted.url) as client:
        with pytest.raises(Unauthorized) as unauthorized:
            client.status("a")
        with pytest.raises(RateLimited) as limited:
            client.status("a")
    assert (unauthorized.value.status, unauthorized.value.message) == (401, "missing API key")
    assert (limited.value.status, limited.value.retry_after) == (429, 7.0)
    assert limited.value.body == {"error": "too many stages for this key", "limit": 5}
