"""A client that goes away cancels its stage, and the upstream sees its connection closed."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import requests

from testing.fake_upstream import FakeUpstream
from testing.servers import Gunicorn, gunicorn_server
from testing.sockets import open_stream, read_until
from testing.sse import estimated_usage, stage_status, wait_for_status


@pytest.fixture(scope="module")
def server(fake: FakeUpstream) -> Iterator[Gunicorn]:
    # A long heartbeat: what notices the disconnects below is the socket watcher.
    env = {"STAGESERVER_UPSTREAM_URL": fake.url, "STAGESERVER_HEARTBEAT_SECONDS": "30"}
    with gunicorn_server(env, forbid=("Traceback", "ignored GeneratorExit")) as gunicorn:
        yield gunicorn


def test_disconnect_mid_stream_closes_the_upstream(
    server: Gunicorn, upstream: FakeUpstream
) -> None:
    sock = open_stream(server.port, "mid", "fake?chunks=200&interval=0.05")
    read_until(sock, b"event: chat_completion_chunk", 3)
    sock.close()

    assert upstream.wait_for(lambda: upstream.requests[0].client_closed_at is not None)
    seen = upstream.requests[0]
    pulled = seen.chunks_sent
    assert pulled < 200 and not seen.done_sent
    time.sleep(0.3)
    assert upstream.requests[0].chunks_sent == pulled  # nothing more was pulled
    assert wait_for_status(server.url, "mid", "cancelled")
    assert stage_status(server.url, "mid")["cancel_reason"] == "client disconnected"


def test_disconnect_during_prefill_closes_the_upstream(
    server: Gunicorn, upstream: FakeUpstream
) -> None:
    sock = open_stream(server.port, "prefill", "fake?prefill=60")
    read_until(sock, b"\r\n\r\n")  # the headers come at once, before any token
    assert upstream.wait_for(lambda: len(upstream.requests) == 1)
    sock.close()

    assert upstream.wait_for(lambda: upstream.requests[0].client_closed_at is not None)
    seen = upstream.requests[0]
    assert seen.chunks_sent == 0
    assert wait_for_status(server.url, "prefill", "cancelled")


def test_disconnect_before_upstream_headers_closes_the_upstream(
    server: Gunicorn, upstream: FakeUpstream
) -> None:
    sock = open_stream(server.port, "noheaders", "fake?prefill=60&headers_first=0")
    read_until(sock, b"\r\n\r\n")
    assert upstream.wait_for(lambda: len(upstream.requests) == 1)
    sock.close()
    assert upstream.wait_for(lambda: upstream.requests[0].client_closed_at is not None)
    assert wait_for_status(server.url, "noheaders", "cancelled")


def test_the_cancel_is_recorded_for_watchers(server: Gunicorn, upstream: FakeUpstream) -> None:
    sock = open_stream(server.port, "watched", "fake?chunks=100&interval=0.05")
    read_until(sock, b"event: chat_completion_chunk", 2)
    sock.close()
    assert upstream.wait_for(lambda: upstream.requests[0].client_closed_at is not None)
    replay = requests.get(f"{server.url}/stages/watched/events", timeout=10).content
    blocks = replay.decode().split("\n\n")[:-1]
    assert blocks[-1].split("\n")[1] == "event: cancel"
    chunks = sum("event: chat_completion_chunk" in b for b in blocks)
    assert json.loads(blocks[-1].split("data: ", 1)[1]) == {
        "stage_id": "watched",
        "reason": "client disconnected",
        "usage": estimated_usage(chunks),
    }
    assert sum("event: cancel" in b for b in blocks) == 1


def test_keep_alive_connection_serves_the_next_request_after_a_stream(server: Gunicorn) -> None:
    # The socket watcher must be gone before gunicorn reads the next request.
    with requests.Session() as session:
        for n in range(3):
            response = session.post(
                f"{server.url}/chat",
                json={
                    "stage_id": f"ka{n}",
                    "model_name": "fake",
                    "user_prompt": "hi",
                    "stream": True,
                },
                timeout=10,
            )
            assert response.content.endswith(
                b'event: done\ndata: {"stage_id":"ka%d",' % n
                + b'"usage":{"prompt_tokens":1,"completion_tokens":5,"total_tokens":6}}\n\n'
            )
