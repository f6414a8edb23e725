"""`flask run` (threads, no gevent) serves the same stream, and heartbeats notice a disconnect."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from testing.fake_upstream import FakeUpstream
from testing.servers import ROOT, free_port, wait_for_http
from testing.sse import wait_for_status


@pytest.fixture(scope="module")
def flask_run(fake: FakeUpstream) -> Iterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STAGESERVER_")}
    env.update(STAGESERVER_UPSTREAM_URL=fake.url, STAGESERVER_HEARTBEAT_SECONDS="0.2")
    proc = subprocess.Popen(
        [
            Path(sys.executable).parent / "flask",
            "--app",
            "stageserver.wsgi",
            "run",
            "--port",
            str(port),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/stages/-", proc=proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_stream_under_flask_run(flask_run: str) -> None:
    response = requests.post(
        f"{flask_run}/chat",
        json={"stage_id": "fr", "model_name": "fake?chunks=2", "user_prompt": "hi", "stream": True},
        timeout=10,
    )
    assert response.status_code == 200
    assert response.content.count(b"event: chat_completion_chunk") == 4
    assert response.content.endswith(
        b'id: fr-done-4\nevent: done\ndata: {"stage_id":"fr",'
        b'"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}\n\n'
    )


def test_heartbeat_write_failure_cancels_during_prefill(
    flask_run: str, upstream: FakeUpstream
) -> None:
    port = int(flask_run.rsplit(":", 1)[1])
    body = b'{"stage_id":"frp","model_name":"fake?prefill=60","user_prompt":"hi","stream":true}'
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            b"POST /chat HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        sock.settimeout(10)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        assert upstream.wait_for(lambda: len(upstream.requests) == 1)
    # No socket watcher here: the second heartbeat written after the close fails.
    assert upstream.wait_for(lambda: upstream.requests[0].client_closed_at is not None, 20)
    # Under threads the runner finishes just after the shutdown of its upstream socket.
    status = wait_for_status(flask_run, "frp", "cancelled")
    assert status["cancel_reason"] == "client disconnected"
