"""Graceful shutdown under gunicorn (behind nginx), and the per-worker stream limit."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from flask.testing import FlaskClient

from stageserver import create_app
from stageserver.manager import manager_of
from testing.apps import settle
from testing.fake_upstream import FakeUpstream, UpstreamRequest
from testing.servers import Nginx, gunicorn_server
from testing.sse import chunk_text, parse_events, post_chat, terminal

SHUTDOWN_ERROR = "stageserver is shutting down; retry the stage"


def seen(fake: FakeUpstream, request_id: str) -> UpstreamRequest:
    return next(r for r in fake.requests if r.headers.get("x-request-id") == request_id)


@pytest.mark.processes
def test_sigterm_lets_streams_finish_and_ends_the_rest_with_an_error_event(
    upstream: FakeUpstream,
) -> None:
    # graceful_timeout 6 s: streams still running 4 s after SIGTERM are aborted.
    env = {"STAGESERVER_UPSTREAM_URL": upstream.url, "STAGESERVER_GRACEFUL_TIMEOUT": "6"}
    forbid = ("SIGKILL", "graceful timeout", "Traceback")
    with gunicorn_server(env, forbid=forbid) as server, Nginx(server.port) as nginx:
        short, long = (
            post_chat(
                nginx.url,
                stage_id=stage_id,
                model_name=f"fake?chunks={chunks}&interval=0.05",
                headers={"X-Request-ID": stage_id},
                open=True,
            )
            for stage_id, chunks in (("short", 20), ("long", 100000))
        )
        for stream in (short, long):
            stream.read_until(b"event: chat_completion_chunk")

        server.signal(signal.SIGTERM)

        # Not ready any more, as soon as the worker has the signal the master passes on:
        # 503, or no connection once the worker stops accepting.
        deadline = time.monotonic() + 5
        while True:
            try:
                ready = requests.get(f"{server.url}/readyz", timeout=5)
            except requests.ConnectionError:
                break
            if ready.status_code == 503:
                assert ready.json() == {"status": "shutting_down"}
                break
            assert time.monotonic() < deadline, "still ready 5 s after SIGTERM"
            time.sleep(0.02)

        # New stages are refused: 503 from a worker still finishing, then nginx's 502
        # once no worker accepts connections any more.
        statuses: list[int] = []
        deadline = time.monotonic() + 5
        while 502 not in statuses and time.monotonic() < deadline:
            late = post_chat(
                nginx.url,
                stage_id=f"late{len(statuses)}",
                user_prompt="x",
                stream=False,
                timeout=10,
            )
            statuses.append(late.status_code)
            if late.status_code == 503:
                assert late.headers["Retry-After"] == "1"
                assert late.json()["reason"] == "shutting_down"
            time.sleep(0.1)
        assert set(statuses) <= {502, 503} and statuses[-1] == 502, statuses

        short_events = short.read_to_end()
        assert terminal(short_events)[0]["event"] == "done"
        assert chunk_text(short_events) == "".join(f"tok{i} " for i in range(20))

        long_events = long.read_to_end()
        assert long_events[-1] == {
            "event": "error",
            "data": {"stage_id": "long", "error": SHUTDOWN_ERROR},
            "id": f"long-error-{len(long_events) - 1}",
        }
        assert terminal(long_events) == [long_events[-1]]
        record = seen(upstream, "long")
        assert upstream.wait_for(lambda: record.client_closed_at is not None)
        assert not record.done_sent
        # (A /readyz answered before the worker had the signal probed the upstream too.)
        chats = [r for r in upstream.requests if r.path.endswith("/chat/completions")]
        assert sorted(r.headers["x-request-id"] for r in chats) == ["long", "short"]

        # The worker left on its own, before gunicorn's SIGKILL.
        assert server.proc.wait(timeout=15) == 0
    log = server.log()
    assert "ended 1 stage(s) still running" in log
    assert "error_kind=ServerShuttingDown" in log


@pytest.mark.processes
def test_a_worker_retired_after_max_requests_ends_its_streams_with_the_error_event(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # gunicorn retires a worker after max_requests without a signal; the streams it still
    # holds get the same end as on SIGTERM, and a new worker takes over.
    monkeypatch.setenv("GUNICORN_CMD_ARGS", "--max-requests 3")
    settings = {"STAGESERVER_UPSTREAM_URL": upstream.url, "STAGESERVER_GRACEFUL_TIMEOUT": "4"}
    with gunicorn_server(settings) as server:
        long = post_chat(
            server.url, stage_id="retired", model_name="fake?chunks=100000&interval=0.05",
            headers={"X-Request-ID": "retired"}, open=True,
        )  # fmt: skip
        long.read_until(b"event: chat_completion_chunk")
        for n in range(2):  # requests 2 and 3: the worker is retired
            assert post_chat(server.url, stage_id=f"r{n}", stream=False).status_code == 200
        events = long.read_to_end()
        assert terminal(events) == [
            {
                "event": "error",
                "data": {"stage_id": "retired", "error": SHUTDOWN_ERROR},
                "id": f"retired-error-{len(events) - 1}",
            }
        ]
        record = seen(upstream, "retired")
        assert upstream.wait_for(lambda: record.client_closed_at is not None)
        deadline = time.monotonic() + 15
        while len(server.worker_pids()) < 2:
            assert time.monotonic() < deadline, "no new worker"
            time.sleep(0.1)
        assert post_chat(server.url, stage_id="after", stream=False).status_code == 200
    assert "Worker graceful timeout" not in server.log()


@pytest.mark.processes
def test_sigint_quick_shutdown_still_ends_streams_with_the_error_event(
    upstream: FakeUpstream,
) -> None:
    with gunicorn_server({"STAGESERVER_UPSTREAM_URL": upstream.url}) as server:
        stream = post_chat(
            server.url,
            stage_id="quick",
            model_name="fake?chunks=100000&interval=0.05",
            headers={"X-Request-ID": "quick"},
            open=True,
        )
        stream.read_until(b"event: chat_completion_chunk")
        server.signal(signal.SIGINT)
        events = stream.read_to_end()
        assert terminal(events) == [
            {
                "event": "error",
                "data": {"stage_id": "quick", "error": SHUTDOWN_ERROR},
                "id": f"quick-error-{len(events) - 1}",
            }
        ]
        assert server.proc.wait(timeout=15) == 0
        record = seen(upstream, "quick")
        assert upstream.wait_for(lambda: record.client_closed_at is not None)


@pytest.fixture
def limited(upstream: FakeUpstream) -> Iterator[FlaskClient]:
    app = create_app(
        {"STAGESERVER_UPSTREAM_URL": upstream.url, "STAGESERVER_MAX_ACTIVE_STREAMS": 2}
    )
    yield app.test_client()
    manager_of(app.extensions).close()


def _start(client: FlaskClient, stage_id: str) -> Any:
    body = {
        "stage_id": stage_id,
        "model_name": "fake?chunks=1000&interval=0.01",
        "user_prompt": "hi",
        "stream": True,
    }
    return client.post("/chat", json=body, buffered=False)


def test_a_stage_refused_for_its_id_gives_its_slot_back(
    limited: FlaskClient, upstream: FakeUpstream
) -> None:
    first = _start(limited, "a")
    assert first.status_code == 200
    conflict = _start(limited, "a")  # admitted, then 409: the slot must come back
    assert conflict.status_code == 409
    second = _start(limited, "b")
    assert second.status_code == 200
    streams = [response.iter_encoded() for response in (first, second)]
    for pieces in streams:  # both stages are streaming
        while b"event: chat_completion_chunk" not in next(pieces):
            pass
    over = _start(limited, "c")
    assert over.status_code == 503
    assert over.headers["Retry-After"] == "1"
    assert over.json == {
        "error": "this stageserver worker is running its limit of 2 active streams "
        "(STAGESERVER_MAX_ACTIVE_STREAMS); retry in 1 s",
        "reason": "overload",
        "limit": 2,
    }
    assert [r.body["messages"][0]["content"] for r in upstream.requests] == ["hi", "hi"]

    for stage_id in ("a", "b"):
        assert limited.post(f"/stages/{stage_id}/cancel").status_code == 202
    for response, pieces in zip((first, second), streams, strict=True):
        assert terminal(parse_events(b"".join(pieces)))[0]["event"] == "cancel"
        response.close()
    for stage_id in ("a", "b"):
        settle(limited, stage_id)  # the runner gives the slot back as it finishes

    again = _start(limited, "d")
    assert again.status_code == 200
    assert limited.post("/stages/d/cancel").status_code == 202
    again.get_data()
    again.close()
    settle(limited, "d")
