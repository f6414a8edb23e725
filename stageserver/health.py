"""Whether this worker's upstreams answer: the check behind ``/readyz`` (``ops.py``).

``Readiness.check`` asks every configured upstream for ``GET <url>/models`` (through the
upstream's own client, so with its API key and connection pool) within
``STAGESERVER_READY_TIMEOUT``. Every upstream must answer, not only the default, because a
request may name any of them. The result is kept for ``READY_CACHE_SECONDS`` per worker,
and concurrent requests wait for the check in progress instead of starting their own, so
polling every second costs each upstream at most one ``/models`` per second per worker.
"""

from __future__ import annotations

import threading
import time
from functools import partial
from typing import Any

import httpx2
import openai

from .concurrency import Task
from .upstreams import Upstream, UpstreamRegistry

READY_CACHE_SECONDS = 1.0

class Readiness:
    """One app's upstream checks, cached for ``READY_CACHE_SECONDS``."""

    def __init__(self, upstreams: UpstreamRegistry, timeout: float) -> None:
        self._upstreams = upstreams
        self._timeout = timeout
        self._lock = threading.Lock()
        self._checked_at = -float("inf")
        self._result: tuple[bool, dict[str, dict[str, Any]]] = (False, {})

    def check(self) -> tuple[bool, dict[str, dict[str, Any]]]:
        """Whether every upstream answered, and each one's report."""
        if time.monotonic() - self._checked_at < READY_CACHE_SECONDS:
            return self._result
        with self._lock:
            # Whoever waited on the lock gets the check that just finished.
            if time.monotonic() - self._checked_at < READY_CACHE_SECONDS:
                return self._result
            reports = self._probe_all()
            ready = bool(reports) and all(r["ok"] for r in reports.values())
            self._result = (ready, reports)
            self._checked_at = time.monotonic()
            return self._result

    def _probe_all(self) -> dict[str, dict[str, Any]]:
        reports: dict[str, dict[str, Any]] = {}
        upstreams = list(self._upstreams)

        def run(upstream: Upstream) -> None:
            reports[upstream.name] = probe(upstream, self._timeout)

        # In parallel: one slow upstream must not make the others' answer late.
        tasks = [Task(partial(run, u), name=f"ready-{u.name}") for u in upstreams]
        for task in tasks:
            task.join(self._timeout + 1.0)
        for upstream in upstreams:
            reports.setdefault(
                upstream.name, {"ok": False, "error": "the check did not finish in time"}
            )
        return {u.name: reports[u.name] for u in upstreams}


def probe(upstream: Upstream, timeout: float) -> dict[str, Any]:
    """Ask ``upstream`` for ``/models``; report whether and how fast it answered."""
    started = time.monotonic()
    try:
        upstream.client.get(
            "/models",
            cast_to=httpx2.Response,
            options={"timeout": timeout, "max_retries": 0},
        )
    except openai.APIStatusError as exc:
        return {"ok": False, "error": f"GET /models answered HTTP {exc.status_code}"}
    except openai.APITimeoutError:
        return {"ok": False, "error": f"GET /models got no answer within {timeout:g} s"}
    except openai.APIConnectionError:
        return {"ok": False, "error": "could not connect"}
    return {"ok": True, "latency_ms": round((time.monotonic() - started) * 1000, 1)}
