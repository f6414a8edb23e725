"""The fixed design written plainly (``bench/plain.py``), the floor that stageserver is
measured against, writes what stageserver's ``/chat`` writes for the same request: the
seed's events, as many, the same chunks. A floor that wrote less would flatter it."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient

from bench import plain
from testing.fake_upstream import FakeUpstream
from testing.sse import parse_events

SHAPE = "fake?chunks=3&interval=0&prefill=0"
BODY = {"stage_id": "s-1", "model_name": SHAPE, "user_prompt": "bench", "stream": True}


def stream(client: FlaskClient) -> list[dict[str, Any]]:
    response = client.post("/chat", json=BODY)
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    return parse_events(response.get_data())


def shape_of(events: list[dict[str, Any]]) -> list[tuple[str, str, list[str], bool]]:
    """Each event's name and stage, and its chunk's keys and whether it has usage."""
    return [
        (e["event"], e["data"]["stage_id"], sorted(e["data"].get("chunk", {})),
         "usage" in e["data"].get("chunk", {}))
        for e in events
    ]  # fmt: skip


def chunks_of(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chunks, less what the fake upstream makes anew for each response (its id, and
    the second it was created)."""
    return [
        {k: v for k, v in e["data"]["chunk"].items() if k not in ("id", "created")}
        for e in events
        if "chunk" in e["data"]
    ]


@pytest.fixture
def stageserver_events(flask_client: FlaskClient) -> list[dict[str, Any]]:
    return stream(flask_client)


def test_the_plain_relay_writes_stageservers_events(
    upstream: FakeUpstream, stageserver_events: list[dict[str, Any]]
) -> None:
    events = stream(plain.create_plain_app(upstream.url).test_client())
    assert shape_of(events) == shape_of(stageserver_events)
    assert chunks_of(events) == chunks_of(stageserver_events)
    assert [r.body["model"] for r in upstream.requests] == [SHAPE, SHAPE]  # stageserver's, ours


def test_the_bare_app_writes_as_many_events_with_no_upstream(
    upstream: FakeUpstream, stageserver_events: list[dict[str, Any]]
) -> None:
    upstream.reset()
    events = stream(plain.create_bare_app().test_client())
    assert shape_of(events) == shape_of(stageserver_events)
    texts = [e["data"]["chunk"]["choices"][0]["delta"].get("content") for e in events[:3]]
    assert texts == ["t0", "t1", "t2"]
    assert upstream.requests == []
