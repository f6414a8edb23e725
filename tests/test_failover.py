"""Upstream pools under a real gunicorn worker, against fake upstream replicas on their own
loopback ports: failover before the first chunk, none after it, Retry-After, ejection and
readmission, balance, model routing and fallbacks, and a disconnect during failover.

A replica that refuses is a loopback port nobody listens on; one that fails answers
through its server-wide defaults (``mode=status``); ``stop()`` kills one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any

import pytest
import requests

from stageserver import create_app
from stageserver.manager import manager_of
from testing.fake_upstream import FakeUpstream
from testing.metrics import Samples, scrape, value
from testing.servers import Gunicorn, free_port, gunicorn_server
from testing.sockets import open_stream, read_until
from testing.sse import chunk_text, parse_events, post_chat, stage_status, terminal

STREAM = "fake?chunks=5&interval=0.02"


@contextmanager
def replicas(*defaults: dict[str, str | int | float]) -> Iterator[list[FakeUpstream]]:
    """One fake upstream per ``defaults``, each on its own port."""
    with ExitStack() as stack:
        yield [stack.enter_context(FakeUpstream(defaults=d)) for d in defaults]


@contextmanager
def server(upstreams: dict[str, Any], **env: str) -> Iterator[Gunicorn]:
    settings = {
        "STAGESERVER_UPSTREAMS": json.dumps(upstreams),
        "STAGESERVER_HEARTBEAT_SECONDS": "0.5",
        **env,
    }
    with gunicorn_server(settings) as gunicorn:
        yield gunicorn


def refused_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


def chats(fake: FakeUpstream) -> list[Any]:
    return [r for r in fake.requests if r.path.endswith("/chat/completions")]


def run_stages(
    base: str,
    stage_ids: list[str],
    *,
    concurrency: int,
    model: str | Callable[[int], str] = STREAM,
    **fields: Any,
) -> dict[str, list[dict[str, Any]]]:
    """Each stage's events, the stages run ``concurrency`` at a time; ``model`` may be
    a function of the stage's number."""

    def one(n: int) -> list[dict[str, Any]]:
        name = model(n) if callable(model) else model
        response = post_chat(base, stage_id=stage_ids[n], model_name=name, **fields)
        assert response.status_code == 200, response.text
        return parse_events(response.content)

    with ThreadPoolExecutor(concurrency) as pool:
        return dict(zip(stage_ids, pool.map(one, range(len(stage_ids))), strict=True))


def metrics(gunicorn: Gunicorn) -> Samples:
    return scrape(requests.get(f"{gunicorn.url}/metrics", timeout=5).text)


def in_flight(gunicorn: Gunicorn, upstream: str, *urls: str) -> list[float]:
    samples = metrics(gunicorn)
    return [
        value(samples, "stageserver_replica_in_flight", upstream=upstream, replica=url)
        for url in urls
    ]


def wait(predicate: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.processes
def test_a_pool_with_a_refusing_and_a_failing_replica_completes_every_stage() -> None:
    refused = refused_url()
    with replicas({"mode": "status", "status": 500}, {}) as (failing, good):
        with server({"trio": {"urls": [refused, failing.url, good.url]}}) as gunicorn:
            ids = [f"trio-{n}" for n in range(30)]
            results = run_stages(gunicorn.url, ids, concurrency=5)
            for stage_id, events in results.items():
                assert [e["event"] for e in terminal(events)] == ["done"], events
                assert chunk_text(events) == "tok0 tok1 tok2 tok3 tok4 "
                status = stage_status(gunicorn.url, stage_id)
                assert status["upstream"] == "trio"
                *failed, served = status["attempts"]
                assert (served["replica"], served["outcome"]) == (good.url, "ok")
                assert {(a["replica"], a["outcome"]) for a in failed} <= {
                    (refused, "refused"),
                    (failing.url, "http_500"),
                }
            assert len(chats(good)) == 30
            assert in_flight(gunicorn, "trio", refused, failing.url, good.url) == [0, 0, 0]


@pytest.mark.processes
def test_a_replica_killed_under_load_fails_no_stage_that_had_not_streamed() -> None:
    def model(n: int) -> str:  # streams of several shapes: some in their prefill at the kill
        return f"fake?chunks=10&interval=0.02&prefill={n % 9 * 0.05:.2f}"

    with replicas({}, {}) as (doomed, survivor):
        with server({"pair": {"urls": [doomed.url, survivor.url]}}) as gunicorn:
            ids = [f"kill-{n}" for n in range(200)]
            with ThreadPoolExecutor(1) as background:
                running = background.submit(
                    run_stages, gunicorn.url, ids, concurrency=20, model=model
                )
                assert doomed.wait_for(lambda: len(chats(doomed)) >= 40, timeout=30)
                doomed.stop()
                results = running.result(timeout=120)
            errors = 0
            for stage_id, events in results.items():
                ends = terminal(events)
                assert len(ends) == 1 and ends[0] is events[-1], events
                chunks = [e for e in events if e.get("event") == "chat_completion_chunk"]
                ids_seen = [e["id"] for e in chunks]
                assert ids_seen == [f"{stage_id}-chunk-{n}" for n in range(len(chunks))]
                expected = "".join(f"tok{n} " for n in range(10))
                assert expected.startswith(chunk_text(events))  # nothing twice, no gap
                if ends[0]["event"] == "error":
                    errors += 1
                    assert chunks, f"{stage_id} failed before it streamed: {ends[0]}"
                    assert "dropped the connection mid-stream" in ends[0]["data"]["error"]
            statuses = [stage_status(gunicorn.url, i) for i in ids]
            failed_over = [s for s in statuses if len(s["attempts"]) > 1]
            assert failed_over, "no stage was waiting for its first chunk on the doomed replica"
            assert all(s["attempts"][-1]["replica"] == survivor.url for s in failed_over)
            assert all(s["status"] == "done" for s in failed_over)
            assert errors < 20  # only streams on the doomed replica at that moment
            wait(
                lambda: in_flight(gunicorn, "pair", doomed.url, survivor.url) == [0, 0],
                "in-flight back to 0",
            )


@pytest.mark.processes
def test_a_drop_after_the_first_chunk_is_one_error_and_no_retry() -> None:
    with replicas({}, {}) as pair:
        with server({"pair": {"urls": [r.url for r in pair]}}) as gunicorn:
            response = post_chat(
                gunicorn.url, stage_id="drop", model_name="fake?mode=drop&after=1&interval=0.05"
            )
            events = parse_events(response.content)
            assert [e.get("event") for e in events if "event" in e] == [
                "chat_completion_chunk",
                "error",
            ]
            assert chunk_text(events) == "tok0 "
            assert sum(len(chats(r)) for r in pair) == 1
            status = stage_status(gunicorn.url, "drop")
            assert [a["outcome"] for a in status["attempts"]] == ["ok"]
            assert status["error"].startswith("upstream 'pair' dropped the connection mid-stream")


@pytest.mark.processes
def test_429_with_retry_after_holds_the_replica_until_then() -> None:
    busy_for = 4
    with replicas({"mode": "status", "status": 429, "retry_after": busy_for}, {}) as (busy, ok):
        with server({"pair": {"urls": [busy.url, ok.url]}}) as gunicorn:
            batch = 0
            while not chats(busy):  # until a stage has met the 429
                assert batch < 10
                run_stages(gunicorn.url, [f"find-{batch}-{n}" for n in range(4)], concurrency=4)
                batch += 1
            held_since = time.monotonic()
            met = [
                s
                for n in range(4)
                if len((s := stage_status(gunicorn.url, f"find-{batch - 1}-{n}"))["attempts"]) > 1
            ]
            assert [a["outcome"] for a in met[0]["attempts"]] == ["http_429", "ok"]
            assert met[0]["status"] == "done"

            met_429 = len(chats(busy))  # one per stage that was already on its way there
            busy.defaults.clear()  # it could answer now, but it asked to be left alone
            run_stages(gunicorn.url, [f"held-{n}" for n in range(8)], concurrency=8)
            assert time.monotonic() - held_since < busy_for, "too slow to tell: rerun"
            assert len(chats(busy)) == met_429

            time.sleep(max(0.0, held_since + busy_for + 0.2 - time.monotonic()))
            slow = "fake?chunks=5&interval=0.1"
            run_stages(gunicorn.url, [f"after-{n}" for n in range(8)], concurrency=8, model=slow)
            assert len(chats(busy)) > met_429


@pytest.mark.processes
def test_an_ejected_replica_is_readmitted_once_it_recovers() -> None:
    with replicas({"mode": "status", "status": 500}, {}) as (sick, well):
        with server({"pair": {"urls": [sick.url, well.url]}}) as gunicorn:

            def ejections() -> float:
                return value(
                    metrics(gunicorn),
                    "stageserver_replica_ejections_total",
                    upstream="pair",
                    replica=sick.url,
                )

            batch = 0
            while ejections() < 1:
                assert batch < 20
                results = run_stages(
                    gunicorn.url, [f"sick-{batch}-{n}" for n in range(6)], concurrency=6
                )
                assert all(terminal(e)[0]["event"] == "done" for e in results.values())
                batch += 1
            failures = value(
                metrics(gunicorn),
                "stageserver_replica_failures_total",
                upstream="pair",
                replica=sick.url,
                kind="http_500",
            )
            assert failures == len(chats(sick)) >= 3
            tried = len(chats(sick))
            run_stages(gunicorn.url, [f"cooling-{n}" for n in range(6)], concurrency=6)
            assert len(chats(sick)) == tried  # ejected: not tried for its cool-down

            sick.defaults.clear()
            ready = requests.get(f"{gunicorn.url}/readyz", timeout=5).json()
            assert ready["upstreams"]["pair"]["replicas"][sick.url]["ok"] is True
            slow = "fake?chunks=5&interval=0.1"
            run_stages(gunicorn.url, [f"back-{n}" for n in range(6)], concurrency=6, model=slow)
            assert len(chats(sick)) > tried
            assert in_flight(gunicorn, "pair", sick.url, well.url) == [0, 0]


@pytest.mark.processes
def test_two_healthy_replicas_share_the_load_evenly() -> None:
    with replicas({}, {}) as pair:
        with server({"pair": {"urls": [r.url for r in pair]}}) as gunicorn:
            results = run_stages(gunicorn.url, [f"bal-{n}" for n in range(100)], concurrency=10)
            assert all(terminal(e)[0]["event"] == "done" for e in results.values())
            counts = [len(chats(r)) for r in pair]
            assert sum(counts) == 100
            assert all(40 <= c <= 60 for c in counts), counts


@pytest.mark.processes
def test_models_route_and_fallbacks_serve_a_broken_upstream() -> None:
    refused = [refused_url(), refused_url()]
    keys = {
        "ops": {"key": "ops-key-0123456789"},
        "brokenonly": {"key": "broken-key-0123456789", "upstreams": ["broken"]},
    }
    with replicas({}, {}, {}) as (main, second, spare):
        upstreams = {
            "main": {"url": main.url, "models": ["alpha"]},
            "second": {"url": second.url, "models": ["beta"]},
            "broken": {"urls": refused, "fallbacks": ["spare"], "retries": 5},
            "spare": {"url": spare.url, "models": ["gamma"]},
        }
        env = {"STAGESERVER_API_KEYS": json.dumps(keys), "STAGESERVER_LOG_FORMAT": "json"}
        with server(upstreams, **env) as gunicorn:
            ops = {"Authorization": "Bearer ops-key-0123456789"}

            def stage(stage_id: str, headers: dict[str, str], **fields: Any) -> dict[str, Any]:
                response = post_chat(gunicorn.url, stage_id=stage_id, headers=headers, **fields)
                assert terminal(parse_events(response.content))[0]["event"] == "done"
                status: dict[str, Any] = requests.get(
                    f"{gunicorn.url}/stages/{stage_id}", headers=headers, timeout=5
                ).json()
                return status

            assert stage("by-model", ops, model_name="beta")["upstream"] == "second"
            assert [r.body["model"] for r in chats(second)] == ["beta"]
            assert stage("by-default", ops, model_name="delta")["upstream"] == "main"

            status = stage("fell-back", ops, model_name="alpha", upstream="broken")
            assert status["upstream"] == "spare"
            attempts = status["attempts"]
            assert [(a["upstream"], a["outcome"]) for a in attempts] == [
                ("broken", "refused"),
                ("broken", "refused"),
                ("spare", "ok"),
            ]
            assert [a["replica"] for a in attempts[2:]] == [spare.url]
            assert {a["replica"] for a in attempts[:2]} == set(refused)
            assert chats(spare)[-1].body["model"] == "gamma"  # a model the fallback serves

            only = {"Authorization": "Bearer broken-key-0123456789"}
            assert stage("principal", only, model_name="alpha")["upstream"] == "spare"

            wait(lambda: '"stage_id":"fell-back"' in gunicorn.log(), "the stage's log line")
            line = next(
                json.loads(entry)
                for entry in gunicorn.log().splitlines()
                if '"stage_id":"fell-back"' in entry
            )
            assert (line["upstream"], line["replica"]) == ("spare", spare.url)
            assert line["attempts"].endswith(f"spare {spare.url} ok")


@pytest.mark.processes
def test_a_disconnect_during_failover_closes_every_attempt() -> None:
    with replicas({"prefill": 60}, {"prefill": 60}) as pair:
        slow = {"slow": {"urls": [r.url for r in pair], "attempt_timeout": 0.5}}
        with server(slow) as gunicorn:
            sock = open_stream(gunicorn.port, "gone", "fake")
            read_until(sock, b"\r\n\r\n")
            for replica in pair:
                assert replica.wait_for(partial(lambda r: len(chats(r)) == 1, replica))
            sock.close()
            for replica in pair:
                [request] = chats(replica)
                assert replica.wait_for(partial(lambda r: r.client_closed_at is not None, request))
                assert request.chunks_sent == 0 and not request.done_sent
            wait(
                lambda: stage_status(gunicorn.url, "gone")["status"] == "cancelled",
                "the cancel",
            )
            attempts = stage_status(gunicorn.url, "gone")["attempts"]
            assert [a["outcome"] for a in attempts] == ["first_token_timeout", "cancelled"]
            wait(
                lambda: in_flight(gunicorn, "slow", *(r.url for r in pair)) == [0, 0],
                "in-flight back to 0",
            )


def test_readyz_names_the_replicas_that_are_down(upstream: FakeUpstream) -> None:
    down, gone = refused_url(), [refused_url(), refused_url()]
    app = create_app(
        {"STAGESERVER_UPSTREAMS": {"pair": {"urls": [upstream.url, down]}, "gone": {"urls": gone}}}
    )
    try:
        response = app.test_client().get("/readyz")
        assert response.status_code == 503  # "gone" has no replica that answers
        reports = response.json["upstreams"]  # type: ignore[index]
        assert reports["pair"]["ok"] is True
        assert reports["pair"]["replicas"][upstream.url]["ok"] is True
        assert reports["pair"]["replicas"][down] == {"ok": False, "error": "could not connect"}
        assert reports["gone"] == {
            "ok": False,
            "replicas": {url: {"ok": False, "error": "could not connect"} for url in gone},
            "continuation": reports["pair"]["continuation"],
        }
        # The probe is the pools' active health check: what did not answer is ejected.
        pools = manager_of(app.extensions).replica_sets
        assert [r.ejected_until is None for r in pools["pair"].replicas] == [True, False]
    finally:
        manager_of(app.extensions).close()
