"""The operations endpoints, for load balancers, orchestrators and Prometheus.

- ``GET /healthz``: 200 ``{"status":"ok"}`` whenever the worker's event loop answers. It
  touches nothing else, so it costs what an empty Flask response costs.
- ``GET /readyz``: whether this worker can serve stages now: 200 when every configured
  upstream has a replica that answers (``upstream.health.ReadinessProbe``); 503 when one has none,
  when none is configured, or when the worker is shutting down. The body says which
  upstream (and which replica of a pool) failed, and how::

      {"status": "ready", "upstreams": {"default": {"ok": true, "latency_ms": 1.9},
       "gpu": {"ok": true, "replicas": {"http://10.0.0.1:8000/v1": {"ok": true, ...},
                                        "http://10.0.0.2:8000/v1": {"ok": false, ...}}}}}

  Each upstream's report also says how it continues an answer cut short (``continuation``:
  its ``mode``, and whether it was ``given``, ``probed`` or ``default``).

- ``GET /metrics``: Prometheus's text format (``metrics.py``).
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from .. import shutdown
from ..manager import manager_of
from ..schemas import ContinuationCheck, UpstreamCheck
from ..schemas import Readiness as ReadinessBody
from ..telemetry import metrics
from .errors import answer_in_json

bp = Blueprint("stageserver_ops", __name__)
answer_in_json(bp)


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Response:
    if shutdown.shutting_down():
        response = jsonify(ReadinessBody(status="shutting_down", error=None).body())
        response.status_code = 503
        return response
    manager = manager_of(current_app.extensions)
    ready, upstreams = manager.readiness.check()
    modes = manager.continuation_modes.report()
    body = ReadinessBody(
        status="ready" if ready else "not_ready",
        upstreams={
            name: UpstreamCheck(
                **report, continuation=ContinuationCheck.model_validate(modes[name])
            )
            for name, report in upstreams.items()
        },
        error=None
        if upstreams
        else ("no upstream is configured: set STAGESERVER_UPSTREAM_URL or STAGESERVER_UPSTREAMS"),
    )
    response = jsonify(body.body())
    response.status_code = 200 if ready else 503
    return response


@bp.get("/metrics")
def metrics_view() -> Response:
    body, content_type = metrics.exposition()
    return Response(body, content_type=content_type)
