"""Who may do what across hosts: the two gunicorn hosts on one real redis-server that the
scenarios share (``testing/topology.py``), with API keys. A principal sees only its own
stages, on every host; stage ids are a principal's own; a malformed ``Authorization`` is
a 401, never a 500; logs and metrics name the principal, never its key.

The limits, held across hosts and given back, are ``test_limits.py``'s, on every topology.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest
import requests

from testing.sse import OpenStream, post_chat
from testing.topology import ROLES, Topology


def held(hosts: Topology, url: str, role: str, stage_id: str) -> OpenStream:
    """A stage that holds its slot: the upstream takes 30 s to its first token."""
    return post_chat(
        url, stage_id=stage_id, model_name="fake?prefill=30", headers=hosts.auth(role), open=True
    )


def test_another_principal_sees_no_stage_on_any_host(redis_hosts: Topology) -> None:
    a, b = redis_hosts.start, redis_hosts.follow
    alice, bob = redis_hosts.auth("alice"), redis_hosts.auth("bob")
    assert post_chat(a.url, stage_id="iso", headers=alice).status_code == 200
    for method, path in (
        ("GET", "/stages/{}"),
        ("GET", "/stages/{}/events"),
        ("POST", "/stages/{}/cancel"),
    ):
        for server in (a, b):
            theirs = requests.request(
                method, server.url + path.format("iso"), headers=bob, timeout=5
            )
            assert theirs.status_code == 404
            assert theirs.json() == {
                "error": "no stage 'iso' (unknown, or expired)",
                "field": "stage_id",
            }
    assert requests.get(f"{b.url}/stages/iso", headers=alice, timeout=5).json()["status"] == "done"


def test_stage_ids_are_namespaced_on_every_host(redis_hosts: Topology) -> None:
    a, b = redis_hosts.start, redis_hosts.follow
    alices, bobs = (
        held(redis_hosts, a.url, "alice", "same"),
        held(redis_hosts, b.url, "bob", "same"),
    )
    try:
        again = post_chat(b.url, stage_id="same", headers=redis_hosts.auth("alice"))
        assert again.status_code == 409
        assert again.json()["field"] == "stage_id"
    finally:
        for who, server in (("alice", a), ("bob", b)):
            requests.post(
                f"{server.url}/stages/same/cancel", headers=redis_hosts.auth(who), timeout=5
            )
        alices.close()
        bobs.close()


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
def test_malformed_authorization_gets_401_never_500(redis_hosts: Topology, header: bytes) -> None:
    status, body, challenge = raw_request(redis_hosts.start.port, header)
    assert status == 401
    assert set(body) == {"error"}
    assert challenge.startswith('WWW-Authenticate: Bearer realm="stageserver"')


def test_logs_and_metrics_name_the_principal_never_the_key(redis_hosts: Topology) -> None:
    a = redis_hosts.start
    post_chat(
        a.url, stage_id="logged", headers=redis_hosts.auth("bob", **{"X-Request-ID": "rid-logged"})
    )

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
    secrets = [redis_hosts.secret(role) for role in ROLES]
    assert not [s for s in secrets if s in metrics]
