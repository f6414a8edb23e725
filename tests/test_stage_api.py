"""Watching, resuming and cancelling a stage, written once and run on every topology
(``testing/topology.py``): one gunicorn worker with its stages in memory, two hosts on
one Redis, and two hosts on a Redis Cluster.

A stage starts on the topology's ``start`` host and is followed, resumed and cancelled
through its ``follow`` host (the same one when there is only one); where the store is
sharded, a scenario runs on a stage of every shard. What a client reads is the same
bytes whichever way stageserver is deployed."""

from __future__ import annotations

import json
import time
from functools import partial

import requests

from testing.fake_upstream import FakeUpstream, UpstreamRequest
from testing.sse import (
    assert_each_once,
    assert_resumed_exactly_once,
    estimated_usage,
    parse_events,
    post_chat,
    stage_status,
    terminal,
    toks,
    wait_for_status,
    with_ids,
)
from testing.takeover import seen
from testing.topology import Topology

CHUNK = b"event: chat_completion_chunk"


def closed(request: UpstreamRequest) -> bool:
    """The stage closed its upstream request: what tells the upstream to stop."""
    return request.client_closed_at is not None


def test_a_resumable_stage_survives_a_drop_and_is_resumed_exactly_once_on_every_shard(
    topology: Topology, upstream: FakeUpstream
) -> None:
    start, follow, alice = topology.start.url, topology.follow.url, topology.auth("alice")
    for stage_id in topology.on_every_shard("res"):
        stream = post_chat(
            start, stage_id=stage_id, model_name="fake?chunks=40&interval=0.03", resumable=True,
            headers=topology.auth("alice", **{"X-Request-ID": stage_id}), open=True,
        )  # fmt: skip
        stream.read_until(CHUNK, 5)
        stream.close()
        got = with_ids(stream.events())

        time.sleep(0.2)
        status = stage_status(follow, stage_id, alice)
        assert status["status"] == "running", (stage_id, status)  # the drop did not cancel it
        rest = requests.get(
            f"{follow}/stages/{stage_id}/events",
            headers={**alice, "Last-Event-ID": got[-1]["id"]},
            timeout=30,
        )
        assert rest.status_code == 200, (stage_id, rest.text)
        assert rest.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert_resumed_exactly_once(stage_id, got, parse_events(rest.content), 40)
        final = stage_status(follow, stage_id, alice)
        assert (final["status"], final["text"]) == ("done", toks(40)), stage_id
        assert seen(upstream, stage_id)[0].done_sent


def test_last_event_id_query_parameter_for_eventsource(topology: Topology) -> None:
    alice = topology.auth("alice")
    post_chat(
        topology.start.url, stage_id="q", model_name="fake?chunks=3", user_prompt="x",
        headers=alice, timeout=10,
    )  # fmt: skip
    replay = requests.get(
        f"{topology.follow.url}/stages/q/events?last_event_id=q-chunk-2", headers=alice, timeout=10
    )
    assert [e["id"] for e in parse_events(replay.content)] == ["q-chunk-3", "q-chunk-4", "q-done-5"]


def test_a_last_event_id_of_another_stage_is_a_400_naming_the_header(topology: Topology) -> None:
    alice = topology.auth("alice")
    post_chat(
        topology.start.url, stage_id="b", user_prompt="x", stream=False, headers=alice, timeout=10
    )
    response = requests.get(
        f"{topology.follow.url}/stages/b/events",
        headers={**alice, "Last-Event-ID": "other-chunk-1"},
        timeout=10,
    )
    assert response.status_code == 400
    assert response.json()["field"] == "Last-Event-ID"


def test_a_watcher_keeps_a_resumable_stage_alive_past_the_grace(topology: Topology) -> None:
    start, follow, alice = topology.start.url, topology.follow.url, topology.auth("alice")
    model = "fake?chunks=40&interval=0.05"
    stream = post_chat(
        start, stage_id="keep", model_name=model, resumable=True, headers=alice, open=True
    )
    stream.read_until(CHUNK)
    stream.close()
    # Nobody is attached where it started for 2 s (twice the grace), but a watcher
    # follows it.
    followed = requests.get(f"{follow}/stages/keep/events", headers=alice, timeout=20)
    assert [e["event"] for e in terminal(parse_events(followed.content))] == ["done"]
    assert stage_status(start, "keep", alice)["status"] == "done"


def test_a_resumable_stage_nobody_reattaches_is_cancelled_after_the_grace(
    topology: Topology, upstream: FakeUpstream
) -> None:
    model = "fake?chunks=500&interval=0.05"
    stream = post_chat(
        topology.start.url, stage_id="grace", model_name=model, resumable=True,
        headers=topology.auth("alice", **{"X-Request-ID": "grace"}), open=True,
    )  # fmt: skip
    stream.read_until(CHUNK, 1)
    stream.close()
    status = wait_for_status(
        topology.follow.url, "grace", "cancelled", headers=topology.auth("alice")
    )
    assert status["cancel_reason"] == "no client re-attached within 1 s"
    [request] = seen(upstream, "grace")
    assert upstream.wait_for(partial(closed, request))
    assert not request.done_sent


def test_a_cancel_reaches_every_watcher_and_closes_the_upstream_on_every_shard(
    topology: Topology, upstream: FakeUpstream
) -> None:
    start, follow, alice = topology.start.url, topology.follow.url, topology.auth("alice")
    for stage_id in topology.on_every_shard("c"):
        owner = post_chat(
            start, stage_id=stage_id, model_name="fake?chunks=500&interval=0.05",
            headers=topology.auth("alice", **{"X-Request-ID": stage_id}), open=True,
        )  # fmt: skip
        owner.read_until(CHUNK, 1)
        watcher = requests.get(
            f"{follow}/stages/{stage_id}/events", headers=alice, stream=True, timeout=10
        )
        response = requests.post(f"{follow}/stages/{stage_id}/cancel", headers=alice, timeout=5)
        assert response.status_code == 202, (stage_id, response.text)
        assert response.json() == {"stage_id": stage_id, "status": "cancelling"}

        events = owner.read_to_end()
        assert_each_once(stage_id, events, "cancel")
        # The watcher replayed the stage from its start: the cancel's number follows the
        # chunks, and the owner got as many.
        cancel_number = watcher.content.count(CHUNK)
        usage = estimated_usage(cancel_number)
        for got in (parse_events(watcher.content), events):
            assert [e["data"] for e in terminal(got)] == [
                {"stage_id": stage_id, "reason": "cancelled by request", "usage": usage}
            ]
        assert watcher.content.endswith(
            b"id: %s-cancel-%d\nevent: cancel\n" % (stage_id.encode(), cancel_number)
            + b'data: {"stage_id":"%s","reason":"cancelled by request","usage":{"prompt_tokens"'
            % stage_id.encode()
            + b':5,"completion_tokens":%d,"total_tokens":%d,"estimated":true}}\n\n'
            % (cancel_number, cancel_number + 5)
        )
        [request] = seen(upstream, stage_id)
        assert upstream.wait_for(partial(closed, request))
        assert not request.done_sent
        cancelled = wait_for_status(follow, stage_id, "cancelled", headers=alice)
        assert cancelled["cancel_reason"] == "cancelled by request"
        again = requests.post(f"{follow}/stages/{stage_id}/cancel", headers=alice, timeout=5)
        assert again.status_code == 409


def test_a_cancel_of_an_unknown_stage_is_a_404_on_every_host(topology: Topology) -> None:
    for host in topology.hosts:
        cancel = requests.post(
            f"{host.url}/stages/none/cancel", headers=topology.auth("alice"), timeout=5
        )
        assert cancel.status_code == 404


def test_the_status_of_a_finished_stage(topology: Topology) -> None:
    alice = topology.auth("alice")
    post_chat(
        topology.start.url, stage_id="st", model_name="fake?chunks=2", user_prompt="a b",
        stream=False, headers=alice,
    )  # fmt: skip
    status = stage_status(topology.follow.url, "st", alice)
    assert {k: status[k] for k in ("stage_id", "status", "text", "finish_reason", "usage")} == {
        "stage_id": "st",
        "status": "done",
        "text": "tok0 tok1 ",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4},
    }
    assert status["first_token_seconds"] <= status["duration_seconds"]
    assert json.dumps(status)
