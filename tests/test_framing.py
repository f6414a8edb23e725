"""The framing of every stream, as the common SSE clients read it, on streams slow enough
to carry heartbeat comments before and between events.

The seed's ``POST /chat`` stream is read by ``httpx-sse``, ``sseclient-py``, the
``openai`` SDK's own decoder, ``requests``' ``iter_lines()`` with a minimal parser, and
Chromium's ``EventSource``: each sees exactly the server's events (name, id, data), never
one with empty data, and the ``retry: 3000`` where it shows it. The old framing (a blank
line after ``retry:`` and after each heartbeat) is decoded too, to show that it gives
``httpx-sse`` and the ``openai`` decoder empty events, so these tests catch its return.

The ``/v1`` streams carry no ``id:`` and no ``retry:`` line, Chat Completions no
``event:`` line, a Responses event is named by its ``type``, and every block that is not
a comment has data.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

import httpx
import pytest
import requests
import sseclient
from httpx_sse import connect_sse
from httpx_sse._decoders import SSEDecoder as HttpxSSEDecoder
from openai._streaming import SSEDecoder as OpenAISSEDecoder

from testing.browser import watched_browser
from testing.fake_upstream import FakeUpstream
from testing.proxy import CuttingProxy
from testing.servers import Gunicorn, free_port
from testing.sse import HEARTBEAT, RETRY, chunk_text, parse_events

# 0.2 s without an event makes a heartbeat; the upstream waits 1 s before its first chunk
# and 0.5 s between chunks, so comments come before the first event and between events.
SETTINGS = {"STAGESERVER_HEARTBEAT_SECONDS": "0.2"}
SLOW = "fake?chunks=3&interval=0.5&prefill=1&created=1700000000"
TEXT = "tok0 tok1 tok2 "

Event = tuple[str, str, dict[str, Any]]  # (event name, id, data)


@pytest.fixture(scope="module")
def server(fake: FakeUpstream) -> Iterator[Gunicorn]:
    """gunicorn on a port chosen first, so that its own origin can be the one CORS allows:
    a page it serves reads, through a recording proxy, a stream of another origin."""
    port = free_port()
    env = {
        **SETTINGS,
        "STAGESERVER_UPSTREAM_URL": fake.url,
        "STAGESERVER_CORS_ORIGINS": json.dumps([f"http://127.0.0.1:{port}"]),
    }
    gunicorn = Gunicorn(env, port=port)
    try:
        yield gunicorn
    finally:
        gunicorn.stop()
    assert "Traceback" not in gunicorn.log(), gunicorn.log()


def chat_body(stage_id: str, **fields: Any) -> dict[str, Any]:
    return {"stage_id": stage_id, "model_name": SLOW, "user_prompt": "hi", "stream": True, **fields}


def server_events(server: Gunicorn, stage_id: str) -> list[Event]:
    """The stage's events as the server keeps them: its replay, once it has ended, read by
    the strict parser of testing/sse.py. A stage of 3 content chunks has 5 chunk events
    (the 3, the finish chunk, the usage chunk) and its done."""
    response = requests.get(f"{server.url}/stages/{stage_id}/events", timeout=10)
    assert response.status_code == 200, response.text
    events = [e for e in parse_events(response.content) if "comment" not in e]
    ids = [e["id"] for e in events]
    assert ids == [f"{stage_id}-chunk-{n}" for n in range(5)] + [f"{stage_id}-done-5"]
    assert chunk_text(events) == TEXT
    return [(e["event"], e["id"], e["data"]) for e in events]


def assert_slow_wire(wire: bytes) -> None:
    """The wire a client was given: it starts with the retry line, heartbeats joined to the
    first event's block, more between events; no block of it dispatches without data."""
    assert wire.startswith(RETRY + HEARTBEAT), wire[:200]
    first_event = wire.index(b"\nid: ")
    assert HEARTBEAT in wire[wire.index(b"\n\n", first_event) :], "no heartbeat between events"
    assert_no_dataless_block(wire)
    parse_events(wire)  # fails on a block that dispatches no data


def assert_no_dataless_block(wire: bytes) -> None:
    """Every block (up to a blank line) has a data line: no lone retry or comment block."""
    blocks = wire.split(b"\n\n")
    assert blocks[-1] == b"", f"the stream ends inside a block: {blocks[-1]!r}"
    for block in blocks[:-1]:
        lines = block.split(b"\n")
        assert any(line.startswith(b"data:") for line in lines), f"a dataless block: {block!r}"


def tee(pieces: Iterable[bytes], sink: bytearray) -> Iterator[bytes]:
    for piece in pieces:
        sink += piece
        yield piece


# -- the seed's stream, read by each client ---------------------------------------------------


class _RecordedStream(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, sink: bytearray) -> None:
        self._inner = inner
        self._sink = sink

    def __iter__(self) -> Iterator[bytes]:
        return tee(self._inner, self._sink)

    def close(self) -> None:
        self._inner.close()


class RecordingTransport(httpx.HTTPTransport):
    """httpx's own transport, keeping the bytes of each response body as they arrive."""

    def __init__(self) -> None:
        super().__init__()
        self.wire = bytearray()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        assert isinstance(response.stream, httpx.SyncByteStream)
        response.stream = _RecordedStream(response.stream, self.wire)
        return response


def test_httpx_sse_reads_every_event_with_its_fields(server: Gunicorn) -> None:
    transport = RecordingTransport()
    with (
        httpx.Client(transport=transport, timeout=30) as client,
        connect_sse(client, "POST", f"{server.url}/chat", json=chat_body("fr-httpx")) as source,
    ):
        seen = list(source.iter_sse())
    assert all(sse.data for sse in seen), seen
    got = [(sse.event, sse.id, json.loads(sse.data)) for sse in seen]
    assert got == server_events(server, "fr-httpx")
    assert [sse.retry for sse in seen] == [3000] + [None] * 5
    assert_slow_wire(bytes(transport.wire))


def test_sseclient_py_reads_every_event_with_its_fields(server: Gunicorn) -> None:
    wire = bytearray()
    with requests.post(
        f"{server.url}/chat", json=chat_body("fr-sseclient"), stream=True, timeout=30
    ) as response:
        assert response.status_code == 200
        seen = list(sseclient.SSEClient(tee(response.iter_content(None), wire)).events())
    assert all(event.data for event in seen), seen
    got = [(event.event, event.id, json.loads(event.data)) for event in seen]
    assert got == server_events(server, "fr-sseclient")
    assert [event.retry for event in seen] == ["3000"] + [None] * 5  # it keeps the text
    assert_slow_wire(bytes(wire))


def test_the_openai_decoder_reads_every_event_with_its_fields(server: Gunicorn) -> None:
    wire = bytearray()
    with requests.post(
        f"{server.url}/chat", json=chat_body("fr-openai"), stream=True, timeout=30
    ) as response:
        assert response.status_code == 200
        seen = list(OpenAISSEDecoder().iter_bytes(tee(response.iter_content(None), wire)))
    assert all(sse.data for sse in seen), seen
    got = [(sse.event, sse.id, sse.json()) for sse in seen]
    assert got == server_events(server, "fr-openai")
    assert [sse.retry for sse in seen] == [3000] + [None] * 5
    assert_slow_wire(bytes(wire))


def minimal_parse(lines: Iterable[str]) -> list[dict[str, Any]]:
    """A minimal reading of the SSE spec's fields (event, data, id, retry; comments
    ignored; the last id kept), dispatching at every blank line that ends a block with
    any field in it, as naive parsers do: a dataless block shows as an event with empty
    data instead of being dropped the way the spec drops it."""
    events: list[dict[str, Any]] = []
    last_id = ""
    block: dict[str, Any] = {}
    for line in lines:
        if not line:
            if block:
                events.append({"event": "message", "data": "", "id": last_id, **block})
                block = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            block["data"] = f"{block['data']}\n{value}" if "data" in block else value
        elif name == "id":
            last_id = block["id"] = value
        elif name == "event":
            block["event"] = value
        elif name == "retry" and value.isdigit():
            block["retry"] = int(value)
    return events


def test_requests_iter_lines_with_a_minimal_parser(server: Gunicorn) -> None:
    with requests.post(
        f"{server.url}/chat", json=chat_body("fr-lines"), stream=True, timeout=30
    ) as response:
        assert response.status_code == 200
        lines = [line.decode() for line in response.iter_lines()]
    seen = minimal_parse(lines)
    assert all(event["data"] for event in seen), seen
    got = [(event["event"], event["id"], json.loads(event["data"])) for event in seen]
    assert got == server_events(server, "fr-lines")
    assert [event.get("retry") for event in seen] == [3000] + [None] * 5
    assert lines[:3] == ["retry: 3000", ": heartbeat", ": heartbeat"]
    assert_slow_wire("\n".join(lines).encode() + b"\n")


# The page's EventSource on a stream of another origin (the recording proxy): every event
# it is given, under its name and id, until done, when it closes (no reconnect).
FOLLOW = """(url) => new Promise((resolve) => {
  const seen = [];
  const source = new EventSource(url);
  for (const name of ["message", "chat_completion_chunk", "done", "cancel"]) {
    source.addEventListener(name, (event) => {
      seen.push({event: event.type, id: event.lastEventId, data: event.data});
      if (name === "done" || name === "cancel") {
        source.close();
        resolve(seen);
      }
    });
  }
  source.onerror = (event) => {
    seen.push({event: "error", id: source.readyState, data: event.data ?? null});
    source.close();
    resolve(seen);
  };
})"""


def http_body(raw: bytes) -> bytes:
    """The body of one raw HTTP/1.1 response, its chunked framing undone."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert re.search(rb"(?im)^transfer-encoding: chunked\r?$", head), head
    body = b""
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        body, rest = body + rest[:size], rest[size + 2 :]
    return body


def test_chromium_eventsource_reads_every_event_with_its_fields(server: Gunicorn) -> None:
    stage_id = "fr-browser"
    with CuttingProxy(server.port) as proxy, watched_browser() as browser:
        page = browser.page
        page.goto(f"{server.url}/playground")  # a page of the origin CORS allows
        # A resumable stage, left at once: it runs on (2 s before its first chunk, for the
        # page to come), and the page follows it from the start.
        model = SLOW.replace("prefill=1", "prefill=2")
        body = chat_body(stage_id, model_name=model, resumable=True)
        with requests.post(f"{server.url}/chat", json=body, stream=True, timeout=30) as response:
            assert response.status_code == 200
            assert next(response.iter_content(None)).startswith(RETRY)
        seen = page.evaluate(FOLLOW, f"{proxy.url}/stages/{stage_id}/events")
        wire = http_body(proxy.received_by_clients())
    assert all(event["data"] for event in seen), seen
    got = [(event["event"], event["id"], json.loads(event["data"])) for event in seen]
    assert got == server_events(server, stage_id)
    assert_slow_wire(wire)  # the page was given the retry line, though it shows no value


# -- the old framing, which these clients cannot read ------------------------------------------

# The seed's stream as the server sent it before the fix: a blank line after the retry line
# and after each heartbeat, so that each made a block of its own.
OLD_WIRE = (
    b"retry: 3000\n\n"
    b": heartbeat\n\n"
    b'id: old-chunk-0\nevent: chat_completion_chunk\ndata: {"n":0}\n\n'
    b": heartbeat\n\n"
    b": heartbeat\n\n"
    b'id: old-done-1\nevent: done\ndata: {"n":1}\n\n'
)
# The same events as the server sends them now.
NEW_WIRE = (
    b"retry: 3000\n"
    b": heartbeat\n"
    b'id: old-chunk-0\nevent: chat_completion_chunk\ndata: {"n":0}\n\n'
    b": heartbeat\n"
    b": heartbeat\n"
    b'id: old-done-1\nevent: done\ndata: {"n":1}\n\n'
)


def httpx_sse_decode(wire: bytes) -> list[tuple[str, str, str, int | None]]:
    """httpx-sse's decoder on ``wire``, line by line as ``iter_sse`` feeds it."""
    decoder = HttpxSSEDecoder()
    found = []
    for line in wire.decode().split("\n")[:-1]:
        sse = decoder.decode(line)
        if sse is not None:
            found.append((sse.event, sse.id, sse.data, sse.retry))
    return found


def openai_decode(wire: bytes) -> list[tuple[str | None, str | None, str, int | None]]:
    return [
        (sse.event, sse.id, sse.data, sse.retry)
        for sse in OpenAISSEDecoder().iter_bytes(iter([wire]))
    ]


def test_the_old_framing_gives_empty_events_and_the_new_none(server: Gunicorn) -> None:
    chunk = ("chat_completion_chunk", "old-chunk-0", '{"n":0}')
    done = ("done", "old-done-1", '{"n":1}')
    # A lone retry block is an event without data; so is every heartbeat block after an id.
    assert httpx_sse_decode(OLD_WIRE) == [
        ("message", "", "", 3000),
        (*chunk, None),
        ("message", "old-chunk-0", "", None),
        ("message", "old-chunk-0", "", None),
        (*done, None),
    ]
    assert openai_decode(OLD_WIRE) == [
        (None, None, "", 3000),
        (*chunk, None),
        (None, "old-chunk-0", "", None),
        (None, "old-chunk-0", "", None),
        (*done, None),
    ]
    with pytest.raises(json.JSONDecodeError):
        [json.loads(data) for _, _, data, _ in httpx_sse_decode(OLD_WIRE)]
    with pytest.raises(AssertionError, match="a block that dispatches no data"):
        parse_events(OLD_WIRE)
    # Joined to the next event's block, the same lines dispatch nothing of their own.
    assert httpx_sse_decode(NEW_WIRE) == [(*chunk, 3000), (*done, None)]
    assert openai_decode(NEW_WIRE) == [(*chunk, 3000), (*done, None)]
    # And the server sends the new form: no retry line or comment ends a block of its own.
    with requests.post(
        f"{server.url}/chat", json=chat_body("fr-wire"), stream=True, timeout=30
    ) as response:
        wire = response.content
    assert wire.count(HEARTBEAT) >= 3, wire
    assert b"retry: 3000\n\n" not in wire
    assert b": heartbeat\n\n" not in wire
    assert_slow_wire(wire)
    assert [sse[2] for sse in httpx_sse_decode(wire) if not sse[2]] == []


# -- /v1 --------------------------------------------------------------------------------------


def v1_blocks(wire: bytes, *, comments: bool = True) -> list[list[str]]:
    """The blocks of a /v1 stream that are not comments only, each its lines but its
    comments. No line is an ``id:`` or a ``retry:``; every such block has data; some
    heartbeats came (``comments``)."""
    text = wire.decode()
    lines = text.split("\n")
    assert not [line for line in lines if line.startswith(("id:", "retry:"))], text
    if comments:
        assert HEARTBEAT.decode() in text, "no heartbeat: the stream was too fast to show one"
    blocks = text.split("\n\n")
    assert blocks[-1] == "", f"the stream ends inside a block: {blocks[-1]!r}"
    found = []
    for block in blocks[:-1]:
        fields = [line for line in block.split("\n") if not line.startswith(":")]
        if not fields:
            continue  # comments only: without an id or a retry, it dispatches nothing
        assert any(line.startswith("data: ") for line in fields), f"a dataless block: {block!r}"
        found.append(fields)
    assert [sse.data for sse in OpenAISSEDecoder().iter_bytes(iter([wire])) if not sse.data] == []
    return found


def responses_events(wire: bytes, *, comments: bool = True) -> list[dict[str, Any]]:
    """A Responses stream's events; each block is ``event: <type>`` and one data line."""
    events = []
    for fields in v1_blocks(wire, comments=comments):
        assert len(fields) == 2 and fields[0].startswith("event: "), fields
        data = json.loads(fields[1].removeprefix("data: "))
        assert fields[0] == f"event: {data['type']}", fields
        events.append(data)
    return events


def responses_text(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")


def test_v1_chat_completions_stream_framing(server: Gunicorn) -> None:
    body: dict[str, Any] = {
        "model": SLOW,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert response.content.startswith(HEARTBEAT), response.content[:100]  # the prefill's
    blocks = v1_blocks(response.content)
    assert all(fields == [fields[0]] for fields in blocks), blocks  # data only: no event:
    assert blocks[-1] == ["data: [DONE]"]
    chunks = [json.loads(fields[0].removeprefix("data: ")) for fields in blocks[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == TEXT
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


def test_v1_responses_stream_framing(server: Gunicorn) -> None:
    body: dict[str, Any] = {"model": SLOW, "input": "hi", "stream": True}
    response = requests.post(f"{server.url}/v1/responses", json=body, timeout=30)
    assert response.status_code == 200, response.text
    events = responses_events(response.content)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["type"] == "response.completed"
    assert responses_text(events) == TEXT


def test_v1_background_stream_and_its_resume_framing(server: Gunicorn) -> None:
    body: dict[str, Any] = {"model": SLOW, "input": "hi", "stream": True, "background": True}
    wire = b""
    with requests.post(
        f"{server.url}/v1/responses", json=body, stream=True, timeout=30
    ) as response:
        assert response.status_code == 200, response.text
        pieces = response.iter_content(None)
        while b'"sequence_number":3,' not in wire:
            wire += next(pieces)
    # Left at once: a background response runs on. Its events up to there, then again.
    complete = wire[: wire.rindex(b"\n\n") + 2]
    created = responses_events(complete, comments=False)
    assert [e["sequence_number"] for e in created] == list(range(len(created)))
    response_id = created[0]["response"]["id"]
    resumed = requests.get(
        f"{server.url}/v1/responses/{response_id}",
        params={"stream": "true", "starting_after": "2"},
        timeout=30,
    )
    assert resumed.status_code == 200, resumed.text
    events = responses_events(resumed.content)  # it followed live: heartbeats between
    assert [e["sequence_number"] for e in events] == list(range(3, 3 + len(events)))
    assert events[-1]["type"] == "response.completed"
    assert responses_text(events) == TEXT
