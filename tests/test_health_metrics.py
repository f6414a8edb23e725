"""/healthz, /readyz, /metrics and the stage log line: in one process through the Flask
test client, and across two gunicorn workers in prometheus_client's multiprocess mode."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from flask.testing import FlaskClient

from stageserver.telemetry.logs import JsonFormatter
from testing.apps import app_client, settle
from testing.fake_upstream import FakeUpstream
from testing.metrics import Samples, scrape, value
from testing.servers import RedisServer, free_port, gunicorn_server
from testing.sse import parse_events, post_chat, terminal


@pytest.fixture
def flask_client(upstream: FakeUpstream) -> Iterator[FlaskClient]:
    with app_client({"STAGESERVER_UPSTREAM_URL": upstream.url}) as test_client:
        yield test_client


def models_requests(fake: FakeUpstream) -> list[str]:
    return [r.path for r in fake.requests if r.path.endswith("/models")]


# -- health --------------------------------------------------------------------------


def test_healthz_answers_without_asking_the_upstream(
    flask_client: FlaskClient, upstream: FakeUpstream
) -> None:
    response = flask_client.get("/healthz")
    assert (response.status_code, response.json) == (200, {"status": "ok"})
    assert upstream.requests == []


def test_readyz_asks_each_upstream_for_models_at_most_once_a_second(
    upstream: FakeUpstream,
) -> None:
    upstreams = {"a": {"url": upstream.url, "api_key": "sk-ready"}, "b": {"url": upstream.url}}
    with app_client({"STAGESERVER_UPSTREAMS": upstreams}) as client:
        for _ in range(5):
            response = client.get("/readyz")
            assert response.status_code == 200
            assert response.json is not None
            assert response.json["status"] == "ready"
            reports = response.json["upstreams"]
            assert {name: report["ok"] for name, report in reports.items()} == {
                "a": True,
                "b": True,
            }
        assert models_requests(upstream) == ["/v1/models", "/v1/models"]  # one per upstream
        auth = sorted(r.headers.get("authorization", "") for r in upstream.requests)
        assert auth == ["Bearer not-needed", "Bearer sk-ready"]  # each upstream's own client

        time.sleep(1.05)  # the cached answer expires
        assert client.get("/readyz").status_code == 200
        assert len(models_requests(upstream)) == 4


def test_readyz_is_503_and_names_the_upstream_that_does_not_answer(
    upstream: FakeUpstream,
) -> None:
    down = f"http://127.0.0.1:{free_port()}/v1"
    upstreams = {"default": {"url": upstream.url}, "down": {"url": down}}
    with app_client({"STAGESERVER_UPSTREAMS": upstreams}) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json
    assert body is not None
    assert body["status"] == "not_ready"
    assert body["upstreams"]["default"]["ok"] is True
    assert body["upstreams"]["down"] == {
        "ok": False,
        "error": "could not connect",
        # Kind openai: it continues no answer cut short, and no probe asks it.
        "continuation": {
            "mode": "none",
            "source": "default",
            "detail": "OpenAI's API continues no answer",
        },
    }


def test_readyz_without_any_upstream_is_503() -> None:
    with app_client({"STAGESERVER_UPSTREAM_URL": None}) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json == {
        "status": "not_ready",
        "upstreams": {},
        "error": "no upstream is configured: set STAGESERVER_UPSTREAM_URL or STAGESERVER_UPSTREAMS",
    }


# -- metrics and logs in one process ------------------------------------------------


def _run_stage(
    client: FlaskClient, stage_id: str, model: str, *, buffered: bool = True, **extra: Any
) -> Any:
    body = {"stage_id": stage_id, "model_name": model, "user_prompt": "hi", "stream": True}
    headers = {"X-Request-ID": f"rid-{stage_id}"}
    return client.post("/chat", json=body | extra, headers=headers, buffered=buffered)


def _settled(client: FlaskClient, *stage_ids: str) -> None:
    """Wait for the stages' runner threads: a client may read the terminal event before
    the runner has logged it and run the stage's on_finish callbacks."""
    for stage_id in stage_ids:
        settle(client, stage_id)


def test_metrics_count_stages_by_outcome_and_upstream(
    flask_client: FlaskClient, upstream: FakeUpstream
) -> None:
    before = scrape(flask_client.get("/metrics").text)

    assert (
        terminal(parse_events(_run_stage(flask_client, "m-done", "fake").data))[0]["event"]
        == "done"
    )
    failed = parse_events(_run_stage(flask_client, "m-err", "fake?mode=status&status=500").data)
    assert terminal(failed)[0]["event"] == "error"
    # A cancel while the stage streams.
    streaming = _run_stage(
        flask_client, "m-cancel", "fake?chunks=500&interval=0.01", buffered=False
    )
    pieces = streaming.iter_encoded()
    wire = b""
    while b"event: chat_completion_chunk" not in wire:
        wire += next(pieces)
    assert flask_client.post("/stages/m-cancel/cancel").status_code == 202
    wire += b"".join(pieces)
    assert terminal(parse_events(wire))[0]["event"] == "cancel"
    cancelled_chunks = wire.count(b"event: chat_completion_chunk")
    _settled(flask_client, "m-done", "m-err", "m-cancel")

    response = flask_client.get("/metrics")
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    after = scrape(response.text)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    up = {"upstream": "default"}
    assert delta("stageserver_stages_total", outcome="done", **up) == 1
    assert delta("stageserver_stages_total", outcome="error", **up) == 1
    assert delta("stageserver_stages_total", outcome="cancel", **up) == 1
    assert delta("stageserver_upstream_errors_total", kind="UpstreamStatusError", **up) == 1
    assert delta("stageserver_chunks_relayed_total", **up) == 7 + cancelled_chunks
    assert delta("stageserver_time_to_first_token_seconds_count", **up) == 2  # not the error
    assert delta("stageserver_stream_duration_seconds_count", outcome="error", **up) == 1
    assert value(after, "stageserver_active_streams", **up) == 0


def test_one_structured_log_line_per_stage(
    flask_client: FlaskClient, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="stageserver.stage")
    assert b"event: done" in _run_stage(flask_client, "log-ok", "fake?chunks=3").data
    assert (
        b"event: error" in _run_stage(flask_client, "log-err", "fake?mode=status&status=503").data
    )
    _settled(flask_client, "log-ok", "log-err")
    lines = {r.stage_id: r for r in caplog.records if r.name == "stageserver.stage"}  # type: ignore[attr-defined]
    assert len([r for r in caplog.records if r.name == "stageserver.stage"]) == 2

    ok = lines["log-ok"]
    assert re.fullmatch(
        r"stage_id=log-ok outcome=done upstream=default request_id=rid-log-ok "
        r"ttft_ms=[\d.]+ chunks=5 duration_ms=[\d.]+",
        ok.getMessage(),
    )
    entry = json.loads(JsonFormatter().format(ok))
    assert {k: entry[k] for k in ("level", "logger", "stage_id", "outcome", "upstream")} == {
        "level": "info",
        "logger": "stageserver.stage",
        "stage_id": "log-ok",
        "outcome": "done",
        "upstream": "default",
    }
    assert (entry["request_id"], entry["chunks"], entry["pid"]) == ("rid-log-ok", 5, os.getpid())
    assert entry["ttft_ms"] > 0 and entry["duration_ms"] >= entry["ttft_ms"]

    err = lines["log-err"]
    assert err.getMessage() == (
        "stage_id=log-err outcome=error upstream=default request_id=rid-log-err ttft_ms=- "
        f"chunks=0 duration_ms={err.duration_ms} error_kind=UpstreamStatusError "  # type: ignore[attr-defined]
        "error=\"upstream 'default' answered HTTP 503: fake upstream failure\""
    )
    assert json.loads(JsonFormatter().format(err))["ttft_ms"] is None


# -- several gunicorn workers -------------------------------------------------------


def _json_lines(log: str) -> list[dict[str, Any]]:
    # Only whole lines: a worker may be halfway through writing the last one.
    complete = log[: log.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.startswith("{")]


def _stage_lines(log: str) -> dict[str, list[dict[str, Any]]]:
    lines: dict[str, list[dict[str, Any]]] = {}
    for entry in _json_lines(log):
        if entry["logger"] == "stageserver.stage":
            lines.setdefault(entry["stage_id"], []).append(entry)
    return lines


def _booted(log: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", log)]


@contextmanager
def _stopped(pid: int) -> Iterator[None]:
    """Hold a worker still (SIGSTOP), so that the other one accepts every connection."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _wait(predicate: Any, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _metrics_dir_of(pid: int) -> Path:
    """The multiprocess metrics directory whose files the worker ``pid`` holds open."""
    prefix = f"{tempfile.gettempdir()}/stageserver-metrics-"
    held = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # a descriptor closed meanwhile
            target = os.readlink(fd)
            if target.startswith(prefix) and target.endswith(f"_{pid}.db"):
                held.add(Path(target).parent)
    [directory] = held
    return directory


def test_metrics_add_up_across_two_workers_and_survive_a_dead_worker(
    upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    env = {
        "STAGESERVER_UPSTREAM_URL": upstream.url,
        "STAGESERVER_STORE_URL": redis_server.url,
        "STAGESERVER_LOG_FORMAT": "json",
    }
    metrics_dir: Path | None = None
    with gunicorn_server(env, workers=2) as server:
        _wait(lambda: len(_booted(server.log())) == 2, "two workers")
        workers = _booted(server.log())

        # Which worker accepts a connection is the kernel's choice; to give each worker a
        # share, the other one is stopped (SIGSTOP) while a batch runs.
        outcomes: dict[str, str] = {}
        chunks_seen: dict[str, int] = {}
        scrapes: list[Samples] = []
        with ThreadPoolExecutor(4) as pool:
            for batch, (serving, stopped) in enumerate([workers, workers[::-1]]):
                jobs = {
                    f"b{batch}-{n}": "fake?mode=status&status=500"
                    if n == 3
                    else "fake?chunks=5&interval=0.02"
                    for n in range(4)
                }
                with _stopped(stopped):
                    runs = {
                        sid: pool.submit(
                            post_chat,
                            server.url,
                            stage_id=sid,
                            model_name=model,
                            headers={"X-Request-ID": f"rid-{sid}"},
                        )
                        for sid, model in jobs.items()
                    }
                    for stage_id, run in runs.items():
                        response = run.result()
                        assert response.status_code == 200, response.text
                        events = parse_events(response.content)
                        outcomes[stage_id] = terminal(events)[0]["event"]
                        chunks_seen[stage_id] = sum(
                            e.get("event") == "chat_completion_chunk" for e in events
                        )
                    batch_ids = set(jobs)
                    _wait(
                        lambda ids=batch_ids: ids <= set(_stage_lines(server.log())),
                        "stage lines",
                    )
                    lines = _stage_lines(server.log())
                    assert {lines[sid][0]["pid"] for sid in batch_ids} == {serving}
        # The directory gunicorn_conf.py made: the one whose files these workers hold open
        # (a name alone could match a directory an earlier run's killed server left, its
        # worker's pid reused by one of these).
        metrics_dir = _metrics_dir_of(workers[0])

        # A stage's relay gives its replica back after its end, once the upstream's body
        # has been read out: wait for that, so that the two scrapes see one state.
        _wait(
            lambda: (
                not any(
                    v
                    for (name, _), v in scrape(requests.get(f"{server.url}/metrics").text).items()
                    if name == "stageserver_replica_in_flight"
                )
            ),
            "every replica given back",
        )
        for stopped in workers:  # a scrape answered by each worker in turn
            with _stopped(stopped):
                scrapes.append(scrape(requests.get(f"{server.url}/metrics", timeout=5).text))
        # Either worker gives the same answer; the workers' CPU and memory, read from
        # /proc at each scrape, move between two: the same workers, other values.
        moving = (
            "stageserver_worker_cpu_seconds_total",
            "stageserver_worker_resident_memory_bytes",
        )
        steady = [{k: v for k, v in s.items() if k[0] not in moving} for s in scrapes]
        assert steady[0] == steady[1], "either worker gives the same answer"
        assert [sorted(k for k in s if k[0] in moving) for s in scrapes] == [
            sorted((name, frozenset({("pid", str(pid))})) for name in moving for pid in workers)
        ] * 2
        totals = scrapes[0]

        lines = _stage_lines(server.log())
        assert set(lines) == set(outcomes) and all(len(v) == 1 for v in lines.values())
        for stage_id, outcome in outcomes.items():
            line = lines[stage_id][0]
            assert (line["outcome"], line["request_id"], line["upstream"]) == (
                outcome,
                f"rid-{stage_id}",
                "default",
            )
            assert line["chunks"] == chunks_seen[stage_id]
            assert (line["ttft_ms"] is None) == (outcome == "error")
        access = {
            e["request_id"]: e
            for e in _json_lines(server.log())
            if e["logger"] == "gunicorn.access" and e["path"] == "/chat"
        }
        for stage_id in outcomes:
            assert (access[f"rid-{stage_id}"]["method"], access[f"rid-{stage_id}"]["status"]) == (
                "POST",
                200,
            )
        done = sum(o == "done" for o in outcomes.values())
        failed = sum(o == "error" for o in outcomes.values())
        assert (done, failed) == (3 * len(outcomes) // 4, len(outcomes) // 4)

        up = {"upstream": "default"}
        assert value(totals, "stageserver_stages_total", outcome="done", **up) == done
        assert value(totals, "stageserver_stages_total", outcome="error", **up) == failed
        assert (
            value(totals, "stageserver_upstream_errors_total", kind="UpstreamStatusError", **up)
            == failed
        )
        assert value(totals, "stageserver_chunks_relayed_total", **up) == sum(chunks_seen.values())
        assert value(totals, "stageserver_time_to_first_token_seconds_count", **up) == done
        assert (
            value(totals, "stageserver_stream_duration_seconds_count", outcome="done", **up) == done
        )
        assert value(totals, "stageserver_active_streams", **up) == 0

        # Both workers die mid-stream (SIGKILL: no clean-up of their own). Counters keep
        # their values; the dead workers' active streams are no longer counted.
        held = post_chat(
            server.url, stage_id="held", model_name="fake?chunks=1000&interval=0.02", open=True
        )
        held.read_until(b"event: chat_completion_chunk")
        live = scrape(requests.get(f"{server.url}/metrics", timeout=5).text)
        assert value(live, "stageserver_active_streams", **up) == 1
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        held.close()
        _wait(lambda: len(_booted(server.log())) == 4, "two new workers")

        def answered() -> Samples | None:
            try:
                return scrape(requests.get(f"{server.url}/metrics", timeout=5).text)
            except (requests.ConnectionError, requests.Timeout):
                return None  # the new workers are still importing (slow on a loaded machine)

        _wait(lambda: answered() is not None, "/metrics after the restart")
        after = answered()
        assert after is not None
        assert value(after, "stageserver_active_streams", **up) == 0
        for name, labels in [
            ("stageserver_stages_total", {"outcome": "done"}),
            ("stageserver_stages_total", {"outcome": "error"}),
            ("stageserver_chunks_relayed_total", {}),
        ]:
            assert value(after, name, **labels, **up) == value(totals, name, **labels, **up)
    assert metrics_dir is not None and not metrics_dir.exists(), "on_exit removed it"
