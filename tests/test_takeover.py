"""A stage outlives its worker (issue 20, sections 4 to 6): gunicorn hosts on one real
redis-server, a host SIGKILLed, SIGTERMed or HUPed mid-answer, and what its clients, the
other host and the fake upstream see.

Every host runs one worker with a lease of 2 s, and continues in ``trailing`` mode: the
fake upstream continues a conversation that ends with the partial answer."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from stageserver.store.entries import events_of
from stageserver.store.keys import stage_keys
from testing.fake_upstream import FakeUpstream
from testing.hosts import kill_host, worker_of
from testing.servers import Gunicorn, RedisServer, gunicorn_server
from testing.sse import (
    OpenStream,
    assert_whole_once,
    chunk_text,
    parse_events,
    post_chat,
    read_rest,
    seq,
    stage_status,
    terminal,
    toks,
    with_ids,
)
from testing.takeover import assert_continued_from_the_durable_text, continuations, seen

SLOW = "fake?chunks=60&interval=0.05"  # 3 s: "tok0 " .. "tok59 "


def host_env(fake: FakeUpstream, store: RedisServer, **extra: str) -> dict[str, str]:
    return {
        "STAGESERVER_UPSTREAM_URL": fake.url,
        "STAGESERVER_STORE_URL": store.url,
        "STAGESERVER_OWNER_LEASE_SECONDS": "2",
        "STAGESERVER_UPSTREAM_CONTINUATION": "trailing",
        **extra,
    }


@pytest.fixture
def trailing(upstream: FakeUpstream) -> Iterator[FakeUpstream]:
    """The fake upstream, continuing a trailing assistant message (as llama-server does)."""
    upstream.defaults["continuation"] = "trailing"
    yield upstream
    upstream.defaults.clear()  # the fake is the session's


@pytest.fixture(scope="module")
def survivor(fake: FakeUpstream, redis_server: RedisServer) -> Iterator[Gunicorn]:
    """Host B: it lives through the module, and takes over what the other hosts leave."""
    with gunicorn_server(host_env(fake, redis_server)) as host:
        yield host


@pytest.fixture
def start_host() -> Iterator[Callable[[dict[str, str]], Gunicorn]]:
    """Start a host (A) for this test alone: stopped, if it still runs, at the end."""
    hosts: list[Gunicorn] = []

    def start(env: dict[str, str]) -> Gunicorn:
        hosts.append(Gunicorn(env))
        return hosts[-1]

    yield start
    for host in hosts:
        host.stop()


def start_background(host: Gunicorn, request_ids: str, count: int = 2) -> list[str]:
    """``count`` background responses of 100 chunks on ``host``, nobody attached; their
    ids. Their requests' ids are ``request_ids`` and their number."""
    body: dict[str, Any] = {
        "model": "fake?chunks=100&interval=0.05",
        "input": "hi",
        "background": True,
    }
    return [
        requests.post(
            f"{host.url}/v1/responses",
            json=body,
            headers={"X-Request-ID": f"{request_ids}{n}"},
            timeout=10,
        ).json()["id"]
        for n in range(count)
    ]


def settled_response(host: Gunicorn, response_id: str) -> dict[str, Any]:
    """The Response once it is no longer in progress, asked of ``host`` (30 s at most)."""
    deadline = time.monotonic() + 30
    url = f"{host.url}/v1/responses/{response_id}"
    while (answer := requests.get(url, timeout=5).json())["status"] == "in_progress":
        assert time.monotonic() < deadline, answer
        time.sleep(0.1)
    return dict(answer)


def wait_streaming(fake: FakeUpstream, request_id: str, chunks: int) -> None:
    """Until the upstream has sent ``chunks`` chunks of the stage's first request."""
    assert fake.wait_for(
        lambda: any(r.chunks_sent >= chunks for r in seen(fake, request_id)[:1])
    ), seen(fake, request_id)


# -- a host dies --------------------------------------------------------------------------


def test_a_watcher_on_another_host_gets_the_whole_answer_once_when_its_host_dies(
    trailing: FakeUpstream,
    redis_server: RedisServer,
    survivor: Gunicorn,
    start_host: Callable[[dict[str, str]], Gunicorn],
) -> None:
    a, b = start_host(host_env(trailing, redis_server)), survivor
    a_worker = worker_of(a)
    counted = continuations(b)
    stage_id = "t-kill"
    stream = post_chat(
        a.url,
        stage_id=stage_id,
        model_name=SLOW,
        resumable=True,
        headers={"X-Request-ID": stage_id},
        open=True,
    )
    with ThreadPoolExecutor(1) as pool:
        watcher = pool.submit(
            lambda: requests.get(f"{b.url}/stages/{stage_id}/events", timeout=60).content
        )
        stream.read_until(b"event: chat_completion_chunk", 20)
        kill_host(a)
        got_on_a = with_ids(read_rest(stream))
        watched = parse_events(watcher.result(timeout=60))

    continued = assert_whole_once(stage_id, watched, 60)
    delivered = assert_continued_from_the_durable_text(trailing, stage_id)
    before = watched[: watched.index(continued)]
    assert len([e for e in before if e.get("event") == "chat_completion_chunk"]) == delivered
    assert chunk_text(before) == toks(delivered)
    assert continued["data"] == {
        "stage_id": stage_id,
        "after": seq(continued) - 1,
        "reason": "owner_lost",
        "mode": "trailing",
        "model": SLOW,
    }
    # A's client got only what the log held: the watcher's first events, exactly.
    assert got_on_a and got_on_a == with_ids(watched)[: len(got_on_a)]

    status = stage_status(b.url, stage_id)
    assert (status["status"], status["text"]) == ("done", toks(60))
    [record] = status["continuations"]
    assert {k: record[k] for k in ("after", "reason", "mode", "outcome")} == {
        "after": seq(continued) - 1,
        "reason": "owner_lost",
        "mode": "trailing",
        "outcome": "ok",
    }
    assert (record["from_worker"], record["to_worker"]) == (a_worker, worker_of(b))

    # A's client resumes on B from the last event it got: the rest, each event once.
    rest = requests.get(
        f"{b.url}/stages/{stage_id}/events",
        headers={"Last-Event-ID": got_on_a[-1]["id"]},
        timeout=30,
    )
    assert rest.status_code == 200
    assert_whole_once(stage_id, got_on_a + parse_events(rest.content), 60)

    assert continuations(b) == counted + 1


def test_an_answer_with_reasoning_is_not_continued_by_the_host_that_takes_it_over(
    trailing: FakeUpstream,
    redis_server: RedisServer,
    survivor: Gunicorn,
    start_host: Callable[[dict[str, str]], Gunicorn],
) -> None:
    """As on its own worker (test_continuation), an answer that streamed reasoning is not
    continued after its worker died: its taker reads that from the store, and ends it with
    the refusal, instead of continuing the text as if there had been no reasoning."""
    a, b = start_host(host_env(trailing, redis_server)), survivor
    stage_id = "t-think"
    stream = post_chat(
        a.url,
        stage_id=stage_id,
        model_name=SLOW + "&reasoning=3",
        resumable=True,
        headers={"X-Request-ID": stage_id},
        open=True,
    )
    stream.read_until(b'"content":"tok2 "')
    assert stage_status(a.url, stage_id)["continuable"] is False
    kill_host(a)
    got_on_a = with_ids(read_rest(stream))

    rest = requests.get(
        f"{b.url}/stages/{stage_id}/events",
        headers={"Last-Event-ID": got_on_a[-1]["id"]},
        timeout=30,
    )
    assert rest.status_code == 200
    [end] = terminal(parse_events(rest.content))
    refusal = "it streamed tool calls or reasoning, which a continuation cannot extend"
    assert end["event"] == "error"
    assert refusal in end["data"]["error"]
    assert len(seen(trailing, stage_id)) == 1  # no continuation was asked of the upstream
    status = stage_status(b.url, stage_id)
    assert (status["status"], status["continuable"]) == ("error", False)
    [record] = status["continuations"]
    assert (record["reason"], record["outcome"], record["error"]) == (
        "owner_lost",
        "refused",
        refusal,
    )


def test_a_background_response_of_a_dead_host_completes_on_another(
    trailing: FakeUpstream,
    redis_server: RedisServer,
    survivor: Gunicorn,
    start_host: Callable[[dict[str, str]], Gunicorn],
) -> None:
    a, b = start_host(host_env(trailing, redis_server)), survivor
    body: dict[str, Any] = {"model": SLOW, "input": "hi", "background": True}
    created = requests.post(
        f"{a.url}/v1/responses", json=body, headers={"X-Request-ID": "bg-plain"}, timeout=10
    ).json()
    assert created["status"] == "in_progress"
    # Streamed too, so that it can be streamed again; its client leaves at once.
    streamed = requests.post(
        f"{a.url}/v1/responses",
        json={**body, "stream": True},
        headers={"X-Request-ID": "bg-stream"},
        stream=True,
        timeout=10,
    )
    first = OpenStream(streamed).read_until(b"event: response.created")
    streamed.close()
    replayable = parse_events(first)[0]["data"]["response"]["id"]
    for request_id in ("bg-plain", "bg-stream"):
        wait_streaming(trailing, request_id, 20)
    kill_host(a)

    answer = settled_response(b, created["id"])
    assert answer["status"] == "completed" and answer["error"] is None
    [item] = answer["output"]
    assert [part["text"] for part in item["content"]] == [toks(60)]
    for request_id in ("bg-plain", "bg-stream"):
        assert_continued_from_the_durable_text(trailing, request_id)

    whole = requests.get(
        f"{b.url}/v1/responses/{replayable}", params={"stream": "true"}, timeout=30
    )
    assert whole.status_code == 200, whole.text
    events = parse_events(whole.content)
    kinds = [e["event"] for e in events]
    assert [e["data"]["sequence_number"] for e in events] == list(range(len(events)))
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds.count("response.output_item.added") == 1
    assert "error" not in kinds and kinds[-1] == "response.completed"
    deltas = [e["data"]["delta"] for e in events if e["event"] == "response.output_text.delta"]
    assert "".join(deltas) == toks(60)
    [done] = [e for e in events if e["event"] == "response.output_text.done"]
    assert done["data"]["text"] == toks(60)
    final = events[-1]["data"]["response"]
    assert (final["id"], final["status"]) == (replayable, "completed")
    assert [part["text"] for item in final["output"] for part in item["content"]] == [toks(60)]

    # A resume from the middle gets the rest, each event once.
    after = 10
    rest = requests.get(
        f"{b.url}/v1/responses/{replayable}",
        params={"stream": "true", "starting_after": str(after)},
        timeout=30,
    )
    assert parse_events(rest.content) == events[after + 1 :]


# -- a host drains ------------------------------------------------------------------------


def test_sigterm_hands_a_hosts_stages_to_another_and_its_clients_resume_there(
    trailing: FakeUpstream,
    redis_server: RedisServer,
    survivor: Gunicorn,
    start_host: Callable[[dict[str, str]], Gunicorn],
) -> None:
    a, b = start_host(host_env(trailing, redis_server, STAGESERVER_GRACEFUL_TIMEOUT="6")), survivor
    a_worker = worker_of(a)
    background = start_background(a, "drain-bg")
    stage_id = "t-drain"
    stream = post_chat(
        a.url,
        stage_id=stage_id,
        model_name="fake?chunks=200&interval=0.05",
        resumable=True,
        headers={"X-Request-ID": stage_id},
        open=True,
    )
    chunks_before = stream.read_until(b"event: chat_completion_chunk", 10).count(
        b"event: chat_completion_chunk"
    )
    for n in range(2):
        wait_streaming(trailing, f"drain-bg{n}", 5)

    signalled = time.monotonic()
    a.signal(signal.SIGTERM)
    try:
        stream.read_to_end()
        cut = None
    except requests.RequestException as exc:
        cut = exc  # asserted last: what follows holds either way
    got_on_a = stream.events()
    stream.close()
    ended = time.monotonic() - signalled
    # It ran on with its client, and then ended without a terminal event, or an error.
    assert terminal(got_on_a) == []
    assert len([e for e in got_on_a if e.get("event") == "chat_completion_chunk"]) > chunks_before
    rest = requests.get(
        f"{b.url}/stages/{stage_id}/events",
        headers={"Last-Event-ID": with_ids(got_on_a)[-1]["id"]},
        timeout=30,
    )
    continued = assert_whole_once(stage_id, got_on_a + parse_events(rest.content), 200)
    assert continued["data"]["reason"] == "drain"
    assert_continued_from_the_durable_text(trailing, stage_id)

    for n, response_id in enumerate(background):
        answer = settled_response(b, response_id)
        assert (answer["status"], answer["error"]) == ("completed", None)
        assert [p["text"] for item in answer["output"] for p in item["content"]] == [toks(100)]
        assert_continued_from_the_durable_text(trailing, f"drain-bg{n}")
        [record] = stage_status(b.url, response_id)["continuations"]
        assert (record["reason"], record["outcome"]) == ("drain", "ok")
        assert (record["from_worker"], record["to_worker"]) == (a_worker, worker_of(b))

    # A's arbiter is gone, on its own, within 10 s of the SIGTERM.
    assert a.proc.wait(timeout=max(10 - (time.monotonic() - signalled), 0.1)) == 0
    assert "Traceback" not in a.log()
    # The response on A ended when its stage was handed off (before graceful_timeout),
    # with the end of its body: not cut when the worker went.
    assert cut is None, f"A's response was cut {ended:.1f} s after SIGTERM: {cut!r}"
    assert ended < 6


def test_a_graceful_reload_hands_background_responses_to_the_new_worker(
    trailing: FakeUpstream, start_host: Callable[[dict[str, str]], Gunicorn]
) -> None:
    # One host alone, on a Redis of its own: the new worker of the reload takes over.
    store = RedisServer()
    try:
        a = start_host(host_env(trailing, store, STAGESERVER_GRACEFUL_TIMEOUT="30"))
        [old] = a.worker_pids()
        old_worker = worker_of(a)
        background = start_background(a, "hup")
        for n in range(2):
            wait_streaming(trailing, f"hup{n}", 5)

        signalled = time.monotonic()
        a.signal(signal.SIGHUP)
        # The old worker exits within seconds, not at graceful_timeout.
        while Path(f"/proc/{old}").exists():
            assert time.monotonic() - signalled < 10, "the old worker still runs 10 s on"
            time.sleep(0.1)
        [_, new] = a.worker_pids()
        for n, response_id in enumerate(background):
            answer = settled_response(a, response_id)
            assert (answer["status"], answer["error"]) == ("completed", None)
            assert [p["text"] for item in answer["output"] for p in item["content"]] == [toks(100)]
            assert_continued_from_the_durable_text(trailing, f"hup{n}")
            [record] = stage_status(a.url, response_id)["continuations"]
            assert (record["reason"], record["outcome"]) == ("drain", "ok")
            assert record["from_worker"] == old_worker
            assert record["to_worker"] == f"{socket.gethostname()}:{new}"
        a.stop()
        assert "Traceback" not in a.log()
    finally:
        store.stop()


# -- a client ahead of the log ------------------------------------------------------------


def logged_events(client: Any, log_key: str) -> list[dict[str, Any]]:
    """The events a stage's log in Redis holds, parsed, in order."""
    wires = [wire for _, fields in client.xrange(log_key) for _, wire in events_of(fields)[0]]
    return parse_events(b"".join(wires))


def test_a_slow_store_holds_clients_back_and_a_resume_beyond_the_log_is_refused(
    trailing: FakeUpstream,
    redis_server: RedisServer,
    survivor: Gunicorn,
    start_host: Callable[[dict[str, str]], Gunicorn],
) -> None:
    a, b = start_host(host_env(trailing, redis_server)), survivor
    stage_id = "t-slow"
    _, log_key, _, _ = stage_keys(stage_id)
    client: Any = redis.Redis.from_url(redis_server.url)  # redis-py types results loosely
    stream = post_chat(
        a.url,
        stage_id=stage_id,
        model_name=SLOW,
        resumable=True,
        headers={"X-Request-ID": stage_id},
        open=True,
    )
    try:
        stream.read_until(b"event: chat_completion_chunk", 10)
        # A resume beyond what the stage has, on its own host: refused, in words.
        beyond = f"{stage_id}-chunk-9999"
        refused = requests.get(
            f"{a.url}/stages/{stage_id}/events", headers={"Last-Event-ID": beyond}, timeout=10
        )
        assert_refused(refused, stage_id)

        # Redis stops taking writes for 1.5 s (less than the store's 2 s socket timeout,
        # past which a worker would publish without it): A's stage goes on in memory, its
        # client does not.
        client.client_pause(1500, all=False)
        [upstream_request] = seen(trailing, stage_id)
        in_log = len(logged_events(client, log_key))
        assert trailing.wait_for(lambda: upstream_request.chunks_sent >= in_log + 5)
        kill_host(a)
        logged = [event["id"] for event in logged_events(client, log_key)]
        got_on_a = with_ids(read_rest(stream))
        assert got_on_a
        assert [e["id"] for e in got_on_a] == logged[: len(got_on_a)]
        assert upstream_request.chunks_sent > len(logged)  # A held more than it told

        # The stage runs (its owner is dead): a resume beyond its log, on B, is refused.
        assert stage_status(b.url, stage_id)["status"] == "running"
        refused = requests.get(
            f"{b.url}/stages/{stage_id}/events", headers={"Last-Event-ID": beyond}, timeout=10
        )
        assert_refused(refused, stage_id)
    finally:
        client.client_unpause()
        client.close()

    rest = requests.get(
        f"{b.url}/stages/{stage_id}/events",
        headers={"Last-Event-ID": got_on_a[-1]["id"]},
        timeout=30,
    )
    continued = assert_whole_once(stage_id, got_on_a + parse_events(rest.content), 60)
    assert continued["data"]["reason"] == "owner_lost"
    assert_continued_from_the_durable_text(trailing, stage_id)


def assert_refused(response: requests.Response, stage_id: str) -> None:
    """A resume after event 9999 of a running stage: one id-less ``error`` that says why."""
    assert response.status_code == 200
    [event] = parse_events(response.content)
    assert "id" not in event and event["event"] == "error"
    assert event["data"]["stage_id"] == stage_id
    assert f"stage {stage_id!r} cannot be resumed after event 9999" in event["data"]["error"]


# -- a host dies before its stage's opening is durable -----------------------------------


def opened_and_killed(host: Gunicorn, path: str, body: dict[str, Any], **headers: str) -> str:
    """Start a stream on ``host`` and SIGKILL the host as soon as it has answered with
    the stage's id (it has claimed the stage and rendered its opening by then), within
    the flush window of a second that its host is given: the stage's log in Redis holds
    none of its events. Returns the stage's id."""
    url = f"{host.url}{path}"
    started = requests.post(url, json=body, headers=headers, stream=True, timeout=10)
    assert started.status_code == 200, started.text
    stage_id = started.headers["X-Stage-Id"]
    kill_host(host)
    started.close()
    return stage_id


def durable_events(store: RedisServer, stage_id: str) -> list[dict[str, Any]]:
    client: Any = redis.Redis.from_url(store.url)  # redis-py types results loosely
    try:
        return logged_events(client, stage_keys(stage_id).log)
    finally:
        client.close()


#: A host that gathers its store's writes for a second (the most it may): one killed
#: within that second of starting a stage dies before anything of it is durable.
SLOW_FLUSH = {"STAGESERVER_STORE_FLUSH_WINDOW_SECONDS": "1"}
PLAIN_TEXT = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * 60,
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def test_a_response_whose_owner_died_before_its_opening_was_written_opens_on_its_taker(
    trailing: FakeUpstream,
    redis_server: RedisServer,
    survivor: Gunicorn,
    start_host: Callable[[dict[str, str]], Gunicorn],
) -> None:
    a, b = start_host(host_env(trailing, redis_server, **SLOW_FLUSH)), survivor
    body: dict[str, Any] = {"model": SLOW, "input": "hi", "background": True, "stream": True}
    key = {"Idempotency-Key": "opening-lost", "X-Request-ID": "opening-lost"}
    response_id = opened_and_killed(a, "/v1/responses", body, **key)
    assert durable_events(redis_server, response_id) == []  # the window this test is about

    # The client retries its create on B with the same key; B takes the response over.
    again = requests.post(f"{b.url}/v1/responses", json=body, headers=key, timeout=60)
    assert again.status_code == 200, again.text
    assert again.headers["X-Stage-Id"] == response_id
    assert again.content.startswith(
        b'event: response.created\ndata: {"type":"response.created","sequence_number":0,'
    )
    events = parse_events(again.content)
    assert [e["event"] for e in events] == PLAIN_TEXT
    assert [e["data"]["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["data"]["response"]
    assert (final["id"], final["status"]) == (response_id, "completed")
    opening = {**final, "status": "in_progress", "output": [], "usage": None}
    assert [e["data"]["response"] for e in events[:2]] == [opening, opening]
    deltas = [e["data"]["delta"] for e in events if e["event"] == "response.output_text.delta"]
    assert "".join(deltas) == toks(60)
    assert [p["text"] for item in final["output"] for p in item["content"]] == [toks(60)]
    [record] = stage_status(b.url, response_id)["continuations"]
    assert (record["reason"], record["outcome"], record["after"]) == ("owner_lost", "ok", 1)

    # Replayed on any host, from the log: the same bytes.
    replayed = requests.get(
        f"{b.url}/v1/responses/{response_id}", params={"stream": "true"}, timeout=30
    )
    assert replayed.content == again.content


def test_a_response_nobody_can_take_over_still_opens_before_its_error(
    trailing: FakeUpstream, start_host: Callable[[dict[str, str]], Gunicorn]
) -> None:
    # A Redis of its own, and no host that can take the response over: C knows none of
    # A's upstreams, so its reader ends the orphan for everyone (reader.py).
    store = RedisServer()
    try:
        a = start_host(host_env(trailing, store, **SLOW_FLUSH))
        c = start_host(
            {
                "STAGESERVER_UPSTREAMS": json.dumps({"elsewhere": {"url": trailing.url}}),
                "STAGESERVER_STORE_URL": store.url,
                "STAGESERVER_OWNER_LEASE_SECONDS": "2",
            }
        )
        body: dict[str, Any] = {"model": SLOW, "input": "hi", "background": True, "stream": True}
        key = {"Idempotency-Key": "opening-dead"}
        response_id = opened_and_killed(a, "/v1/responses", body, **key)
        assert durable_events(store, response_id) == []

        again = requests.post(f"{c.url}/v1/responses", json=body, headers=key, timeout=60)
        assert again.status_code == 200, again.text
        events = parse_events(again.content)
        assert [e["event"] for e in events] == [
            "response.created",
            "response.in_progress",
            "error",
            "response.failed",
        ]
        assert [e["data"]["sequence_number"] for e in events] == [0, 1, 2, 3]
        assert [e["data"]["response"]["id"] for e in events if "response" in e["data"]] == [
            response_id
        ] * 3
        assert "its lease lapsed 2 s after its last sign of life" in events[2]["data"]["message"]
        replayed = requests.get(
            f"{c.url}/v1/responses/{response_id}", params={"stream": "true"}, timeout=30
        )
        assert replayed.content == again.content
    finally:
        store.stop()


def test_a_chat_completion_whose_owner_died_before_its_first_chunk_was_written_has_its_role(
    trailing: FakeUpstream,
    redis_server: RedisServer,
    survivor: Gunicorn,
    start_host: Callable[[dict[str, str]], Gunicorn],
) -> None:
    a, b = start_host(host_env(trailing, redis_server, **SLOW_FLUSH)), survivor
    body = {"model": SLOW, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    stage_id = opened_and_killed(a, "/v1/chat/completions", body)
    assert durable_events(redis_server, stage_id) == []

    # Its client is gone with A; B takes the stage over, and a watcher reads it whole.
    watched = requests.get(f"{b.url}/stages/{stage_id}/events", timeout=60)
    assert watched.status_code == 200
    assert watched.content.startswith(b"retry: 3000\ndata: {")
    data = [block.partition(b"data: ")[2] for block in watched.content.split(b"\n\n")[:-1]]
    assert data[-1] == b"[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]
    assert deltas[0] == {"role": "assistant", "content": "tok0 "}
    assert [d for d in deltas[1:] if "role" in d] == []
    assert "".join(d.get("content") or "" for d in deltas) == toks(60)
    assert {chunk["id"] for chunk in chunks} == {stage_id}


# -- a Messages stream ---------------------------------------------------------------------


def test_a_messages_stream_of_a_dead_host_goes_on_elsewhere_each_event_once(
    trailing: FakeUpstream,
    redis_server: RedisServer,
    survivor: Gunicorn,
    start_host: Callable[[dict[str, str]], Gunicorn],
) -> None:
    a, b = start_host(host_env(trailing, redis_server)), survivor
    body: dict[str, Any] = {
        "model": SLOW,
        "max_tokens": 512,
        "messages": [{"role": "user", "content": "hi"}],
    }
    posted = requests.post(
        f"{a.url}/v1/messages",
        json={**body, "stream": True},
        headers={"X-Request-ID": "t-messages", "anthropic-version": "2023-06-01"},
        stream=True,
        timeout=10,
    )
    assert posted.status_code == 200
    message_id = posted.headers["X-Stage-Id"]
    stream = OpenStream(posted)
    with ThreadPoolExecutor(1) as pool:
        watcher = pool.submit(
            lambda: requests.get(f"{b.url}/stages/{message_id}/events", timeout=60).content
        )
        stream.read_until(b"event: content_block_delta", 20)
        kill_host(a)
        got_on_a = with_ids(read_rest(stream))
        watched = with_ids(parse_events(watcher.result(timeout=60)))

    # One answer: one text block, its 60 deltas, its end; ids on one counter, no gap, no
    # repeat; the continuation invisible.
    kinds = [e["event"] for e in watched]
    assert kinds == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 60,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert [e["id"] for e in watched] == [
        f"{message_id}-{kind}-{n}" for n, kind in enumerate(kinds)
    ]
    deltas = [e["data"]["delta"] for e in watched if e["event"] == "content_block_delta"]
    assert {d["type"] for d in deltas} == {"text_delta"}
    assert "".join(d["text"] for d in deltas) == toks(60)
    assert {e["data"]["index"] for e in watched[1:-2]} == {0}
    end = watched[-2]["data"]
    assert end["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    delivered = assert_continued_from_the_durable_text(trailing, "t-messages")
    # Summed over the segments (the continuation's reply may repeat a held-back space).
    assert end["usage"]["output_tokens"] >= 60
    assert 0 < delivered < 60
    # A's client got only what the log held: the watcher's first events, exactly.
    assert got_on_a and got_on_a == watched[: len(got_on_a)]
    [record] = stage_status(b.url, message_id)["continuations"]
    assert (record["reason"], record["mode"], record["outcome"]) == ("owner_lost", "trailing", "ok")

    # A's client resumes on B from the last event it got: the rest, each event once.
    rest = requests.get(
        f"{b.url}/stages/{message_id}/events",
        headers={"Last-Event-ID": got_on_a[-1]["id"]},
        timeout=30,
    )
    assert rest.status_code == 200
    assert got_on_a + with_ids(parse_events(rest.content)) == watched
    # Replayed whole on B: the same bytes the watcher read, but for the framing's first line.
    again = requests.get(f"{b.url}/stages/{message_id}/events", timeout=30)
    assert with_ids(parse_events(again.content)) == watched
