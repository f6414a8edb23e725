"""The Python client (stageserver.client) against a real gunicorn and the fake upstream."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from contextlib import aclosing

import pytest

from stageserver.client import (
    AsyncStageClient,
    CancelEvent,
    ChunkEvent,
    Conflict,
    ContinuedEvent,
    DoneEvent,
    Gone,
    InvalidRequest,
    NotFound,
    StageClient,
    StageConnectionError,
    StageEvent,
    StreamLost,
    TextStageOutput,
    Unavailable,
    Usage,
)
from testing.fake_upstream import FakeUpstream
from testing.proxy import CuttingProxy
from testing.servers import Gunicorn, free_port, gunicorn_server
from testing.sse import estimated_usage, wait_for_status

MAX_BODY_BYTES = 2000
LONG = "fake?chunks=500&interval=0.05"


def make_server(fake: FakeUpstream, **env: str) -> Iterator[Gunicorn]:
    with gunicorn_server({"STAGESERVER_UPSTREAM_URL": fake.url, **env}) as gunicorn:
        yield gunicorn


@pytest.fixture(scope="module")
def server(fake: FakeUpstream) -> Iterator[Gunicorn]:
    yield from make_server(fake, STAGESERVER_MAX_BODY_BYTES=str(MAX_BODY_BYTES))


@pytest.fixture(scope="module")
def limited_server(fake: FakeUpstream) -> Iterator[Gunicorn]:
    """One stream at a time, and events that expire at once once a stage is over."""
    yield from make_server(
        fake, STAGESERVER_MAX_ACTIVE_STREAMS="1", STAGESERVER_EVENT_TTL_SECONDS="0.2"
    )


@pytest.fixture
def stage_client(server: Gunicorn) -> Iterator[StageClient]:
    with StageClient(server.url) as stage_client:
        yield stage_client


def expected_ids(stage_id: str, chunks: int, end: str = "done") -> list[str]:
    """The fake upstream sends ``chunks`` content chunks, one with the finish reason and
    one with the usage."""
    return [f"{stage_id}-chunk-{n}" for n in range(chunks + 2)] + [f"{stage_id}-{end}-{chunks + 2}"]


def tokens(count: int) -> str:
    return "".join(f"tok{n} " for n in range(count))


def text_of(events: list[StageEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, ChunkEvent))


def test_stream_yields_typed_events_and_sends_the_request_fields(
    stage_client: StageClient, upstream: FakeUpstream
) -> None:
    events = list(
        stage_client.stream(
            stage_id="s1",
            model_name="fake?chunks=3",
            user_prompt="hi there",
            system_prompt="be brief",
            max_tokens=2,
            temperature=0.5,
        )
    )
    assert [e.id for e in events] == ["s1-chunk-0", "s1-chunk-1", "s1-chunk-2", "s1-chunk-3"] + [
        "s1-done-4"
    ]
    assert [type(e) for e in events] == [ChunkEvent] * 4 + [DoneEvent]
    assert text_of(events) == "tok0 tok1 "
    usage_data = {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    assert events[-1] == DoneEvent(
        id="s1-done-4",
        stage_id="s1",
        data={"stage_id": "s1", "usage": usage_data},
        usage=Usage(4, 2, 6),
    )
    finish, usage = events[2:4]
    assert isinstance(finish, ChunkEvent) and isinstance(usage, ChunkEvent)
    assert finish.chunk["choices"][0]["finish_reason"] == "length"
    assert usage.chunk["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    body = upstream.requests[0].body
    assert body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi there"},
    ]
    assert (body["max_tokens"], body["temperature"]) == (2, 0.5)


def test_run_returns_the_text_and_status_tells_the_rest(stage_client: StageClient) -> None:
    output = stage_client.run(stage_id="r1", model_name="fake?chunks=3", user_prompt="a b")
    assert output == TextStageOutput("r1-chat-final", "text", "tok0 tok1 tok2 ", None)
    status = stage_client.status("r1")
    assert {k: status[k] for k in ("stage_id", "status", "text", "usage")} == {
        "stage_id": "r1",
        "status": "done",
        "text": "tok0 tok1 tok2 ",
        "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5},
    }


def test_run_of_a_failing_stage_returns_its_error(stage_client: StageClient) -> None:
    output = stage_client.run(
        stage_id="rf", model_name="fake?mode=status&status=500", user_prompt="x"
    )
    error = "upstream 'default' answered HTTP 500: fake upstream failure"
    assert output == TextStageOutput("rf-chat-error", "error", None, error)


def test_a_cut_connection_resumes_and_every_event_arrives_once(
    server: Gunicorn, upstream: FakeUpstream
) -> None:
    events: list[StageEvent] = []
    with CuttingProxy(server.port) as proxy, StageClient(proxy.url, api_key="k-1") as client:
        model = "fake?chunks=40&interval=0.03"
        stream = client.stream(stage_id="cut", model_name=model, user_prompt="hi", resumable=True)
        for event in stream:
            events.append(event)
            if len(events) == 5:
                assert proxy.cut() == 1
        sent = proxy.sent_by_clients()
    assert [e.id for e in events] == expected_ids("cut", 40)
    assert text_of(events) == tokens(40)
    assert_resumed_once(sent, "cut", [e.id for e in events])
    assert sent.count(b"Authorization: Bearer k-1\r\n") == 2
    assert [(r.path, r.done_sent) for r in upstream.requests] == [("/v1/chat/completions", True)]


def assert_resumed_once(sent: bytes, stage_id: str, ids: list[str]) -> None:
    """The client came back once, after an event it had received mid-stream."""
    assert sent.count(f"GET /stages/{stage_id}/events ".encode()) == 1
    resumed_after = re.findall(rb"Last-Event-ID: (\S+)", sent)
    assert len(resumed_after) == 1
    assert resumed_after[0].decode() in ids[4:-1]


def test_the_async_client_resumes_the_same_way(server: Gunicorn, upstream: FakeUpstream) -> None:
    async def read(url: str, proxy: CuttingProxy) -> list[StageEvent]:
        events: list[StageEvent] = []
        async with AsyncStageClient(url) as client:
            stream = client.stream(
                stage_id="acut",
                model_name="fake?chunks=40&interval=0.03",
                user_prompt="hi",
                resumable=True,
            )
            async for event in stream:
                events.append(event)
                if len(events) == 5:
                    assert proxy.cut() == 1
        return events

    with CuttingProxy(server.port) as proxy:
        events = asyncio.run(read(proxy.url, proxy))
        sent = proxy.sent_by_clients()
    assert [e.id for e in events] == expected_ids("acut", 40)
    assert text_of(events) == tokens(40)
    assert_resumed_once(sent, "acut", [e.id for e in events])
    assert upstream.requests[0].done_sent


def test_a_cut_stage_that_is_not_resumable_is_lost_and_says_why(
    server: Gunicorn, upstream: FakeUpstream
) -> None:
    with CuttingProxy(server.port) as proxy, StageClient(proxy.url) as client:
        stream = client.stream(stage_id="nr", model_name=LONG, user_prompt="x", resumable=False)
        assert next(stream).id == "nr-chunk-0"
        proxy.cut()
        with pytest.raises(StreamLost, match="the stage is not resumable, so the server cancel"):
            list(stream)
    assert wait_for_status(server.url, "nr", "cancelled")["cancel_reason"] == "client disconnected"
    assert upstream.wait_for(lambda: upstream.requests[0].client_closed_at is not None)


def test_a_cut_stage_left_to_the_server_default_ends_with_the_cancel_it_recorded(
    server: Gunicorn, upstream: FakeUpstream
) -> None:
    with CuttingProxy(server.port) as proxy, StageClient(proxy.url) as client:
        stream = client.stream(stage_id="dflt", model_name=LONG, user_prompt="x")
        first = next(stream)
        proxy.cut()
        rest = list(stream)
    last = rest[-1]
    chunks = sum(isinstance(e, ChunkEvent) for e in [first, *rest])
    data = {"stage_id": "dflt", "reason": "client disconnected", "usage": estimated_usage(chunks)}
    assert last == CancelEvent(
        id=last.id,
        stage_id="dflt",
        data=data,
        reason=str(data["reason"]),
        usage=Usage(5, chunks, 5 + chunks, estimated=True),
    )
    ids = [e.id for e in [first, *rest]]
    assert ids == [f"dflt-chunk-{n}" for n in range(len(ids) - 1)] + [f"dflt-cancel-{len(ids) - 1}"]
    assert upstream.requests[0].client_closed_at is not None


def test_breaking_out_disconnects_and_cancels_a_stage_that_is_not_resumable(
    stage_client: StageClient, server: Gunicorn, upstream: FakeUpstream
) -> None:
    for event in stage_client.stream(stage_id="brk", model_name=LONG, user_prompt="x"):
        if event.id == "brk-chunk-2":
            break
    assert upstream.wait_for(lambda: upstream.requests[0].client_closed_at is not None)
    assert not upstream.requests[0].done_sent
    assert wait_for_status(server.url, "brk", "cancelled")["cancel_reason"] == "client disconnected"


def test_the_async_client_disconnects_when_its_stream_is_closed(
    server: Gunicorn, upstream: FakeUpstream
) -> None:
    async def read_three() -> list[str]:
        ids: list[str] = []
        async with AsyncStageClient(server.url) as client:
            stream = client.stream(stage_id="abrk", model_name=LONG, user_prompt="x")
            async with aclosing(stream) as events:
                async for event in events:
                    ids.append(event.id)
                    if len(ids) == 3:
                        break
        return ids

    assert asyncio.run(read_three()) == ["abrk-chunk-0", "abrk-chunk-1", "abrk-chunk-2"]
    assert upstream.wait_for(lambda: upstream.requests[0].client_closed_at is not None)
    status = wait_for_status(server.url, "abrk", "cancelled")
    assert status["cancel_reason"] == "client disconnected"


def test_a_resumable_stage_left_by_its_client_is_picked_up_by_attach(
    stage_client: StageClient, upstream: FakeUpstream
) -> None:
    first: list[StageEvent] = []
    model = "fake?chunks=30&interval=0.03"
    for event in stage_client.stream(
        stage_id="att", model_name=model, user_prompt="x", resumable=True
    ):
        first.append(event)
        if len(first) == 3:
            break
    rest = list(stage_client.attach("att", last_event_id=first[-1].id))
    assert [e.id for e in first + rest] == expected_ids("att", 30)
    assert text_of(first + rest) == tokens(30)
    assert (
        list(stage_client.attach("att", last_event_id=rest[-1].id)) == []
    )  # nothing after the end
    assert [r.done_sent for r in upstream.requests] == [True]


def test_cancel_ends_the_stream_with_a_cancel_event(
    stage_client: StageClient, server: Gunicorn, upstream: FakeUpstream
) -> None:
    events: list[StageEvent] = []
    for event in stage_client.stream(stage_id="cx", model_name=LONG, user_prompt="x"):
        events.append(event)
        if len(events) == 2:
            assert stage_client.cancel("cx") == {"stage_id": "cx", "status": "cancelling"}
    last = events[-1]
    chunks = len(events) - 1
    data = {"stage_id": "cx", "reason": "cancelled by request", "usage": estimated_usage(chunks)}
    assert last == CancelEvent(
        id=last.id,
        stage_id="cx",
        data=data,
        reason=str(data["reason"]),
        usage=Usage(5, chunks, 5 + chunks, estimated=True),
    )
    assert [e.id for e in events] == [f"cx-chunk-{n}" for n in range(len(events) - 1)] + [
        f"cx-cancel-{len(events) - 1}"
    ]
    assert upstream.wait_for(lambda: upstream.requests[0].client_closed_at is not None)
    with pytest.raises(Conflict) as again:
        stage_client.cancel("cx")
    assert (again.value.status, again.value.message) == (409, "stage 'cx' has already finished")


def test_invalid_requests_name_their_fields(
    stage_client: StageClient, upstream: FakeUpstream
) -> None:
    with pytest.raises(InvalidRequest) as unknown:
        stage_client.run(stage_id="e1", model_name="fake", user_prompt="x", upstream="nope")
    assert unknown.value.status == 400
    assert unknown.value.fields == [
        {"field": "upstream", "message": "unknown upstream 'nope'; configured: default"}
    ]
    with pytest.raises(InvalidRequest) as invalid:
        list(stage_client.stream(stage_id="a b", model_name="fake", user_prompt="x", max_tokens=0))
    assert invalid.value.status == 422
    assert invalid.value.fields == [
        {"field": "stage_id", "message": "must be 1 to 128 characters of A-Z a-z 0-9 . _ : -"},
        {"field": "max_tokens", "message": "must be from 1 to 4096 (got 0)"},
    ]
    with pytest.raises(InvalidRequest) as too_large:
        stage_client.run(stage_id="e2", model_name="fake", user_prompt="x" * MAX_BODY_BYTES)
    assert too_large.value.status == 413
    assert too_large.value.fields == [
        {"field": "body", "message": f"request body is larger than {MAX_BODY_BYTES} bytes"}
    ]
    assert upstream.requests == []


def test_unknown_stages_are_not_found(stage_client: StageClient) -> None:
    message = "no stage 'none' (unknown, or expired)"
    for call in (
        stage_client.status,
        stage_client.cancel,
        lambda stage_id: list(stage_client.attach(stage_id)),
    ):
        with pytest.raises(NotFound) as missing:
            call("none")
        assert (missing.value.status, missing.value.message) == (404, message)


def test_a_running_stage_id_conflicts(stage_client: StageClient) -> None:
    running = stage_client.stream(stage_id="busy", model_name=LONG, user_prompt="x")
    assert next(running).id == "busy-chunk-0"
    with pytest.raises(Conflict) as conflict:
        stage_client.run(stage_id="busy", model_name="fake", user_prompt="x")
    assert conflict.value.message == (
        "stage 'busy' is still running; wait for it, cancel it, or use another stage_id"
    )
    running.close()


def test_expired_events_are_gone_and_a_full_worker_is_unavailable(limited_server: Gunicorn) -> None:
    with StageClient(limited_server.url) as client:
        assert client.run(stage_id="old", model_name="fake", user_prompt="x").type == "text"
        time.sleep(0.3)  # past the event TTL; the next stage sweeps the expired
        running = client.stream(stage_id="full", model_name=LONG, user_prompt="x")
        assert next(running).id == "full-chunk-0"
        with pytest.raises(Gone) as gone:
            list(client.attach("old"))
        assert gone.value.message == (
            "the events of stage 'old' have expired; its status is at /stages/old"
        )
        with pytest.raises(Unavailable) as unavailable:
            client.run(stage_id="more", model_name="fake", user_prompt="x")
        assert (unavailable.value.status, unavailable.value.retry_after) == (503, 1.0)
        assert unavailable.value.body["reason"] == "overload"
        client.cancel("full")
        assert isinstance(list(running)[-1], CancelEvent)


def test_the_async_client_runs_cancels_and_raises_the_same_errors(server: Gunicorn) -> None:
    async def session() -> None:
        async with AsyncStageClient(server.url) as client:
            output = await client.run(stage_id="ar", model_name="fake?chunks=2", user_prompt="x")
            assert output == TextStageOutput("ar-chat-final", "text", "tok0 tok1 ", None)
            assert (await client.status("ar"))["status"] == "done"
            events = client.stream(stage_id="ac", model_name=LONG, user_prompt="x")
            async with aclosing(events) as stream:
                async for event in stream:
                    if event.id == "ac-chunk-1":
                        assert (await client.cancel("ac"))["status"] == "cancelling"
            assert isinstance(event, CancelEvent) and event.reason == "cancelled by request"
            with pytest.raises(NotFound):
                await client.status("none")

    asyncio.run(session())


def test_a_server_that_is_not_there_is_a_connection_error() -> None:
    with StageClient(f"http://127.0.0.1:{free_port()}") as client:
        with pytest.raises(StageConnectionError, match="no answer from stageserver"):
            client.status("x")
        with pytest.raises(StageConnectionError, match="no answer from stageserver"):
            list(client.stream(stage_id="x", model_name="fake", user_prompt="x"))


@pytest.mark.processes
def test_an_answer_continued_after_its_upstream_failed_reads_as_one_with_a_marker() -> None:
    """The upstream drops the stream after 3 of 6 chunks and continues it when asked: the
    client yields the chunks, one ``ContinuedEvent`` where the answer was cut, the rest of
    the chunks, then ``DoneEvent``."""
    with FakeUpstream() as fake:
        fake.defaults["continuation"] = "trailing"
        env = {
            "STAGESERVER_UPSTREAM_URL": fake.url,
            "STAGESERVER_UPSTREAM_CONTINUATION": "trailing",
        }
        with gunicorn_server(env) as server, StageClient(server.url) as stage_client:
            events = list(
                stage_client.stream(
                    stage_id="cont-1",
                    model_name="fake?chunks=6&mode=drop&after=3",
                    user_prompt="hi",
                )  # fmt: skip
            )
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["ChunkEvent"] * 3 + ["ContinuedEvent"] + ["ChunkEvent"] * 5 + ["DoneEvent"]
    continued = events[3]
    assert isinstance(continued, ContinuedEvent)
    assert (continued.after, continued.reason, continued.mode) == (2, "upstream_failed", "trailing")
    assert continued.id == "cont-1-continued-3"
    assert continued.model == "fake?chunks=6&mode=drop&after=3"
    assert text_of(events) == tokens(6)
