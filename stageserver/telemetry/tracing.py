"""OpenTelemetry traces of stages, named after the GenAI semantic conventions.

Off unless ``STAGESERVER_TRACING`` says ``otlp`` or ``memory``, or is unset while
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``) is set. Off, this module
imports nothing of OpenTelemetry, the manager adds no listener, and the relay's tracer is
``relay.NO_TRACING``, whose calls (a few per attempt, none per chunk) do nothing.

On, ``Tracing`` is both a stage listener and the relay's attempt tracer:

- a span per stage, ``chat {model}`` (INTERNAL: the logical operation, retries and all),
  started in ``on_start`` as the child of the request's ``traceparent`` when it sent one,
  and ended in ``on_finish``, whether or not a client is still attached. It is made from
  a context built of that header alone, never from the request's own, so that nothing
  tied to the request (which a disconnect ends) holds it. Attributes:
  ``gen_ai.operation.name``, ``gen_ai.provider.name`` (and ``gen_ai.system``, its name in
  conventions up to 1.36, which many backends still read), ``gen_ai.request.model``,
  ``gen_ai.response.model``, ``gen_ai.response.finish_reasons``, ``gen_ai.usage.input_tokens``
  and ``output_tokens``, ``gen_ai.response.time_to_first_chunk`` (seconds),
  ``server.address`` and ``server.port`` of the replica that served, ``error.type`` (the
  failure's class), and ``stageserver.*``: stage id, request id, upstream (the one that
  served), requested upstream, replica, attempts, outcome;
- a child span per upstream attempt, ``chat {model}`` (CLIENT), whose context goes to the
  upstream as ``traceparent``; ``error.type`` is the attempt's outcome (``refused``,
  ``http_500``, ...) when it failed.

Exporters: ``otlp``, batched, to the endpoint the ``OTEL_EXPORTER_OTLP_*`` variables name;
``memory``, the SDK's ``InMemorySpanExporter`` (``Tracing.exporter``), and with
``STAGESERVER_TRACING_FILE`` each finished span appended to that file as a JSON line: the
spans of a gunicorn worker, readable by a test, with no endpoint added to the server.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..errors import ConfigError
from ..stages.records import ContinuationRecord
from ..stages.stage import Stage, StageListener
from ..stages.status import StageStatus
from ..upstream.replicas import ReplicaAttempt

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExportResult
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import Span, SpanKind

TRACING_MODES = ("otlp", "memory", "off")
_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def tracing_mode(setting: Any, environ: Mapping[str, str]) -> str:
    """``otlp``, ``memory`` or ``off``, from ``STAGESERVER_TRACING`` and the environment."""
    mode = str(setting or "").strip().lower()
    if not mode:
        return "otlp" if any(environ.get(name) for name in _ENDPOINTS) else "off"
    if mode not in TRACING_MODES:
        raise ConfigError(
            f"STAGESERVER_TRACING must be one of {', '.join(TRACING_MODES)}, or unset, "
            f"not {setting!r}"
        )
    return mode


def start_tracing(
    config: Mapping[str, Any], environ: Mapping[str, str], kinds: Mapping[str, str]
) -> Tracing | None:
    """The app's tracing, or None when it is off. ``kinds``: each upstream's kind."""
    mode = tracing_mode(config["STAGESERVER_TRACING"], environ)
    if mode == "off":
        return None
    try:
        import opentelemetry.sdk  # noqa: F401  (an optional dependency)
    except ImportError:
        raise ConfigError(
            f"STAGESERVER_TRACING={mode} needs OpenTelemetry: pip install 'stageserver[tracing]'"
        ) from None
    return Tracing(mode, config["STAGESERVER_TRACING_FILE"] or None, kinds)


def _server(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return {"server.address": parts.hostname or "", "server.port": port}


class _StageSpan:
    __slots__ = ("span", "response_model")

    def __init__(self, span: Span) -> None:
        self.span = span
        self.response_model: str | None = None


class _AttemptSpan:
    """One attempt's CLIENT span: the relay's ``AttemptTrace``."""

    __slots__ = ("_span", "_stage", "_began")

    def __init__(self, span: Span, stage: _StageSpan | None) -> None:
        self._span = span
        self._stage = stage
        self._began = time.monotonic()

    def headers(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        from opentelemetry.trace import set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier = dict(headers)
        TraceContextTextMapPropagator().inject(carrier, set_span_in_context(self._span))
        return carrier

    def served(self, payload: bytes) -> None:
        span = self._span
        span.set_attribute("gen_ai.response.time_to_first_chunk", time.monotonic() - self._began)
        try:  # once per stage, and only with tracing on: the chunk says which model answered
            model = json.loads(payload).get("model")
        except (ValueError, AttributeError):
            model = None
        if isinstance(model, str):
            span.set_attribute("gen_ai.response.model", model)
            if self._stage is not None:
                self._stage.response_model = model

    def end(self, outcome: str) -> None:
        from opentelemetry.trace import Status, StatusCode

        span = self._span
        span.set_attribute("stageserver.outcome", outcome)
        if outcome not in ("ok", "cancelled"):
            span.set_attribute("error.type", outcome)
            span.set_status(Status(StatusCode.ERROR, outcome))
        span.end()


class Tracing(StageListener):
    def __init__(self, mode: str, file: str | None, kinds: Mapping[str, str]) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        # OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES, when set, name the service.
        named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get(
            "OTEL_RESOURCE_ATTRIBUTES", ""
        )
        resource = Resource.create({} if named else {"service.name": "stageserver"})
        # Our own provider, not the global one: a host app may have its own.
        self.provider: TracerProvider = TracerProvider(resource=resource)
        self.exporter: InMemorySpanExporter | None = None
        if mode == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
                InMemorySpanExporter,
            )

            self.exporter = InMemorySpanExporter()
            self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
            if file:
                self.provider.add_span_processor(SimpleSpanProcessor(_json_lines(file)))
        self._tracer = self.provider.get_tracer("stageserver")
        self._kinds = dict(kinds)
        self._stages: dict[object, _StageSpan] = {}  # by stage, while it runs

    def _start(
        self, model: str, upstream: str, parent: Context | None, kind: SpanKind,
        attributes: dict[str, Any],
    ) -> Span:  # fmt: skip
        """A span ``chat {model}`` with the GenAI attributes, and ``attributes``."""
        provider = self._kinds.get(upstream, "openai")
        genai = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": provider,
            "gen_ai.system": provider,
            "gen_ai.request.model": model,
        }
        return self._tracer.start_span(
            f"chat {model}", context=parent, kind=kind, attributes={**genai, **attributes}
        )

    # -- the stage's span -----------------------------------------------------------------

    def on_start(self, stage: Stage) -> None:
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        spec = stage.spec
        parent = None
        if spec.traceparent:
            parent = TraceContextTextMapPropagator().extract({"traceparent": spec.traceparent})
        attributes = {
            "stageserver.stage_id": stage.stage_id,
            "stageserver.request_id": spec.request_id,
            "stageserver.upstream.requested": spec.upstream,
            "stageserver.dialect": stage.dialect.name,
        }
        span = self._start(spec.model, spec.upstream, parent, SpanKind.INTERNAL, attributes)
        self._stages[stage] = _StageSpan(span)

    def on_continue(self, stage: Stage, record: ContinuationRecord) -> None:
        state = self._stages.get(stage)
        if state is not None:
            attributes = {
                f"stageserver.continuation.{name}": value
                for name, value in vars(record).items()
                if value != ""
            }
            state.span.add_event("stageserver.continuation", attributes)

    def on_finish(self, stage: Stage) -> None:
        from opentelemetry.trace import Status, StatusCode

        state = self._stages.pop(stage, None)
        if state is None:
            return
        span = state.span
        served = stage.served_by
        attributes: dict[str, Any] = {
            "stageserver.upstream": stage.upstream,
            "stageserver.attempts": len(stage.attempts),
            "stageserver.outcome": stage.outcome,
        }
        if served is not None:
            attributes["stageserver.replica"] = served.replica
            attributes.update(_server(served.replica))
            attributes["gen_ai.provider.name"] = self._kinds.get(served.upstream, "openai")
        if state.response_model:
            attributes["gen_ai.response.model"] = state.response_model
        if stage.first_token_seconds is not None:
            attributes["gen_ai.response.time_to_first_chunk"] = stage.first_token_seconds
        if stage.finish_reason:
            attributes["gen_ai.response.finish_reasons"] = [stage.finish_reason]
        usage = stage.usage or {}
        for key, name in (("prompt_tokens", "input"), ("completion_tokens", "output")):
            if isinstance(usage.get(key), int):
                attributes[f"gen_ai.usage.{name}_tokens"] = usage[key]
        span.set_attributes(attributes)
        if stage.status == StageStatus.ERROR:
            span.set_attribute("error.type", type(stage.failure).__name__)
            span.set_status(Status(StatusCode.ERROR, stage.error))
        elif stage.status != StageStatus.DONE:
            span.set_attribute("stageserver.cancel_reason", stage.cancel_reason or "")
        span.end()

    # -- the relay's attempt tracer -----------------------------------------------------------

    def attempt(self, stage: object, attempt: ReplicaAttempt) -> _AttemptSpan:
        from opentelemetry.trace import SpanKind, set_span_in_context

        state = self._stages.get(stage)
        parent = None if state is None else set_span_in_context(state.span)
        requested = stage.spec.model if isinstance(stage, Stage) else ""
        model = attempt.config.model_for(requested)
        attributes = {
            **_server(attempt.url),
            "stageserver.upstream": attempt.name,
            "stageserver.replica": attempt.url,
            "stageserver.attempt": attempt.number,
        }
        span = self._start(model, attempt.name, parent, SpanKind.CLIENT, attributes)
        return _AttemptSpan(span, state)

    def shutdown(self) -> None:
        """Export what is still buffered; the worker is exiting."""
        self.provider.shutdown()


def _json_lines(path: str) -> Any:
    """A span exporter that appends each span to ``path`` as one JSON line."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class JsonLines(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            lines = "".join(span.to_json(indent=None) + "\n" for span in spans)
            with open(path, "a", encoding="utf-8") as out:
                out.write(lines)  # one write: several workers append to the same file
            return SpanExportResult.SUCCESS

    return JsonLines()
