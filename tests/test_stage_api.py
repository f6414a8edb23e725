"""Watching, resuming and cancelling a stage, through a real gunicorn gevent worker."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import requests

from testing.fake_upstream import FakeUpstream
from testing.servers import Gunicorn, gunicorn_server
from testing.sse import (
    assert_resumed_exactly_once,
    estimated_usage,
    parse_events,
    post_chat,
    stage_status,
    terminal,
    wait_for_status,
)


@pytest.fixture(scope="module")
def server(fake: FakeUpstream) -> Iterator[Gunicorn]:
    env = {
        "STAGESERVER_UPSTREAM_URL": fake.url,
        "STAGESERVER_HEARTBEAT_SECONDS": "5",
        "STAGESERVER_RESUME_GRACE_SECONDS": "1",
    }
    with gunicorn_server(env) as gunicorn:
        yield gunicorn


def test_resumable_stage_survives_a_drop_and_resumes_exactly_once(
    server: Gunicorn, upstream: FakeUpstream
) -> None:
    model = "fake?chunks=30&interval=0.03"
    stream = post_chat(server.url, stage_id="res", model_name=model, resumable=True, open=True)
    stream.read_until(b"event: chat_completion_chunk", 4)
    stream.close()
    got = [e for e in stream.events() if "id" in e]

    time.sleep(0.2)
    assert stage_status(server.url, "res")["status"] == "running"  # the drop did not cancel it
    rest = requests.get(
        f"{server.url}/stages/res/events", headers={"Last-Event-ID": got[-1]["id"]}, timeout=10
    )
    assert rest.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert_resumed_exactly_once("res", got, parse_events(rest.content), 30)
    assert upstream.requests[0].done_sent


def test_last_event_id_query_parameter_for_eventsource(server: Gunicorn) -> None:
    post_chat(server.url, stage_id="q", model_name="fake?chunks=3", user_prompt="x", timeout=10)
    replay = requests.get(f"{server.url}/stages/q/events?last_event_id=q-chunk-2", timeout=10)
    assert [e["id"] for e in parse_events(replay.content)] == ["q-chunk-3", "q-chunk-4", "q-done-5"]


def test_bad_last_event_id(server: Gunicorn) -> None:
    post_chat(server.url, stage_id="b", user_prompt="x", stream=False, timeout=10)
    response = requests.get(
        f"{server.url}/stages/b/events", headers={"Last-Event-ID": "other-chunk-1"}, timeout=10
    )
    assert response.status_code == 400
    assert response.json()["field"] == "Last-Event-ID"


def test_resumable_stage_nobody_reattaches_is_cancelled_after_grace(
    server: Gunicorn, upstream: FakeUpstream
) -> None:
    model = "fake?chunks=500&interval=0.05"
    stream = post_chat(server.url, stage_id="grace", model_name=model, resumable=True, open=True)
    stream.read_until(b"event: chat_completion_chunk", 1)
    stream.close()
    status = wait_for_status(server.url, "grace", "cancelled")
    assert status["cancel_reason"] == "no client re-attached within 1 s"
    assert upstream.wait_for(lambda: upstream.requests[0].client_closed_at is not None)
    assert not upstream.requests[0].done_sent


def test_cancel_reaches_every_watcher_and_closes_the_upstream(
    server: Gunicorn, upstream: FakeUpstream
) -> None:
    owner = post_chat(
        server.url, stage_id="c", model_name="fake?chunks=500&interval=0.05", open=True
    )
    owner.read_until(b"event: chat_completion_chunk", 1)
    watcher = requests.get(f"{server.url}/stages/c/events", stream=True, timeout=10)
    response = requests.post(f"{server.url}/stages/c/cancel", timeout=5)
    assert response.status_code == 202
    assert response.json() == {"stage_id": "c", "status": "cancelling"}

    owner.read_until(b"event: cancel")
    owner.close()
    # The watcher replayed the stage from its start: the cancel's number follows the chunks.
    cancel_number = watcher.content.count(b"event: chat_completion_chunk")
    usage = estimated_usage(cancel_number)
    for events in (parse_events(watcher.content), owner.events()):
        assert [e["data"] for e in terminal(events)] == [
            {"stage_id": "c", "reason": "cancelled by request", "usage": usage}
        ]
    assert watcher.content.endswith(
        b"id: c-cancel-%d\nevent: cancel\n" % cancel_number
        + b'data: {"stage_id":"c","reason":"cancelled by request","usage":{"prompt_tokens":5,'
        + b'"completion_tokens":%d,"total_tokens":%d,"estimated":true}}\n\n'
        % (cancel_number, cancel_number + 5)
    )
    assert upstream.wait_for(lambda: upstream.requests[0].client_closed_at is not None)
    assert wait_for_status(server.url, "c", "cancelled")["cancel_reason"] == "cancelled by request"
    again = requests.post(f"{server.url}/stages/c/cancel", timeout=5)
    assert again.status_code == 409


def test_cancel_unknown_stage(server: Gunicorn) -> None:
    assert requests.post(f"{server.url}/stages/none/cancel", timeout=5).status_code == 404


def test_status_of_a_finished_stage(server: Gunicorn) -> None:
    post_chat(
        server.url, stage_id="st", model_name="fake?chunks=2", user_prompt="a b", stream=False
    )
    status = stage_status(server.url, "st")
    assert {k: status[k] for k in ("stage_id", "status", "text", "finish_reason", "usage")} == {
        "stage_id": "st",
        "status": "done",
        "text": "tok0 tok1 ",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4},
    }
    assert status["first_token_seconds"] <= status["duration_seconds"]
    assert json.dumps(status)
