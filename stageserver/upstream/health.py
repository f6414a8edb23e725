"""Whether this worker's upstreams answer: the check behind ``/readyz`` (``ops.py``).

``ReadinessProbe.check`` asks every replica of every configured upstream for ``GET
<url>/models`` (through the replica's own client, so with its API key and connection
pool) within ``STAGESERVER_READY_TIMEOUT``, all in parallel. Every upstream must have at
least one replica that answers, not only the default, because a request may name any of
them. Each answer is also the pools' active health check (``replicas.py``): a replica that
answers is readmitted, one that does not is ejected.

The result is kept for ``READY_CACHE_SECONDS`` per worker, and concurrent requests wait
for the check in progress instead of starting their own, so polling every second costs
each replica at most one ``/models`` per second per worker.
"""

from __future__ import annotations

import threading
import time
from functools import partial
from typing import Any

import httpx2
import openai

from ..concurrency import Task
from .clients import ReplicaClient
from .replicas import Replica, ReplicaSet
from .route import ReplicaSets

READY_CACHE_SECONDS = 1.0


class ReadinessProbe:
    """One app's upstream checks, cached for ``READY_CACHE_SECONDS``."""

    def __init__(self, replica_sets: ReplicaSets, timeout: float) -> None:
        self._replica_sets = replica_sets
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
        """Each upstream's report: for a pool of one, its replica's (``ok``, and
        ``latency_ms`` or ``error``); for several, ``ok`` (one replica answered at least)
        and ``replicas``, each replica's report by URL."""
        answers: dict[Replica, dict[str, Any]] = {}

        def run(pool: ReplicaSet, replica: Replica) -> None:
            answer = probe(replica.client, self._timeout)
            pool.probed(replica, bool(answer["ok"]))
            answers[replica] = answer

        # In parallel: one slow replica must not make the others' answer late.
        tasks = [
            Task(partial(run, pool, replica), name=f"ready-{pool.name}")
            for pool in self._replica_sets
            for replica in pool.replicas
        ]
        for task in tasks:
            task.join(self._timeout + 1.0)
        late = {"ok": False, "error": "the check did not finish in time"}
        reports: dict[str, dict[str, Any]] = {}
        for pool in self._replica_sets:
            each = {r.url: answers.get(r, late) for r in pool.replicas}
            if len(each) == 1:
                reports[pool.name] = next(iter(each.values()))
            else:
                reports[pool.name] = {"ok": any(r["ok"] for r in each.values()), "replicas": each}
        return reports


def probe(upstream: ReplicaClient, timeout: float) -> dict[str, Any]:
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
