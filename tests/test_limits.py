"""A principal's limits, written once and run on every topology (``testing/topology.py``):
one gunicorn worker, two hosts on one Redis, two hosts on a Redis Cluster.

A limit counts the principal's stages on every host: ``max_streams``,
``tokens_per_minute`` and ``requests_per_minute``. Over one, a request gets a 429 with
``Retry-After``, and the upstream is never asked. Each way a stage ends gives its slot
back within a second. On a cluster, the limits live on the first primary and the stages
they count on the other two: a limit holds across shards as it does on one Redis.

What only a shared store does (a host shut down gives its slot back to the other,
limits fail closed when Redis is down) is written for two hosts on Redis, and says so.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests

from testing.fake_upstream import FakeUpstream
from testing.servers import gunicorn_server
from testing.sse import OpenStream, parse_events, post_chat, terminal, wait_for_status
from testing.topology import Topology


def held(url: str, topology: Topology, role: str, stage_id: str, **fields: Any) -> OpenStream:
    """A stage of ``role`` that holds its slot: the upstream takes 30 s to its first token."""
    fields.setdefault("model_name", "fake?prefill=30")
    return post_chat(url, stage_id=stage_id, headers=topology.auth(role), open=True, **fields)


def admitted_within_a_second(url: str, topology: Topology, role: str, stage_id: str) -> None:
    """``role``'s slot is free again: a stage starts within 1 s of the last one's end."""
    deadline = time.monotonic() + 1.0
    while True:
        response = post_chat(url, stage_id=stage_id, headers=topology.auth(role), stream=False)
        if response.status_code == 200:
            assert response.json()["type"] == "text"
            return
        assert response.status_code == 429, response.text
        assert time.monotonic() < deadline, "the slot was not given back within 1 s"
        time.sleep(0.05)


def test_max_streams_holds_across_the_hosts_with_a_429_and_no_upstream_call(
    topology: Topology, upstream: FakeUpstream
) -> None:
    start, follow, name = topology.start, topology.follow, topology.principal("pair")
    first, second, over_id = topology.apart_from_limits("s", "pair", 3)
    streams = [held(start.url, topology, "pair", first), held(follow.url, topology, "pair", second)]
    try:
        assert upstream.wait_for(lambda: len(upstream.requests) == 2)
        for host in (start, follow):
            over = post_chat(host.url, stage_id=over_id, headers=topology.auth("pair"))
            assert over.status_code == 429
            assert over.headers["Retry-After"] == "1"
            assert over.json() == {
                "error": f"principal {name!r} has reached its limit of 2 concurrent streams; "
                "retry in 1 s",
                "limit": "max_streams",
                "principal": name,
            }
        assert len(upstream.requests) == 2  # refused before any upstream call
    finally:
        for stage_id, host in ((first, start), (second, follow)):
            requests.post(
                f"{host.url}/stages/{stage_id}/cancel", headers=topology.auth("pair"), timeout=5
            )
        for stream in streams:
            stream.close()
    admitted_within_a_second(follow.url, topology, "pair", over_id)


def _done(url: str, topology: Topology, stage_id: str) -> None:
    stream = held(url, topology, "solo", stage_id, model_name="fake?chunks=3")
    assert terminal(stream.read_to_end())[0]["event"] == "done"


def _error(url: str, topology: Topology, stage_id: str) -> None:
    stream = held(url, topology, "solo", stage_id, model_name="fake?mode=status&status=500")
    assert terminal(stream.read_to_end())[0]["event"] == "error"


def _cancel(url: str, topology: Topology, stage_id: str) -> None:
    stream = held(url, topology, "solo", stage_id)  # its headers came: the stage runs
    cancel = requests.post(
        f"{url}/stages/{stage_id}/cancel", headers=topology.auth("solo"), timeout=5
    )
    assert cancel.status_code == 202
    assert terminal(stream.read_to_end())[0]["event"] == "cancel"


def _disconnect(url: str, topology: Topology, stage_id: str) -> None:
    stream = held(url, topology, "solo", stage_id, model_name="fake?chunks=500&interval=0.05")
    stream.read_until(b"event: chat_completion_chunk")
    stream.close()  # not resumable: its stage is cancelled, its slot given back
    status = wait_for_status(url, stage_id, "cancelled", headers=topology.auth("solo"))
    assert status["cancel_reason"] == "client disconnected"


def _grace_expiry(url: str, topology: Topology, stage_id: str) -> None:
    stream = held(
        url, topology, "solo", stage_id, model_name="fake?chunks=500&interval=0.05",
        resumable=True,
    )  # fmt: skip
    stream.read_until(b"event: chat_completion_chunk")
    stream.close()
    status = wait_for_status(url, stage_id, "cancelled", headers=topology.auth("solo"))
    assert status["cancel_reason"] == "no client re-attached within 1 s"


@pytest.mark.parametrize("end", [_done, _error, _cancel, _disconnect, _grace_expiry])
def test_each_way_a_stage_ends_gives_its_slot_back_within_a_second(
    topology: Topology, end: Callable[[str, Topology, str], None]
) -> None:
    ended, then = topology.apart_from_limits(end.__name__.strip("_"), "solo", 2)
    end(topology.start.url, topology, ended)
    admitted_within_a_second(topology.follow.url, topology, "solo", then)


def test_tokens_per_minute_counts_the_upstreams_usage_across_the_hosts(
    topology: Topology,
) -> None:
    start, follow, tok = topology.start.url, topology.follow.url, topology.auth("tok")
    t1, t2, t3 = topology.apart_from_limits("t", "tok", 3)
    # The fake upstream reports 1 prompt token ("hi") and one per chunk: 6 each.
    first = post_chat(start, stage_id=t1, headers=tok, model_name="fake?chunks=5")
    assert terminal(parse_events(first.content))[0]["data"]["usage"] == {
        "prompt_tokens": 1,
        "completion_tokens": 5,
        "total_tokens": 6,
    }
    assert post_chat(follow, stage_id=t2, headers=tok).status_code == 200  # 6 < 10
    refused = post_chat(start, stage_id=t3, headers=tok)  # 12 >= 10
    assert refused.status_code == 429
    assert refused.json()["limit"] == "tokens_per_minute"
    assert 55 <= int(refused.headers["Retry-After"]) <= 60


def test_requests_per_minute_counts_across_the_hosts(topology: Topology) -> None:
    start, follow, rpm = topology.start.url, topology.follow.url, topology.auth("rpm")
    ids = topology.apart_from_limits("r", "rpm", 4)
    statuses = [
        post_chat(url, stage_id=stage_id, headers=rpm).status_code
        for url, stage_id in zip((start, follow, start), ids, strict=False)
    ]
    assert statuses == [200, 200, 429]
    refused = post_chat(follow, stage_id=ids[3], headers=rpm)
    assert refused.json()["limit"] == "requests_per_minute"
    assert 55 <= int(refused.headers["Retry-After"]) <= 60


# -- only where hosts share a store ------------------------------------------------------


def test_a_host_shut_down_gives_its_slot_back_to_the_other_on_redis(
    redis_hosts: Topology,
) -> None:
    staying = redis_hosts.follow
    with gunicorn_server({**redis_hosts.env, "STAGESERVER_GRACEFUL_TIMEOUT": "3"}) as going:
        stream = held(
            going.url, redis_hosts, "solo", "sd", model_name="fake?chunks=100000&interval=0.05"
        )
        stream.read_until(b"event: chat_completion_chunk")
        going.signal(signal.SIGTERM)
        assert terminal(stream.read_to_end())[0]["event"] == "error"
        admitted_within_a_second(staying.url, redis_hosts, "solo", "after-shutdown")


def test_limits_fail_closed_when_redis_is_down(
    redis_hosts: Topology, upstream: FakeUpstream
) -> None:
    a, redis_server, pair = redis_hosts.start, redis_hosts.redis, redis_hosts.auth("pair")
    assert redis_server is not None
    redis_server.kill()
    try:
        refused = post_chat(a.url, stage_id="down", headers=pair)
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "1"
        assert refused.json()["error"].startswith("the stage store (Redis) is unavailable")
        assert upstream.requests == []
    finally:
        redis_server.start()
    deadline = time.monotonic() + 10
    while post_chat(a.url, stage_id="up", headers=pair).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)
