"""Nothing hangs and nothing leaks: an owner that dies or is cut off, a client that stops
reading or half-closes, a follow after the end, a store that loses what it held."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator

import pytest
import requests

from testing.fake_upstream import FakeUpstream
from testing.servers import Gunicorn, RedisServer, gunicorn_server
from testing.sse import (
    assert_resumed_exactly_once,
    parse_events,
    post_chat,
    stage_status,
    terminal,
    wait_for_status,
)

#: Every test here starts a process (testing/processes.py).
pytestmark = pytest.mark.processes

KEY = "solo-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


def env(fake: FakeUpstream, store_url: str, **extra: str) -> dict[str, str]:
    return {
        "STAGESERVER_UPSTREAM_URL": fake.url,
        "STAGESERVER_STORE_URL": store_url,
        "STAGESERVER_API_KEYS": json.dumps({"solo": {"key": KEY, "max_streams": 1}}),
        "STAGESERVER_OWNER_LEASE_SECONDS": "1",
        "STAGESERVER_HEARTBEAT_SECONDS": "1",
        "STAGESERVER_RESUME_GRACE_SECONDS": "30",
        **extra,
    }


@pytest.fixture
def pair(upstream: FakeUpstream, redis_server: RedisServer) -> Iterator[tuple[Gunicorn, Gunicorn]]:
    # A worker killed on purpose leaves no traceback, but its instance's log is not
    # checked: the SIGKILL is the point.
    with (
        gunicorn_server(env(upstream, redis_server.url), forbid=()) as a,
        gunicorn_server(env(upstream, redis_server.url)) as b,
    ):
        yield a, b


def start_resumable(url: str, stage_id: str, chunks: int = 2000) -> list[dict[str, object]]:
    """Start a resumable stage, read its first chunks, leave: it runs on."""
    stream = post_chat(
        url, stage_id=stage_id, model_name=f"fake?chunks={chunks}&interval=0.05",
        resumable=True, headers=AUTH, open=True,
    )  # fmt: skip
    stream.read_until(b"event: chat_completion_chunk", 3)
    stream.close()
    return [e for e in stream.events() if "id" in e]


def test_a_dead_owner_ends_its_stage_everywhere_and_frees_its_id_and_slot(
    pair: tuple[Gunicorn, Gunicorn], upstream: FakeUpstream
) -> None:
    a, b = pair
    start_resumable(a.url, "ow")
    watcher = requests.get(f"{b.url}/stages/ow/events", headers=AUTH, stream=True, timeout=30)
    assert watcher.status_code == 200
    [worker] = a.worker_pids()
    os.kill(worker, signal.SIGKILL)

    events = parse_events(watcher.content)
    ends = terminal(events)
    assert len(ends) == 1 and ends[0] is events[-1]
    assert ends[0]["event"] == "error"
    ids = [e["id"] for e in events if "id" in e]  # the whole stage, from its first event
    assert ids == [f"ow-chunk-{n}" for n in range(len(ids) - 1)] + [f"ow-error-{len(ids) - 1}"]
    message = ends[0]["data"]["error"]
    assert f"({socket.gethostname()}:{worker}) stopped" in message
    status = stage_status(b.url, "ow", AUTH)
    assert (status["status"], status["error"]) == ("error", message)
    # The id and the principal's one stream slot are free again.
    again = post_chat(b.url, stage_id="ow", headers=AUTH, stream=False)
    assert (again.status_code, again.json()["type"]) == (200, "text")


def test_a_worker_cut_off_past_its_lease_stops_and_writes_nothing_more(
    pair: tuple[Gunicorn, Gunicorn], upstream: FakeUpstream
) -> None:
    a, b = pair
    start_resumable(a.url, "cut")
    watcher = requests.get(f"{b.url}/stages/cut/events", headers=AUTH, stream=True, timeout=30)
    [worker] = a.worker_pids()
    os.kill(worker, signal.SIGSTOP)  # a long pause: its lease lapses, B declares it dead
    try:
        ends = terminal(parse_events(watcher.content))
        assert [e["event"] for e in ends] == ["error"]
    finally:
        os.kill(worker, signal.SIGCONT)
    # Back, it finds its lease gone and the stage ended: it stops its upstream ...
    record = upstream.requests[0]
    assert upstream.wait_for(lambda: record.client_closed_at is not None, timeout=10)
    assert not record.done_sent
    # ... and writes nothing more: the stage's log still ends with the one error event.
    time.sleep(1.5)
    replay = parse_events(
        requests.get(f"{b.url}/stages/cut/events", headers=AUTH, timeout=10).content
    )
    assert terminal(replay) == ends
    assert replay[-1] == ends[0]
    assert stage_status(b.url, "cut", AUTH)["status"] == "error"


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.parametrize("resumable", [False, True])
def test_a_client_that_stops_reading_is_let_go(
    fake: FakeUpstream, upstream: FakeUpstream, resumable: bool
) -> None:
    settings = {"STAGESERVER_UPSTREAM_URL": fake.url, "STAGESERVER_SEND_TIMEOUT_SECONDS": "1"}
    with gunicorn_server(settings) as server:
        post_chat(server.url, stage_id="warm", stream=False)
        [worker] = server.worker_pids()
        baseline = _fds(worker)
        # Chunks of 64 KB, 20 ms apart, for 8 s: the buffers between the two fill within
        # a few seconds, while the stage still runs.
        upstream.defaults.update({"chunks": "400", "interval": "0.02", "text": "x" * 400 * 65536})
        body = json.dumps({
            "stage_id": "frozen", "model_name": "fake", "user_prompt": "hi", "stream": True,
            "resumable": resumable, "max_tokens": 4096,
        }).encode()  # fmt: skip
        frozen = socket.socket()
        frozen.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        frozen.connect(("127.0.0.1", server.port))
        frozen.sendall(
            b"POST /chat HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        try:  # it never reads: the worker's writes fill the buffers, then wait
            deadline = time.monotonic() + 15
            if resumable:
                while _fds(worker) > baseline + 1:  # the upstream's connection stays
                    assert time.monotonic() < deadline, "the frozen response was kept"
                    time.sleep(0.1)
                assert stage_status(server.url, "frozen")["status"] == "running"
                requests.post(f"{server.url}/stages/frozen/cancel", timeout=5)
            else:
                while (status := stage_status(server.url, "frozen"))["status"] != "cancelled":
                    assert time.monotonic() < deadline, status["status"]
                    time.sleep(0.1)
                assert status["cancel_reason"] == "client disconnected"
            record = upstream.requests[-1]
            assert upstream.wait_for(lambda: record.client_closed_at is not None, timeout=10)
            deadline = time.monotonic() + 10
            while _fds(worker) > baseline:
                assert time.monotonic() < deadline, "a descriptor was kept"
                time.sleep(0.1)
        finally:
            frozen.close()


def test_a_follow_after_the_end_answers_204(pair: tuple[Gunicorn, Gunicorn]) -> None:
    a, b = pair
    events = parse_events(post_chat(a.url, stage_id="end", headers=AUTH).content)
    last = events[-1]["id"]
    assert last == "end-done-7"
    for server in (a, b):  # here and through the store
        url = f"{server.url}/stages/end/events"
        for last_id in (last, "end-chunk-99"):
            after = requests.get(url, headers={**AUTH, "Last-Event-ID": last_id}, timeout=10)
            assert (after.status_code, after.content) == (204, b"")
        tail = requests.get(url, headers={**AUTH, "Last-Event-ID": "end-chunk-5"}, timeout=10)
        assert tail.status_code == 200
        assert [e["id"] for e in parse_events(tail.content)] == ["end-chunk-6", "end-done-7"]


def test_a_half_closed_client_counts_as_gone(fake: FakeUpstream, upstream: FakeUpstream) -> None:
    """Decided: a client that shuts its sending side (SHUT_WR) after its request is gone,
    as nginx treats it; the stage is cancelled like any disconnect's."""
    with gunicorn_server({"STAGESERVER_UPSTREAM_URL": fake.url}) as server:
        body = (
            b'{"stage_id":"half","model_name":"fake?chunks=2000&interval=0.05",'
            b'"user_prompt":"hi","stream":true}'
        )
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(
                b"POST /chat HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            sock.shutdown(socket.SHUT_WR)
            status = wait_for_status(server.url, "half", "cancelled")
            assert status["cancel_reason"] == "client disconnected"
        # Seen at once, often before the upstream was called: whatever was, is closed.
        chats = [r for r in upstream.requests if r.path.endswith("/chat/completions")]
        assert upstream.wait_for(lambda: all(r.client_closed_at is not None for r in chats))


def test_a_connection_that_sends_nothing_is_closed_after_the_keepalive(
    fake: FakeUpstream,
) -> None:
    """The worker waits for a connection's first bytes in turn (``gunicorn_worker``), for
    ``STAGESERVER_KEEPALIVE`` seconds at most, then closes it; a request meanwhile on
    another connection is served."""
    settings = {"STAGESERVER_UPSTREAM_URL": fake.url, "STAGESERVER_KEEPALIVE": "1"}
    with gunicorn_server(settings) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as silent:
            opened = time.monotonic()
            answer = requests.get(f"{server.url}/healthz", timeout=5)
            assert answer.status_code == 200
            silent.settimeout(10)
            assert silent.recv(1) == b""  # closed by the worker, nothing sent
            assert 0.9 <= time.monotonic() - opened < 5


def test_events_the_store_lost_for_good_are_reported_never_skipped(
    fake: FakeUpstream, redis_server: RedisServer
) -> None:
    small = env(fake, redis_server.url, STAGESERVER_EVENT_LOG_MAX_EVENTS="10")
    with gunicorn_server(small) as a, gunicorn_server(small) as b:
        stream = post_chat(
            a.url, stage_id="gap", model_name="fake?chunks=60&interval=0.05", headers=AUTH,
            open=True,
        )  # fmt: skip
        stream.read_until(b"event: chat_completion_chunk", 2)
        redis_server.kill()  # comes back empty; meanwhile A's log keeps only 10 events
        time.sleep(1.5)
        redis_server.start()
        assert terminal(stream.read_to_end())[0]["event"] == "done"
        wait_for_status(b.url, "gap", "done", headers=AUTH)
        status = stage_status(b.url, "gap", AUTH)
        assert "were lost by the store while it was unavailable" in status["gap"]
        replay = parse_events(
            requests.get(f"{b.url}/stages/gap/events", headers=AUTH, timeout=10).content
        )
        assert "id" not in replay[-1]
        assert replay[-1]["event"] == "error"
        assert "events 0 to" in replay[-1]["data"]["error"]
        assert status["gap"] in replay[-1]["data"]["error"]


def test_a_sentinel_failover_loses_no_event(fake: FakeUpstream) -> None:
    from testing.servers import SentinelGroup

    group = SentinelGroup()
    try:
        settings = env(fake, group.url)
        with gunicorn_server(settings) as a, gunicorn_server(settings) as b:
            stream = post_chat(
                a.url, stage_id="fo", model_name="fake?chunks=80&interval=0.05",
                headers=AUTH, resumable=True, open=True,
            )  # fmt: skip
            stream.read_until(b"event: chat_completion_chunk", 10)
            group.primary.kill()
            events = stream.read_to_end()  # the stage in flight finishes
            assert [e["event"] for e in terminal(events)] == ["done"]
            got = [e for e in events if "id" in e][:5]
            deadline = time.monotonic() + 30
            while True:  # once the sentinels have named the replica primary
                try:
                    if stage_status(b.url, "fo", AUTH).get("status") == "done":
                        break
                except ValueError:
                    pass
                assert time.monotonic() < deadline, "the stage never reached the new primary"
                time.sleep(0.2)
            rest = requests.get(
                f"{b.url}/stages/fo/events",
                headers={**AUTH, "Last-Event-ID": got[-1]["id"]},
                timeout=10,
            )
            assert_resumed_exactly_once("fo", got, parse_events(rest.content), 80)
    finally:
        group.stop()
