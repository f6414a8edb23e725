"""Leases in the shared store, renewed together: one pipeline per worker.

Whatever this worker holds in Redis only while it is alive (the ownership of each stage
it runs, each principal's stream slot its stages take) is a lease: a key or member that
lapses ``lease_seconds`` after its last renewal. The worker's ``LeaseKeeper`` renews them
all every third of that, in one pipeline, so a worker that dies (SIGKILL, OOM, a lost
host) lets go of everything within one lease, while a live one never loses a lease to a
slow second.

A ``Lease`` adds its renewal commands to the pipeline and is told their results: the
stage's ownership learns there whether another worker holds it now (see mirror.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from ..concurrency import Task
from .connection import STORE_ERRORS

log = logging.getLogger("stageserver.leases")


class Lease(Protocol):
    def renew(self, pipe: Any, lease_ms: int) -> int:
        """Add the renewal's commands to ``pipe``; return how many."""

    def renewed(self, results: list[Any]) -> None:
        """The results of those commands (an exception where one failed)."""


class LeaseKeeper:
    def __init__(self, client: Callable[[], Any], lease_seconds: float) -> None:
        """``client``: gives this process's redis-py client."""
        self.lease_seconds = lease_seconds
        self.lease_ms = int(lease_seconds * 1000)
        self._client = client
        self._held: dict[int, Lease] = {}
        self._task: Task | None = None
        self._lock = threading.Lock()
        self._failing = False

    def hold(self, lease: Lease) -> None:
        with self._lock:
            self._held[id(lease)] = lease
            if self._task is None:
                self._task = Task(self._renew_forever, name="stageserver-leases")

    def release(self, lease: Lease) -> None:
        with self._lock:
            self._held.pop(id(lease), None)

    def _renew_forever(self) -> None:
        while True:
            time.sleep(self.lease_seconds / 3)
            with self._lock:
                held = list(self._held.values())
            if held:
                try:
                    self.renew(held)
                except Exception:  # the loop outlives anything: it is every lease's
                    log.exception("renewing %d leases failed; trying again", len(held))

    def renew(self, leases: list[Lease]) -> None:
        try:
            pipe = self._client().pipeline(transaction=False)
            counts = [lease.renew(pipe, self.lease_ms) for lease in leases]
            results = pipe.execute(raise_on_error=False)
        except STORE_ERRORS as exc:
            if not self._failing:
                log.warning("could not renew %d leases in the stage store: %s", len(leases), exc)
            self._failing = True
            return
        if self._failing:
            log.warning("the stage store answers again; leases renewed")
        self._failing = False
        start = 0
        for lease, count in zip(leases, counts, strict=True):
            lease.renewed(results[start : start + count])
            start += count
