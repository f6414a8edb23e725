"""Leases in the shared store, renewed together: one pipeline per worker.

Whatever this worker holds in Redis only while it is alive (the ownership of each stage
it runs, each principal's stream slot its stages take) is a lease: a key or member that
lapses ``lease_seconds`` after its last renewal. The worker's ``LeaseKeeper`` renews them
all every third of that, in one batch (one round trip per Redis node, batch.py), so a
worker that dies (SIGKILL, OOM, a lost host) lets go of everything within one lease,
while a live one never loses a lease to a slow second.

A ``Lease`` gives its renewal's commands and is told their results: the stage's
ownership learns there whether another worker holds it now (see flusher.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

from ..concurrency import Task, stop_task
from .batch import Batcher, Command

log = logging.getLogger("stageserver.leases")


class Lease(Protocol):
    def renew(self, lease_ms: int) -> list[Command]:
        """The renewal's commands."""

    def renewed(self, results: list[Any]) -> None:
        """The results of those commands (an exception where one failed)."""


class LeaseKeeper:
    def __init__(self, batcher: Callable[[], Batcher], lease_seconds: float) -> None:
        """``batcher``: gives this process's (see batch.py)."""
        self.lease_seconds = lease_seconds
        self.lease_ms = int(lease_seconds * 1000)
        self._batcher = batcher
        self._held: dict[int, Lease] = {}
        self._task: Task | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._failing = False

    def hold(self, lease: Lease) -> None:
        with self._lock:
            self._held[id(lease)] = lease
            if self._task is None and not self._stopping.is_set():
                self._task = Task(self._renew_forever, name="stageserver-leases")

    def release(self, lease: Lease) -> None:
        with self._lock:
            self._held.pop(id(lease), None)

    def stop(self) -> None:
        """Stop renewing (the store is closed): what this worker holds lapses by itself."""
        stop_task(self._stopping, self._task)

    def _renew_forever(self) -> None:
        while not self._stopping.wait(self.lease_seconds / 3):
            with self._lock:
                held = list(self._held.values())
            if held:
                try:
                    self.renew(held)
                except Exception:  # the loop outlives anything: it is every lease's
                    log.exception("renewing %d leases failed; trying again", len(held))

    def renew(self, leases: list[Lease]) -> None:
        commands = [lease.renew(self.lease_ms) for lease in leases]
        results = self._batcher().run([c for renewal in commands for c in renewal])
        failed = [r for r in results if isinstance(r, Exception)]
        if failed and not self._failing:
            log.warning(
                "could not renew %d of %d leases in the stage store: %s",
                len(failed), len(results), failed[0],
            )  # fmt: skip
        elif self._failing and not failed:
            log.warning("the stage store answers again; leases renewed")
        self._failing = bool(failed)
        start = 0
        for lease, renewal in zip(leases, commands, strict=True):
            lease.renewed(results[start : start + len(renewal)])
            start += len(renewal)
