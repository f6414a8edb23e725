"""stageserver behind nginx running the shipped deploy/nginx.conf, in front of gunicorn.

nginx's proxy_read_timeout is 3 s here and stageserver's heartbeat 1 s; the worker takes
at most 2 streams (STAGESERVER_MAX_ACTIVE_STREAMS).
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from testing.fake_upstream import FakeUpstream, UpstreamRequest
from testing.servers import Gunicorn, Nginx, gunicorn_server
from testing.sse import chunk_text, parse_events, post_chat, terminal

MAX_BODY = 1_048_576


@dataclass
class Stack:
    gunicorn: Gunicorn
    nginx: Nginx


@pytest.fixture(scope="module")
def stack(fake: FakeUpstream) -> Iterator[Stack]:
    env = {
        "STAGESERVER_UPSTREAM_URL": fake.url,
        "STAGESERVER_HEARTBEAT_SECONDS": "1",
        "STAGESERVER_MAX_ACTIVE_STREAMS": "2",
    }
    with gunicorn_server(env) as gunicorn:
        nginx = Nginx(gunicorn.port, proxy_read_timeout="3s")
        try:
            yield Stack(gunicorn, nginx)
        finally:
            nginx_log = nginx.log()
            nginx.stop()
    assert "upstream timed out" not in nginx_log, nginx_log


def seen_by_upstream(fake: FakeUpstream, request_id: str) -> UpstreamRequest:
    """The upstream's record of the stage whose request carried ``request_id``."""
    assert fake.wait_for(
        lambda: any(r.headers.get("x-request-id") == request_id for r in fake.requests)
    ), f"the upstream never saw request id {request_id!r}"
    return next(r for r in fake.requests if r.headers.get("x-request-id") == request_id)


def chat_requests(fake: FakeUpstream) -> list[UpstreamRequest]:
    return [r for r in fake.requests if r.path.endswith("/chat/completions")]


def test_first_chunk_reaches_the_client_while_the_upstream_is_still_generating(
    stack: Stack, upstream: FakeUpstream
) -> None:
    stream = post_chat(
        stack.nginx.url,
        stage_id="first",
        model_name="fake?chunks=200&interval=0.05",
        headers={"X-Request-ID": "ngx-first"},
        open=True,
    )
    stream.read_until(b"event: chat_completion_chunk")
    seen = seen_by_upstream(upstream, "ngx-first")
    # Nothing held back: the client has a chunk, and the upstream has barely started.
    assert not seen.done_sent
    assert seen.chunks_sent < 200
    stream.read_until(b"event: chat_completion_chunk", 3)
    assert not seen.done_sent
    stream.close()
    assert upstream.wait_for(lambda: seen.client_closed_at is not None)


def test_heartbeats_keep_a_long_prefill_alive_past_nginx_read_timeout(
    stack: Stack, upstream: FakeUpstream
) -> None:
    # 10 s before the first token, three times nginx's 3 s proxy_read_timeout.
    response = post_chat(
        stack.nginx.url,
        stage_id="slow",
        model_name="fake?prefill=10&chunks=3",
        headers={"X-Request-ID": "ngx-slow"},
        timeout=60,
    )
    assert response.status_code == 200
    events = parse_events(response.content)
    first_chunk = next(i for i, e in enumerate(events) if e.get("event") == "chat_completion_chunk")
    heartbeats = [e for e in events[:first_chunk] if e.get("comment") == "heartbeat"]
    assert len(heartbeats) >= 3  # one a second of silence kept nginx reading
    assert chunk_text(events) == "tok0 tok1 tok2 "
    usage = {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}
    done = {"event": "done", "data": {"stage_id": "slow", "usage": usage}, "id": "slow-done-5"}
    assert terminal(events) == [done]
    seen = seen_by_upstream(upstream, "ngx-slow")
    assert upstream.wait_for(lambda: seen.done_sent)
    assert seen.client_closed_at is None


@pytest.mark.parametrize(
    ("stage_id", "model", "marker"),
    [
        ("leave-mid", "fake?chunks=1000&interval=0.02", b"event: chat_completion_chunk"),
        ("leave-prefill", "fake?prefill=30", b": heartbeat"),
    ],
)
def test_a_client_leaving_nginx_closes_the_upstream(
    stack: Stack, upstream: FakeUpstream, stage_id: str, model: str, marker: bytes
) -> None:
    stream = post_chat(
        stack.nginx.url,
        stage_id=stage_id,
        model_name=model,
        headers={"X-Request-ID": f"ngx-{stage_id}"},
        open=True,
    )
    stream.read_until(marker)
    seen = seen_by_upstream(upstream, f"ngx-{stage_id}")
    stream.close()
    assert upstream.wait_for(lambda: seen.client_closed_at is not None, timeout=10)
    assert not seen.done_sent
    status = requests.get(f"{stack.nginx.url}/stages/{stage_id}", timeout=5).json()
    assert (status["status"], status["cancel_reason"]) == ("cancelled", "client disconnected")


def test_request_id_passes_through_nginx_to_stageserver_and_the_upstream(
    stack: Stack, upstream: FakeUpstream
) -> None:
    given = post_chat(
        stack.nginx.url,
        stage_id="rid",
        stream=False,
        headers={"X-Request-ID": "client-id-7"},
        timeout=10,
    )
    assert given.status_code == 200
    assert given.headers["X-Request-ID"] == "client-id-7"
    seen = seen_by_upstream(upstream, "client-id-7")
    # The answer can reach us before the fake upstream's coroutine has noted its [DONE].
    assert upstream.wait_for(lambda: seen.done_sent)

    upstream.reset()
    made = post_chat(stack.nginx.url, stage_id="rid2", stream=False, timeout=10)
    assert made.status_code == 200
    request_id = made.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)  # nginx's $request_id
    assert chat_requests(upstream)[0].headers["x-request-id"] == request_id
    assert '"POST /chat HTTP/1.1" 200' in stack.nginx.access_log()


def _post_raw(
    port: int, body: bytes, *, send_body: bool = True
) -> tuple[int, dict[str, str], bytes]:
    """POST /chat with an exact body; read the whole answer (Connection: close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /chat HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        if send_body:
            sock.sendall(body)
        wire = b""
        while piece := sock.recv(65536):
            wire += piece
    head, _, payload = wire.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        payload = _dechunk(payload)
    return int(lines[0].split()[1]), headers, payload


def _dechunk(data: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out, data = out + data[:size], data[size + 2 :]


def _body_of_size(size: int) -> bytes:
    skeleton = {"stage_id": "big", "model_name": "fake", "user_prompt": ""}
    pad = size - len(json.dumps(skeleton).encode())
    body = json.dumps(skeleton | {"user_prompt": "x" * pad}).encode()
    assert len(body) == size
    return body


def test_body_limit_is_the_apps_and_over_it_nginx_answers_like_the_app(stack: Stack) -> None:
    # At the limit the body passes nginx; stageserver answers (the prompt is too long).
    status, headers, payload = _post_raw(stack.nginx.port, _body_of_size(MAX_BODY))
    assert status == 422
    assert json.loads(payload)["fields"][0]["field"] == "user_prompt"
    assert "x-request-id" in headers

    too_big = _body_of_size(MAX_BODY + 1)
    status, headers, payload = _post_raw(stack.nginx.port, too_big)
    # stageserver refuses on Content-Length alone and closes without reading the body
    # (which would reset the connection under the answer): send it none.
    app_status, _, app_payload = _post_raw(stack.gunicorn.port, too_big, send_body=False)
    assert (status, app_status) == (413, 413)
    assert (
        payload
        == app_payload
        == (b'{"error":"request body is larger than 1048576 bytes","field":"body"}\n')
    )
    assert headers["content-type"] == "application/json"
    assert re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"])


def _metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = rf"^{re.escape(name)}(?:\{{{re.escape(wanted)}\}})? (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_over_the_stream_limit_requests_get_503_and_running_streams_complete(
    stack: Stack, upstream: FakeUpstream
) -> None:
    url = stack.nginx.url
    refused_before = _metric(
        requests.get(f"{url}/metrics", timeout=5).text,
        "stageserver_stages_refused_total",
        reason="overload",
    )
    running = [
        post_chat(
            url,
            stage_id=f"held{n}",
            model_name="fake?chunks=30&interval=0.05",
            headers={"X-Request-ID": f"ngx-held{n}"},
            open=True,
        )
        for n in range(2)
    ]
    for stream in running:
        stream.read_until(b"event: chat_completion_chunk")

    for n in range(3):
        refused = post_chat(url, stage_id=f"over{n}", timeout=10)
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "1"
        assert refused.headers["Content-Type"] == "application/json"
        assert refused.json() == {
            "error": "this stageserver worker is running its limit of 2 active streams "
            "(STAGESERVER_MAX_ACTIVE_STREAMS); retry in 1 s",
            "reason": "overload",
            "limit": 2,
        }
    # Refused before any upstream call: the upstream saw the two running stages only.
    assert len(chat_requests(upstream)) == 2

    for n, stream in enumerate(running):
        events: list[dict[str, Any]] = parse_events(stream.read_until(b"event: done"))
        assert terminal(events) == [
            {
                "event": "done",
                "data": {
                    "stage_id": f"held{n}",
                    "usage": {"prompt_tokens": 1, "completion_tokens": 30, "total_tokens": 31},
                },
                "id": f"held{n}-done-32",
            }
        ]
        assert chunk_text(events) == "".join(f"tok{i} " for i in range(30))
        stream.close()

    # The worker goes on serving once streams have finished.
    after = post_chat(url, stage_id="after", timeout=10)
    assert terminal(parse_events(after.content)) == [
        {
            "event": "done",
            "data": {
                "stage_id": "after",
                "usage": {"prompt_tokens": 1, "completion_tokens": 5, "total_tokens": 6},
            },
            "id": "after-done-7",
        }
    ]
    metrics = requests.get(f"{url}/metrics", timeout=5).text
    refused_after = _metric(metrics, "stageserver_stages_refused_total", reason="overload")
    assert refused_after - refused_before == 3
    assert _metric(metrics, "stageserver_active_streams", upstream="default") == 0


def test_health_through_nginx(stack: Stack) -> None:
    assert requests.get(f"{stack.nginx.url}/healthz", timeout=5).json() == {"status": "ok"}
    ready = requests.get(f"{stack.nginx.url}/readyz", timeout=5)
    assert ready.status_code == 200
    assert ready.json()["upstreams"]["default"]["ok"] is True
