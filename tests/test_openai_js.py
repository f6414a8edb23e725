"""The official JavaScript SDK (``openai`` on npm, pinned in testing/js/package.json) on
``/v1``, run with Debian's node against gunicorn and the fake upstream, on streams slow
enough to carry heartbeat comments: it gets every chunk and event, in order, exactly as
the server sends them, and none wrapped as ``{event, data}`` (which it does to an event
whose name it does not parse).

``scripts/setup.sh --dev`` installs node and the SDK (``npm ci`` in testing/js).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from testing.fake_upstream import FakeUpstream
from testing.servers import ROOT, Gunicorn, gunicorn_server
from testing.sse import HEARTBEAT

JS = ROOT / "testing" / "js"
# Heartbeats every 0.2 s without an event; 1 s before the first chunk, 0.5 s between.
MODEL = "fake?chunks=3&interval=0.5&prefill=1&created=1700000000"
TEXT = "tok0 tok1 tok2 "
RESPONSE_ID = re.compile(r"resp_[0-9a-f]{32}")


@pytest.fixture(scope="module")
def server(fake: FakeUpstream) -> Iterator[Gunicorn]:
    settings = {"STAGESERVER_UPSTREAM_URL": fake.url, "STAGESERVER_HEARTBEAT_SECONDS": "0.2"}
    with gunicorn_server(settings) as gunicorn:
        yield gunicorn


def node(server: Gunicorn, script: str, *args: str) -> list[tuple[str, Any]]:
    """Run testing/js/<script> against ``server``: what it printed, (kind, value) a line,
    up to its "end"."""
    found = shutil.which("node")
    assert found, "node is missing: run scripts/setup.sh --dev (it installs Debian's nodejs)"
    assert (JS / "node_modules" / "openai" / "package.json").exists(), (
        "testing/js/node_modules is missing: run scripts/setup.sh --dev (npm ci there)"
    )
    done = subprocess.run(
        [found, script, server.url, *args], cwd=JS, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stderr}\n{done.stdout}"
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines[-1] == {"kind": "end", "value": None}, done.stdout
    received = [(line["kind"], line["value"]) for line in lines[:-1]]
    for _, value in received:
        # Parsed as the SDK's own types: a chunk or an event, never {event, data}.
        assert set(value) != {"event", "data"}, value
        assert "object" in value or "type" in value, value
    return received


def wire_data(wire: bytes) -> list[str]:
    """The data lines of a /v1 stream, in order; the wire carried heartbeats."""
    assert HEARTBEAT in wire, "no heartbeat: the stream was too fast to show one"
    return [line[6:] for line in wire.decode().split("\n") if line.startswith("data: ")]


def test_chat_completions_stream(server: Gunicorn) -> None:
    received = node(server, "chat_stream.mjs", MODEL)
    assert {kind for kind, _ in received} == {"chunk"}
    chunks = [value for _, value in received]
    # The same request, read off the wire: the same chunks but for the id and the time.
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    answer = requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    data = wire_data(answer.content)
    assert data[-1] == "[DONE]"
    expected = [json.loads(line) for line in data[:-1]]
    stamp = {"id": chunks[0]["id"], "created": chunks[0]["created"]}
    assert chunks == [{**chunk, **stamp} for chunk in expected]
    # Their content, in order: the text, its end, then the usage chunk.
    assert chunks[0]["object"] == "chat.completion.chunk"
    texts = [c["choices"][0]["delta"].get("content") for c in chunks[:4]]
    assert texts == ["tok0 ", "tok1 ", "tok2 ", None]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks[:4]] == [None, None, None, "stop"]
    assert len(chunks) == 5 and chunks[4]["choices"] == []
    assert chunks[4]["usage"] == {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}


EVENT_TYPES = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def assert_a_whole_response(events: list[dict[str, Any]]) -> str:
    """The events of one response, in order, with its text; its id."""
    assert [e["type"] for e in events] == EVENT_TYPES
    assert [e["sequence_number"] for e in events] == list(range(len(EVENT_TYPES)))
    assert [e["delta"] for e in events[4:7]] == ["tok0 ", "tok1 ", "tok2 "]
    assert events[7]["text"] == TEXT
    final = events[-1]["response"]
    assert final["status"] == "completed"
    assert final["output"][0]["content"][0]["text"] == TEXT
    response_id = final["id"]
    assert RESPONSE_ID.fullmatch(response_id), response_id
    return str(response_id)


def test_responses_stream(server: Gunicorn) -> None:
    received = node(server, "responses_stream.mjs", MODEL)
    assert {kind for kind, _ in received} == {"event"}
    events = [value for _, value in received]
    response_id = assert_a_whole_response(events)
    # Its final event carries the Response the server keeps, exactly.
    kept = requests.get(f"{server.url}/v1/responses/{response_id}", timeout=10)
    assert kept.status_code == 200, kept.text
    assert events[-1]["response"] == kept.json()


def test_responses_background_stream_then_retrieve_starting_after(server: Gunicorn) -> None:
    after = 4  # the first delta
    received = node(server, "responses_resume.mjs", MODEL, str(after))
    created = [value for kind, value in received if kind == "created"]
    resumed = [value for kind, value in received if kind == "resumed"]
    assert [kind for kind, _ in received] == ["created"] * len(created) + ["resumed"] * len(resumed)
    # The create's events up to `after`, then every later one exactly once.
    assert [e["sequence_number"] for e in created] == list(range(after + 1))
    assert [e["sequence_number"] for e in resumed] == list(range(after + 1, len(EVENT_TYPES)))
    response_id = assert_a_whole_response(created + resumed)
    assert created[0]["response"]["background"] is True
    # Exactly what the server replays of it, now that it has ended.
    replay = requests.get(
        f"{server.url}/v1/responses/{response_id}", params={"stream": "true"}, timeout=30
    )
    assert replay.status_code == 200, replay.text
    events = [json.loads(line[6:]) for line in replay.text.split("\n") if line.startswith("data: ")]
    assert created + resumed == events
