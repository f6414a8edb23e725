"""Traces: a gunicorn worker's spans, kept by the SDK's in-memory exporter and appended to
a file as JSON lines (STAGESERVER_TRACING=memory, STAGESERVER_TRACING_FILE); the OTLP
exporter against a real HTTP endpoint; and nothing of OpenTelemetry when tracing is off.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stageserver import ConfigError, create_app
from stageserver.manager import manager_of
from stageserver.telemetry.tracing import tracing_mode
from testing.fake_upstream import FakeUpstream
from testing.servers import ROOT, Gunicorn, gunicorn_server
from testing.sockets import open_stream, read_until
from testing.sse import parse_events, post_chat, terminal, wait_for_status

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def failing() -> Iterator[FakeUpstream]:
    with FakeUpstream(defaults={"mode": "status", "status": 500}) as fake:
        yield fake


@pytest.fixture(scope="module")
def traced(
    fake: FakeUpstream, failing: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gunicorn, Path]]:
    spans = tmp_path_factory.mktemp("spans") / "spans.jsonl"
    upstreams = {
        "broken": {"url": failing.url, "kind": "vllm", "fallbacks": ["good"]},
        "good": {"url": fake.url},
    }
    env = {
        "STAGESERVER_UPSTREAMS": json.dumps(upstreams),
        "STAGESERVER_TRACING": "memory",
        "STAGESERVER_TRACING_FILE": str(spans),
        "STAGESERVER_HEARTBEAT_SECONDS": "30",
    }
    with gunicorn_server(env) as gunicorn:
        yield gunicorn, spans


def spans_of(path: Path, stage_id: str, count: int) -> list[dict[str, Any]]:
    """The finished spans of one stage's trace, once there are ``count`` of them."""
    deadline = time.monotonic() + 10
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        spans = [json.loads(line) for line in lines]
        stage = [s for s in spans if s["attributes"].get("stageserver.stage_id") == stage_id]
        if stage:
            trace = stage[0]["context"]["trace_id"]
            found = [s for s in spans if s["context"]["trace_id"] == trace]
            if len(found) >= count:
                return found
        assert time.monotonic() < deadline, f"no {count} spans of {stage_id}: {spans}"
        time.sleep(0.05)


def test_a_stage_that_failed_over_once_is_one_span_with_two_attempts(
    traced: tuple[Gunicorn, Path], upstream: FakeUpstream, failing: FakeUpstream
) -> None:
    gunicorn, path = traced
    failing.reset()
    response = post_chat(
        gunicorn.url,
        stage_id="traced",
        upstream="broken",
        model_name="fake?chunks=3",
        headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
    )
    assert terminal(parse_events(response.content))[0]["event"] == "done"
    spans = spans_of(path, "traced", 3)
    [stage] = [s for s in spans if s["kind"] == "SpanKind.INTERNAL"]
    first, second = sorted(
        (s for s in spans if s["kind"] == "SpanKind.CLIENT"),
        key=lambda s: s["attributes"]["stageserver.attempt"],
    )

    # The stage's span continues the caller's trace.
    assert stage["context"]["trace_id"] == f"0x{TRACE_ID}"
    assert stage["parent_id"] == f"0x{PARENT_ID}"
    assert stage["name"] == "chat fake?chunks=3"
    attributes = stage["attributes"]
    assert {k: attributes[k] for k in (
        "gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model",
        "gen_ai.response.model", "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens",
        "gen_ai.response.finish_reasons", "server.address", "server.port",
        "stageserver.upstream", "stageserver.upstream.requested", "stageserver.replica",
        "stageserver.attempts", "stageserver.outcome",
    )} == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",  # the kind of the upstream that served
        "gen_ai.request.model": "fake?chunks=3",
        "gen_ai.response.model": "fake",
        "gen_ai.usage.input_tokens": 1,
        "gen_ai.usage.output_tokens": 3,
        "gen_ai.response.finish_reasons": ["stop"],
        "server.address": "127.0.0.1",
        "server.port": upstream.port,
        "stageserver.upstream": "good",
        "stageserver.upstream.requested": "broken",
        "stageserver.replica": upstream.url,
        "stageserver.attempts": 2,
        "stageserver.outcome": "done",
    }  # fmt: skip
    assert attributes["gen_ai.response.time_to_first_chunk"] > 0
    assert stage["status"]["status_code"] == "UNSET"

    # One CLIENT span per attempt, children of the stage's; each sent to its upstream.
    for attempt in (first, second):
        assert attempt["parent_id"] == stage["context"]["span_id"]
        assert attempt["context"]["trace_id"] == f"0x{TRACE_ID}"
    assert first["attributes"]["stageserver.upstream"] == "broken"
    assert first["attributes"]["gen_ai.provider.name"] == "vllm"
    assert (first["attributes"]["error.type"], first["status"]["status_code"]) == (
        "http_500",
        "ERROR",
    )
    assert second["attributes"]["stageserver.outcome"] == "ok"
    assert "error.type" not in second["attributes"]
    assert second["attributes"]["gen_ai.response.time_to_first_chunk"] > 0
    for attempt, replica in ((first, failing), (second, upstream)):
        [sent] = [r for r in replica.requests if r.path.endswith("/chat/completions")]
        span_id = attempt["context"]["span_id"].removeprefix("0x")
        assert sent.headers["traceparent"] == f"00-{TRACE_ID}-{span_id}-01"


def test_the_span_of_a_stage_whose_client_left_ends_with_the_stage(
    traced: tuple[Gunicorn, Path], upstream: FakeUpstream
) -> None:
    gunicorn, path = traced
    sock = open_stream(gunicorn.port, "left", "fake?chunks=500&interval=0.02", upstream="good")
    read_until(sock, b"event: chat_completion_chunk", 2)
    sock.close()
    wait_for_status(gunicorn.url, "left", "cancelled")
    spans = spans_of(path, "left", 2)
    [stage] = [s for s in spans if s["kind"] == "SpanKind.INTERNAL"]
    [attempt] = [s for s in spans if s["kind"] == "SpanKind.CLIENT"]
    assert stage["parent_id"] is None  # no traceparent: a trace of its own
    assert stage["end_time"] is not None
    assert stage["attributes"]["stageserver.outcome"] == "cancel"
    assert stage["attributes"]["stageserver.cancel_reason"] == "client disconnected"
    assert stage["attributes"]["gen_ai.usage.output_tokens"] >= 2
    assert attempt["attributes"]["stageserver.outcome"] == "cancelled"
    assert attempt["parent_id"] == stage["context"]["span_id"]


def test_otlp_exports_to_the_endpoint_and_flushes_at_close(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeUpstream() as collector:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.base)
        app = create_app({"STAGESERVER_UPSTREAM_URL": upstream.url})
        manager = manager_of(app.extensions)
        assert manager.tracing is not None and manager.tracing.exporter is None
        body = {"stage_id": "otlp", "model_name": "fake", "user_prompt": "hi", "stream": True}
        assert b"event: done" in app.test_client().post("/chat", json=body).data
        stage = manager.stages.get("otlp")
        assert stage is not None
        stage.wait(5)
        manager.close()  # the worker's exit: what is batched is sent
        [export] = [r for r in collector.requests if r.path == "/v1/traces"]
        assert export.method == "POST"
        assert export.headers["content-type"] == "application/x-protobuf"


def test_tracing_mode() -> None:
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert tracing_mode(None, {}) == "off"
    assert tracing_mode(None, endpoint) == "otlp"
    assert tracing_mode("off", endpoint) == "off"
    assert tracing_mode("Memory", {}) == "memory"
    with pytest.raises(ConfigError, match="STAGESERVER_TRACING must be one of otlp, memory, off"):
        tracing_mode("jaeger", {})


@pytest.mark.processes
def test_with_tracing_off_no_tracer_is_made(upstream: FakeUpstream) -> None:
    """Nothing of OpenTelemetry's tracing SDK, exporters or propagators is imported. (The
    redis client, when OpenTelemetry is installed, imports its metrics SDK and tracing API
    on its own: a fact of redis-py 8, not of stageserver, so those are not checked.)"""
    script = textwrap.dedent(
        f"""
        import sys
        from stageserver import create_app
        from stageserver.manager import manager_of
        app = create_app({{"STAGESERVER_UPSTREAM_URL": {upstream.url!r}}})
        assert manager_of(app.extensions).tracing is None
        body = {{"stage_id": "s", "model_name": "fake", "user_prompt": "hi", "stream": True}}
        assert b"event: done" in app.test_client().post("/chat", json=body).data
        tracing = ("opentelemetry.sdk.trace", "opentelemetry.exporter",
                   "opentelemetry.trace.propagation.tracecontext")
        print(sorted(m for m in sys.modules if m.startswith(tracing)))
        """
    )
    env = {"PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, check=True
    )
    assert done.stdout.decode().strip() == "[]"
