"""Who may do what across workers and hosts: two gunicorn instances sharing one real
redis-server, with API keys and limits held in Redis."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from testing.fake_upstream import FakeUpstream
from testing.servers import Gunicorn, RedisServer, gunicorn_server
from testing.sse import OpenStream, parse_events, post_chat, terminal, wait_for_status

SECRETS = {
    "alice": "alice-key-0123456789",
    "bob": "bob-key-0123456789",
    "solo": "solo-key-0123456789",
    "tok": "tok-key-0123456789",
    "rpm": "rpm-key-0123456789",
}
KEYS = {
    "alice": {"key": SECRETS["alice"], "max_streams": 2},
    "bob": {"key": SECRETS["bob"], "requests_per_minute": 1000},
    "solo": {"key": SECRETS["solo"], "max_streams": 1},
    "tok": {"key": SECRETS["tok"], "tokens_per_minute": 10},
    "rpm": {"key": SECRETS["rpm"], "requests_per_minute": 2},
}


def as_(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRETS[name]}"}


def env(fake: FakeUpstream, redis_server: RedisServer, **extra: str) -> dict[str, str]:
    return {
        "STAGESERVER_UPSTREAM_URL": fake.url,
        "STAGESERVER_STORE_URL": redis_server.url,
        "STAGESERVER_API_KEYS": json.dumps(KEYS),
        "STAGESERVER_HEARTBEAT_SECONDS": "1",
        "STAGESERVER_RESUME_GRACE_SECONDS": "1",
        **extra,
    }


@pytest.fixture(scope="module")
def pair(fake: FakeUpstream, redis_server: RedisServer) -> Iterator[tuple[Gunicorn, Gunicorn]]:
    with (
        gunicorn_server(env(fake, redis_server)) as a,
        gunicorn_server(env(fake, redis_server)) as b,
    ):
        yield a, b
        for server in (a, b):  # no secret reaches a log line
            log = server.log()
            assert not [name for name, secret in SECRETS.items() if secret in log], log


def held(url: str, who: str, stage_id: str, **fields: Any) -> OpenStream:
    """A stage that holds its slot: the upstream takes 30 s to its first token."""
    fields.setdefault("model_name", "fake?prefill=30")
    return post_chat(url, stage_id=stage_id, headers=as_(who), open=True, **fields)


def test_another_principal_sees_no_stage_on_any_host(pair: tuple[Gunicorn, Gunicorn]) -> None:
    a, b = pair
    assert post_chat(a.url, stage_id="iso", headers=as_("alice")).status_code == 200
    for method, path in (
        ("GET", "/stages/{}"),
        ("GET", "/stages/{}/events"),
        ("POST", "/stages/{}/cancel"),
    ):
        for server in (a, b):
            theirs = requests.request(
                method, server.url + path.format("iso"), headers=as_("bob"), timeout=5
            )
            assert theirs.status_code == 404
            assert theirs.json() == {
                "error": "no stage 'iso' (unknown, or expired)",
                "field": "stage_id",
            }
    assert (
        requests.get(f"{b.url}/stages/iso", headers=as_("alice"), timeout=5).json()["status"]
        == "done"
    )


def test_stage_ids_are_namespaced_on_every_host(pair: tuple[Gunicorn, Gunicorn]) -> None:
    a, b = pair
    alices, bobs = held(a.url, "alice", "same"), held(b.url, "bob", "same")
    try:
        again = post_chat(b.url, stage_id="same", headers=as_("alice"))
        assert again.status_code == 409
        assert again.json()["field"] == "stage_id"
    finally:
        for who, server in (("alice", a), ("bob", b)):
            requests.post(f"{server.url}/stages/same/cancel", headers=as_(who), timeout=5)
        alices.close()
        bobs.close()


def test_max_streams_holds_across_instances(
    pair: tuple[Gunicorn, Gunicorn], upstream: FakeUpstream
) -> None:
    a, b = pair
    streams = [held(a.url, "alice", "s1"), held(b.url, "alice", "s2")]
    try:
        assert upstream.wait_for(lambda: len(upstream.requests) == 2)
        for server in (a, b):
            over = post_chat(server.url, stage_id="s3", headers=as_("alice"))
            assert over.status_code == 429
            assert over.headers["Retry-After"] == "1"
            assert over.json() == {
                "error": "principal 'alice' has reached its limit of 2 concurrent streams; "
                "retry in 1 s",
                "limit": "max_streams",
                "principal": "alice",
            }
        assert len(upstream.requests) == 2  # refused before any upstream call
    finally:
        for stage_id, server in (("s1", a), ("s2", b)):
            requests.post(f"{server.url}/stages/{stage_id}/cancel", headers=as_("alice"), timeout=5)
        for stream in streams:
            stream.close()


def admitted_within_a_second(url: str, stage_id: str) -> None:
    """solo's one slot is free again: a stage starts within 1 s of the last one's end."""
    deadline = time.monotonic() + 1.0
    while True:
        response = post_chat(url, stage_id=stage_id, headers=as_("solo"), stream=False)
        if response.status_code == 200:
            assert response.json()["type"] == "text"
            return
        assert response.status_code == 429, response.text
        assert time.monotonic() < deadline, "the slot was not given back within 1 s"
        time.sleep(0.05)


def _done(url: str) -> None:
    stream = held(url, "solo", "w", model_name="fake?chunks=3")
    assert terminal(stream.read_to_end())[0]["event"] == "done"


def _error(url: str) -> None:
    stream = held(url, "solo", "w", model_name="fake?mode=status&status=500")
    assert terminal(stream.read_to_end())[0]["event"] == "error"


def _cancel(url: str) -> None:
    stream = held(url, "solo", "w")  # its headers came: the stage runs
    cancel = requests.post(f"{url}/stages/w/cancel", headers=as_("solo"), timeout=5)
    assert cancel.status_code == 202
    assert terminal(stream.read_to_end())[0]["event"] == "cancel"


def _disconnect(url: str) -> None:
    stream = held(url, "solo", "w", model_name="fake?chunks=500&interval=0.05")
    stream.read_until(b"event: chat_completion_chunk")
    stream.close()
    wait_for_status(url, "w", "cancelled", headers=as_("solo"))


def _grace_expiry(url: str) -> None:
    stream = held(url, "solo", "w", model_name="fake?chunks=500&interval=0.05", resumable=True)
    stream.read_until(b"event: chat_completion_chunk")
    stream.close()
    status = wait_for_status(url, "w", "cancelled", headers=as_("solo"))
    assert status["cancel_reason"] == "no client re-attached within 1 s"


@pytest.mark.parametrize("end", [_done, _error, _cancel, _disconnect, _grace_expiry])
def test_each_way_a_stage_ends_gives_its_slot_back(
    pair: tuple[Gunicorn, Gunicorn], end: Callable[[str], None]
) -> None:
    a, b = pair
    end(a.url)
    admitted_within_a_second(b.url, "next")


def test_a_shutdown_gives_the_slot_back(fake: FakeUpstream, redis_server: RedisServer) -> None:
    with (
        gunicorn_server(env(fake, redis_server, STAGESERVER_GRACEFUL_TIMEOUT="3")) as going,
        gunicorn_server(env(fake, redis_server)) as staying,
    ):
        stream = held(going.url, "solo", "sd", model_name="fake?chunks=100000&interval=0.05")
        stream.read_until(b"event: chat_completion_chunk")
        going.signal(signal.SIGTERM)
        assert terminal(stream.read_to_end())[0]["event"] == "error"
        admitted_within_a_second(staying.url, "after-shutdown")


def test_tokens_per_minute_counts_the_upstreams_usage(pair: tuple[Gunicorn, Gunicorn]) -> None:
    a, b = pair
    # The fake upstream reports 1 prompt token ("hi") and one per chunk: 6 each.
    first = post_chat(a.url, stage_id="t1", headers=as_("tok"), model_name="fake?chunks=5")
    assert terminal(parse_events(first.content))[0]["data"]["usage"] == {
        "prompt_tokens": 1,
        "completion_tokens": 5,
        "total_tokens": 6,
    }
    assert post_chat(b.url, stage_id="t2", headers=as_("tok")).status_code == 200  # 6 < 10
    refused = post_chat(a.url, stage_id="t3", headers=as_("tok"))  # 12 >= 10
    assert refused.status_code == 429
    assert refused.json()["limit"] == "tokens_per_minute"
    assert 55 <= int(refused.headers["Retry-After"]) <= 60


def test_requests_per_minute_counts_across_hosts(pair: tuple[Gunicorn, Gunicorn]) -> None:
    a, b = pair
    assert post_chat(a.url, stage_id="r1", headers=as_("rpm")).status_code == 200
    assert post_chat(b.url, stage_id="r2", headers=as_("rpm")).status_code == 200
    refused = post_chat(a.url, stage_id="r3", headers=as_("rpm"))
    assert refused.status_code == 429
    assert refused.json()["limit"] == "requests_per_minute"
    assert 55 <= int(refused.headers["Retry-After"]) <= 60


def test_limits_fail_closed_when_redis_is_down(
    pair: tuple[Gunicorn, Gunicorn], redis_server: RedisServer, upstream: FakeUpstream
) -> None:
    a, _ = pair
    redis_server.kill()
    try:
        refused = post_chat(a.url, stage_id="down", headers=as_("alice"))
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "1"
        assert refused.json()["error"].startswith("the stage store (Redis) is unavailable")
        assert upstream.requests == []
    finally:
        redis_server.start()
    deadline = time.monotonic() + 10
    while post_chat(a.url, stage_id="up", headers=as_("alice")).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def raw_request(port: int, header: bytes) -> tuple[int, dict[str, Any], str]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"GET /stages/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n" + header + b"\r\n"
        )
        wire = b""
        while piece := sock.recv(65536):
            wire += piece
    head, _, body = wire.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    challenge = next(line for line in lines if line.lower().startswith("www-authenticate:"))
    return int(lines[0].split()[1]), json.loads(body), challenge


@pytest.mark.parametrize(
    "header",
    [
        b"",
        b"Authorization: \r\n",
        b"Authorization: Bearer\r\n",
        b"Authorization: Bearer " + b"x" * 10_000 + b"\r\n",
        "Authorization: Bearer clé\r\n".encode(),
        b"Authorization: Bearer \xff\xfe\r\n",
    ],
)
def test_malformed_authorization_gets_401_never_500(
    pair: tuple[Gunicorn, Gunicorn], header: bytes
) -> None:
    status, body, challenge = raw_request(pair[0].port, header)
    assert status == 401
    assert set(body) == {"error"}
    assert challenge.startswith('WWW-Authenticate: Bearer realm="stageserver"')


def test_logs_and_metrics_name_the_principal_never_the_key(
    pair: tuple[Gunicorn, Gunicorn],
) -> None:
    a, _ = pair
    post_chat(a.url, stage_id="logged", headers={**as_("bob"), "X-Request-ID": "rid-logged"})

    def line_with(*parts: str) -> str:
        deadline = time.monotonic() + 5
        while True:
            lines = [line for line in a.log().splitlines() if all(p in line for p in parts)]
            if lines:
                return lines[0]
            assert time.monotonic() < deadline, f"no line with {parts}"
            time.sleep(0.05)

    assert "principal=bob" in line_with("stage_id=logged")
    access = line_with("rid-logged", '"POST /chat')
    assert access.endswith(" bob")
    metrics = requests.get(f"{a.url}/metrics", timeout=5).text
    assert 'stageserver_principal_stages_total{outcome="done",principal="bob"}' in metrics
    assert not [s for s in SECRETS.values() if s in metrics]
