"""The metrics that deploy/prometheus's alerts and deploy/grafana's dashboard need beside
the stage families: whose fault an error was, each replica's state in each worker, the
shared store's reachability, and the workers themselves (tests/test_deploy_prometheus.py
reads the workers' under gunicorn).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest
from flask.testing import FlaskClient

from stageserver.errors import (
    AllAttemptsFailed,
    ContinuationFailed,
    LeaseLost,
    NoReplicaAvailable,
    ServerShuttingDown,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamUnavailable,
)
from stageserver.manager import manager_of
from stageserver.telemetry import metrics
from testing.apps import app_client
from testing.fake_upstream import FakeUpstream
from testing.metrics import Samples, scrape, value
from testing.servers import RedisServer, free_port
from testing.sse import parse_events, terminal


def scraped(client: FlaskClient) -> Samples:
    return scrape(client.get("/metrics").text)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def status_error(status: int) -> UpstreamStatusError:
    return UpstreamStatusError(f"upstream answered HTTP {status}", status)


@pytest.mark.parametrize(
    ("failure", "fault"),
    [
        # The upstream refused the request itself: the caller's to fix.
        (status_error(400), "caller"),
        (status_error(404), "caller"),
        (status_error(413), "caller"),
        (AllAttemptsFailed("two attempts", last=status_error(422)), "caller"),
        # stageserver's own key (401, 403), a timeout (408), a limit (429), a 5xx.
        (status_error(401), "upstream"),
        (status_error(403), "upstream"),
        (status_error(408), "upstream"),
        (status_error(429), "upstream"),
        (status_error(503), "upstream"),
        (AllAttemptsFailed("two attempts", last=status_error(500)), "upstream"),
        (UpstreamUnavailable("refused"), "upstream"),
        (UpstreamProtocolError("dropped", dropped=True), "upstream"),
        (NoReplicaAvailable("every replica at its max_in_flight"), "upstream"),
        # A continuation refused with a 400 is stageserver's request, not the caller's.
        (ContinuationFailed("cut, then refused", last=status_error(400)), "upstream"),
        (ServerShuttingDown("shutting down"), "stageserver"),
        (LeaseLost("lost"), "stageserver"),
        (None, "stageserver"),
    ],
)
def test_whose_fault_a_stages_error_was(failure: BaseException | None, fault: str) -> None:
    assert metrics.fault_of(failure) == fault


def test_stage_errors_are_counted_by_fault(upstream: FakeUpstream) -> None:
    with app_client({"STAGESERVER_UPSTREAM_URL": upstream.url}) as client:
        before = scraped(client)
        models = {
            "f-caller": "fake?mode=status&status=400",
            "f-upstream": "fake?mode=status&status=500",
            "f-done": "fake?chunks=2",
        }
        for stage_id, model in models.items():
            body = {"stage_id": stage_id, "model_name": model, "user_prompt": "hi", "stream": True}
            events = parse_events(client.post("/chat", json=body).data)
            assert terminal(events)[0]["event"] == ("done" if stage_id == "f-done" else "error")
        manager = manager_of(client.application.extensions)
        for stage_id in models:  # their listeners have run once the stage is settled
            stage = manager.stages.get(stage_id)
            assert stage is not None
            stage.wait(5)
        after = scraped(client)

    def delta(fault: str) -> float:
        name = "stageserver_stage_errors_total"
        labels = {"upstream": "default", "fault": fault}
        return value(after, name, **labels) - value(before, name, **labels)

    assert {fault: delta(fault) for fault in metrics.FAULTS} == {
        "caller": 1,
        "upstream": 1,
        "stageserver": 0,
    }


def test_replica_admitted_follows_ejection_and_readmission(upstream: FakeUpstream) -> None:
    """/readyz's probe ejects a replica that does not answer and readmits it once it does:
    the gauge is 1, then 0, then 1 again, and the other replica's stays 1."""
    port = free_port()
    down = f"http://127.0.0.1:{port}/v1"
    pool = {"gpu": {"urls": [upstream.url, down]}}
    with app_client({"STAGESERVER_UPSTREAMS": pool}) as client:

        def admitted(url: str) -> float:
            return value(
                scraped(client), "stageserver_replica_admitted", upstream="gpu", replica=url
            )

        assert (admitted(upstream.url), admitted(down)) == (1, 1)  # from the pool's start
        assert client.get("/readyz").status_code == 200  # one replica answers
        assert (admitted(upstream.url), admitted(down)) == (1, 0)
        with FakeUpstream(port):
            time.sleep(1.05)  # /readyz's answer is kept for a second
            assert client.get("/readyz").status_code == 200
            assert (admitted(upstream.url), admitted(down)) == (1, 1)


@pytest.mark.processes
def test_store_unavailable_while_redis_is_down(upstream: FakeUpstream) -> None:
    """With no stage running: the sweeper's look, every quarter of a lease, sees Redis go
    and come back."""
    redis_server = RedisServer()
    config = {
        "STAGESERVER_UPSTREAM_URL": upstream.url,
        "STAGESERVER_STORE_URL": redis_server.url,
        "STAGESERVER_OWNER_LEASE_SECONDS": 1.0,
    }
    try:
        with app_client(config) as client:

            def unavailable() -> float:
                return value(scraped(client), "stageserver_store_unavailable")

            assert unavailable() == 0
            redis_server.kill()
            wait_until(lambda: unavailable() == 1, "the store seen unavailable")
            redis_server.start()
            wait_until(lambda: unavailable() == 0, "the store seen again")
            body = {"stage_id": "after", "model_name": "fake", "user_prompt": "hi", "stream": True}
            events = parse_events(client.post("/chat", json=body).data)
            assert terminal(events)[0]["event"] == "done"
    finally:
        redis_server.stop()


def test_this_process_is_its_own_worker_without_gunicorn(flask_client: FlaskClient) -> None:
    """Without gunicorn's multiprocess directory, the worker families are this process's."""
    samples = scraped(flask_client)
    pid = str(os.getpid())
    assert value(samples, "stageserver_worker_cpu_seconds_total", pid=pid) > 0
    # A Python process with Flask loaded: tens of megabytes at least.
    assert value(samples, "stageserver_worker_resident_memory_bytes", pid=pid) > 10_000_000
