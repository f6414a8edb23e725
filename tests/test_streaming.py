"""Streaming through a real gunicorn gevent worker, against the fake upstream's faults."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
import requests

from testing.fake_upstream import FakeUpstream
from testing.servers import Gunicorn, free_port, gunicorn_server
from testing.sse import HEARTBEAT, RETRY, chunk_text, parse_events, post_chat, terminal


@pytest.fixture(scope="module")
def server(fake: FakeUpstream) -> Iterator[Gunicorn]:
    upstreams = {
        "default": {"url": fake.url},
        "strict": {"url": fake.url, "first_token_timeout": 1, "idle_timeout": 1},
        "down": {"url": f"http://127.0.0.1:{free_port()}/v1", "connect_timeout": 2},
    }
    env = {"STAGESERVER_UPSTREAMS": json.dumps(upstreams), "STAGESERVER_HEARTBEAT_SECONDS": "0.5"}
    with gunicorn_server(env) as gunicorn:
        yield gunicorn


def test_stream_is_the_seeds_events_byte_for_byte(server: Gunicorn, upstream: FakeUpstream) -> None:
    response = post_chat(server.url, stage_id="exact", model_name="fake?chunks=2&created=7")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    index = upstream.requests[0].index
    head = (
        f'{{"id":"chatcmpl-fake-{index}","object":"chat.completion.chunk","created":7,'
        '"model":"fake","choices":'
    )
    chunks = [
        head + '[{"index":0,"delta":{"role":"assistant","content":"tok0 "},"finish_reason":null}]}',
        head + '[{"index":0,"delta":{"content":"tok1 "},"finish_reason":null}]}',
        head + '[{"index":0,"delta":{},"finish_reason":"stop"}]}',
        head + '[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}',
    ]
    expected = "".join(
        f"id: exact-chunk-{n}\nevent: chat_completion_chunk\n"
        f'data: {{"stage_id":"exact","chunk":{chunk}}}\n\n'
        for n, chunk in enumerate(chunks)
    )
    expected += (
        'id: exact-done-4\nevent: done\ndata: {"stage_id":"exact",'
        '"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}\n\n'
    )
    assert response.content == RETRY + expected.encode()


def test_upstream_request_carries_the_stage_parameters(
    server: Gunicorn, upstream: FakeUpstream
) -> None:
    post_chat(
        server.url,
        stage_id="params",
        system_prompt="be brief",
        max_tokens=[7, 99],
        temperature=[0.25],
    )
    body = upstream.requests[0].body
    assert body == {
        "model": "fake",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
        ],
        "max_tokens": 7,
        "temperature": 0.25,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert upstream.requests[0].headers["accept-encoding"] == "identity"


def test_ids_are_unique_and_increasing(server: Gunicorn) -> None:
    events = [e for e in parse_events(post_chat(server.url, stage_id="ids").content) if "id" in e]
    seqs = [int(e["id"].rsplit("-", 1)[1]) for e in events]
    assert seqs == list(range(len(events)))
    assert len({e["id"] for e in events}) == len(events)


def test_heartbeats_while_waiting_for_the_first_token(server: Gunicorn) -> None:
    wire = post_chat(server.url, stage_id="hb", model_name="fake?prefill=2").content
    events = parse_events(wire)
    assert events[0] == {"comment": "heartbeat"}
    assert [e["event"] for e in terminal(events)] == ["done"]
    # Before the first chunk, the retry line, then heartbeat lines only, none ending a block.
    prefill = wire[: wire.index(b"id: hb-chunk-0\n")]
    assert prefill == RETRY + HEARTBEAT * prefill.count(HEARTBEAT)


@pytest.mark.parametrize(
    ("model", "error_event"),
    [
        (
            "fake?mode=status&status=500",
            b"id: err-error-0\nevent: error\n"
            rb"""data: {"stage_id":"err","error":"upstream 'default' answered HTTP 500: """
            rb"""fake upstream failure"}"""
            b"\n\n",
        ),
        (
            "fake?mode=malformed&after=1",
            b"id: err-error-1\nevent: error\n"
            rb"""data: {"stage_id":"err","error":"upstream 'default' sent a chunk that is not """
            rb"""a JSON object: '{\"id\": not json'"}"""
            b"\n\n",
        ),
    ],
)
def test_error_event_byte_for_byte(server: Gunicorn, model: str, error_event: bytes) -> None:
    wire = post_chat(server.url, stage_id="err", model_name=model).content
    assert wire.endswith(error_event)
    assert wire.count(b"event: error") == 1


def test_utf8_split_across_upstream_reads_arrives_whole(server: Gunicorn) -> None:
    model = "fake?text=h%C3%A9llo%20w%C3%B6rld%20%F0%9F%91%8B&chunks=4&split=1&crlf=1"
    events = parse_events(post_chat(server.url, stage_id="utf8", model_name=model).content)
    assert chunk_text(events) == "héllo wörld 👋"


@pytest.mark.parametrize("model", ["fake?multiline=1", "fake?comments=1", "fake?gzip=1"])
def test_upstream_wire_variants_relay_the_same_text(server: Gunicorn, model: str) -> None:
    post_chat(server.url, stage_id="variant", model_name=model)
    status = requests.get(f"{server.url}/stages/variant", timeout=5).json()
    assert (status["status"], status["text"]) == ("done", "tok0 tok1 tok2 tok3 tok4 ")


FAULTS = [
    ("down", "fake", r"could not reach upstream 'down' at http://127\.0\.0\.1:\d+/v1: .+"),
    (
        "default",
        "fake?mode=status&status=500",
        r"upstream 'default' answered HTTP 500: fake upstream failure",
    ),
    (
        "default",
        "fake?mode=status&status=404",
        r"upstream 'default' answered HTTP 404: fake upstream failure",
    ),
    ("strict", "fake?mode=hang", r"upstream 'strict' sent no first token within 1 s"),
    ("strict", "fake?prefill=5", r"upstream 'strict' sent no first token within 1 s"),
    ("strict", "fake?interval=5", r"upstream 'strict' sent nothing for 1 s mid-stream"),
    (
        "default",
        "fake?mode=drop&after=2",
        r"upstream 'default' dropped the connection mid-stream after 2 chunks: .+",
    ),
    (
        "default",
        "fake?mode=drop&after=1&reset=1",
        r"upstream 'default' dropped the connection mid-stream after 1 chunks: .+",
    ),
    (
        "default",
        "fake?mode=malformed&after=1&interval=0.2",
        r"upstream 'default' sent a chunk that is not a JSON object: '\{\"id\": not json'",
    ),
    (
        "default",
        "fake?mode=error_object&after=1",
        r"upstream 'default' reported an error mid-stream: fake upstream error object",
    ),
]


@pytest.mark.parametrize(("upstream_name", "model", "message"), FAULTS)
def test_each_upstream_fault_ends_the_stream_with_one_error_event(
    server: Gunicorn, upstream: FakeUpstream, upstream_name: str, model: str, message: str
) -> None:
    response = post_chat(server.url, stage_id="fault", upstream=upstream_name, model_name=model)
    assert response.status_code == 200
    events = parse_events(response.content)
    ends = terminal(events)
    assert [e["event"] for e in ends] == ["error"]
    assert ends[0] is events[-1]
    assert ends[0]["data"]["stage_id"] == "fault"
    assert re.fullmatch(message, ends[0]["data"]["error"]), ends[0]["data"]["error"]
    if any(fault in model for fault in ("hang", "prefill", "interval", "malformed")):
        # The upstream was still generating: its connection was closed, so it stops.
        assert upstream.wait_for(lambda: upstream.requests[-1].client_closed_at is not None)
        assert not upstream.requests[-1].done_sent


@pytest.mark.parametrize(
    ("upstream_name", "model", "status"),
    [
        ("default", "fake?mode=status&status=503", 502),
        ("down", "fake", 502),
        ("strict", "fake?mode=hang", 504),
        ("default", "fake?mode=drop&after=1", 502),
    ],
)
def test_non_streaming_failure_has_a_truthful_status(
    server: Gunicorn, upstream_name: str, model: str, status: int
) -> None:
    response = post_chat(
        server.url, stage_id="nsfail", stream=False, upstream=upstream_name, model_name=model
    )
    assert response.status_code == status
    body = response.json()
    assert body["stage_id"] == "nsfail-chat-error"
    assert body["type"] == "error"
    assert body["text"] is None
    assert body["error"]


def test_non_streaming_success(server: Gunicorn) -> None:
    response = post_chat(server.url, stage_id="ns", stream=False, model_name="fake?chunks=3")
    assert response.status_code == 200
    assert response.json() == {
        "stage_id": "ns-chat-final",
        "type": "text",
        "text": "tok0 tok1 tok2 ",
        "error": None,
    }


def test_upstream_connections_are_reused(server: Gunicorn, upstream: FakeUpstream) -> None:
    for n in range(4):
        post_chat(server.url, stage_id=f"reuse{n}")
    assert len({r.connection_id for r in upstream.requests}) == 1


@pytest.mark.parametrize("after_done", ["hang", "reset"])
def test_done_is_sent_at_once_whatever_follows_done_upstream(
    server: Gunicorn, upstream: FakeUpstream, after_done: str
) -> None:
    stream = post_chat(
        server.url, stage_id="afterdone", model_name=f"fake?after_done={after_done}", open=True
    )
    stream.read_until(b"event: done")
    if after_done == "hang":
        # done reached us while the upstream connection was still open after [DONE]
        assert upstream.requests[0].client_closed_at is None
    stream.close()
    assert [e["event"] for e in terminal(stream.events())] == ["done"]
    status = requests.get(f"{server.url}/stages/afterdone", timeout=5).json()
    assert status["status"] == "done"
