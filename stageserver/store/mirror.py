"""Stages shared across workers and hosts through Redis (``STAGESERVER_STORE_URL``): the
store as the manager and a stage see it, one object over its parts.

A stage runs in the worker that accepted it and is served from that worker's memory;
Redis is a mirror, so that any worker can answer for it (``reader.py``, and
``remote_feed.py`` for its events). Its keys, and what each holds: ``keys.py``.

A stage outlives its worker: when its lease lapses, or its worker hands it off as it
drains, any live worker takes it over (``takeover.py``; ``manager.takeover.Takeovers.adopt``)
and continues its answer from what Redis holds: its record (the request), its log, and
its text, which the log's entries carry with their events, so that the text always
matches an index of the log. For that, a client never reads an event before Redis holds
it (the stage is ``gated``: the flusher publishes what it has written, ``flusher.py``),
and no client can have seen what a taker would not continue from. While Redis cannot be
written, the stage publishes at once instead: an outage stops no stream, at the price of
that guarantee until the mirror has caught up.

``RedisStageStore`` is a ``StageStore`` (``stage_store.py``, the seam the manager holds),
and so the last of a stage's listeners (see manager/): it claims a stage, mirrors its
events, and writes its end before any client reads it. Its parts, one concern each:

- ``flusher.py``: the stages of this process, written in batches, fenced, published;
- ``takeover.py``: the claim, the takeover, the handoff, the sweeper, and the end of a
  stage whose owner died (``reap_orphan``);
- ``cancels.py``: the cancel channel, both sides;
- ``idempotency.py``: idempotency keys;
- ``reader.py`` and ``remote_feed.py``: the stages of other processes, read; ``stored.py``:
  one of them as a request sees it (a ``StageHandle``);
- ``leases.py``: what this worker holds while it lives, renewed together.

Each process has its own connection, batcher and tasks (the flusher, the cancel
listener, the sweeper, the leases' renewal), made on first use in that process: a worker
forked after the app was made has none of its parent's. ``close`` stops them, and closes
the connections: the app's background work ends with the app.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from ..concurrency import Task, stop_task
from ..errors import StoreUnavailable
from ..stages.dialect import Dialects
from ..stages.feeds import EventFeed
from ..stages.handle import StageHandle
from ..stages.records import ContinuationRecord
from ..stages.stage import Stage
from ..stages.status import StageStatus
from . import remote_feed, scripts
from .batch import Batcher
from .cancels import CancelChannel
from .connection import (
    DEFAULT_MAX_CONNECTIONS,
    Reachability,
    connect,
    refuse_a_cluster_node,
    store_errors,
)
from .flusher import DEFAULT_FLUSH_WINDOW, Flusher
from .idempotency import IdempotencyKeys
from .keys import stage_keys
from .leases import LeaseKeeper
from .reader import StoreReader
from .retention import Retention
from .stage_store import Claim, StageStore
from .stored import StoredStage
from .takeover import Ownership

log = logging.getLogger("stageserver.store")

CONNECTIONS_REPORT_SECONDS = 1.0


class RedisStageStore(StageStore):
    """Stages shared by every worker and host through Redis (the module docstring)."""

    gated = True

    def __init__(
        self,
        url: str,
        *,
        ttl_seconds: float,
        event_ttl_seconds: float,
        max_events: int,
        lease_seconds: float,
        cancel_here: Callable[[str, str], None],
        adopt: Callable[[str], bool] | None = None,
        dialects: Dialects,
        flush_window: float = DEFAULT_FLUSH_WINDOW,
        on_written: Callable[[float], None] | None = None,
        on_reachable: Callable[[bool], None] | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        on_connections: Callable[[dict[tuple[str, str], int]], None] | None = None,
    ) -> None:
        """``cancel_here(key, reason)`` cancels a stage of this process for a request made
        elsewhere: the cancel listener calls it. ``adopt(key)`` tries to take over the
        orphaned stage with that key (``manager.takeover.Takeovers.adopt``); whether it, or
        another, has. ``dialects``: those it can end a stage in, for a worker that died
        (``takeover.Ownership.reap_orphan``). ``flush_window``: how long the flusher
        gathers writes into one round trip. ``on_written(seconds)``: told, for each
        write, how long the oldest event in it waited to be durable (an upper bound for
        every event it carried).
        ``on_reachable(reachable)``: told when Redis stops or starts answering this
        process, as its flusher's writes and its sweeper's looks find it.
        ``max_connections``: connections per Redis node for commands, at most (and as
        many for blocking reads; connection.py). ``on_connections(counts)``: told every
        ``CONNECTIONS_REPORT_SECONDS`` the connections this process holds, by node
        (``host:port``) and kind (``Batcher.connections``)."""
        self.url = url
        self.max_connections = max_connections
        self._on_connections = on_connections
        self._reporter: Task | None = None
        self._stop_reporting = threading.Event()
        self._batcher: Batcher | None = None
        self._lock = threading.Lock()
        self._closed = False
        batcher = self._batcher_of_this_process
        retention = Retention(int(ttl_seconds * 1000), int(event_ttl_seconds * 1000))
        reachability = Reachability(on_reachable)
        self.leases = LeaseKeeper(batcher, lease_seconds)
        self.reader = StoreReader(batcher)
        self.flusher = Flusher(
            batcher, self.leases, retention, max_events, reachability, flush_window, on_written
        )
        self.ownership = Ownership(batcher, self.leases, retention, reachability, dialects, adopt)
        self.cancels = CancelChannel(batcher, self.reader, cancel_here)
        self.idempotency = IdempotencyKeys(batcher)

    # -- this process's connection and tasks --------------------------------------------

    @property
    def batcher(self) -> Batcher:
        """This process's client, in its batcher. The first use in a process (a worker
        forked after the app was made has its own) connects, and starts the process's
        flusher, cancel listener and sweeper: once per process, not per stage. Raises
        StoreUnavailable when a cluster cannot be reached to learn its slots, or once the
        store is closed."""
        batcher = self._batcher
        if batcher is None:
            with self._lock:
                if self._closed:
                    raise StoreUnavailable("this app's stage store was closed")
                if self._batcher is None:
                    self._start_in_this_process()
                batcher = self._batcher
            assert batcher is not None
        return batcher

    def _batcher_of_this_process(self) -> Batcher:
        return self.batcher

    @property
    def redis(self) -> Any:
        """This process's redis-py client (Any: redis-py types its results loosely)."""
        return self.batcher.client

    def start(self) -> None:
        """Start this process's tasks now: a worker that serves nothing yet still takes
        over stages orphaned elsewhere. Raises ConfigError when the URL names a node of
        a Redis Cluster as if it were a lone Redis."""
        try:
            refuse_a_cluster_node(self.redis, self.url)
        except StoreUnavailable as exc:
            log.warning("the stage store cannot be reached yet: %s", exc)

    def _start_in_this_process(self) -> None:
        with store_errors():
            client = connect(self.url, self.max_connections)
        self._batcher = Batcher(client, scripts.ALL, self.max_connections)
        # A worker forked after this process connected has none of its client, its
        # tasks or its mirrors: it starts its own on first use.
        os.register_at_fork(after_in_child=self._forget_the_parents)
        self.flusher.start()
        self.cancels.start()
        self.ownership.start_sweeper()
        if self._on_connections is not None:
            self._reporter = Task(self._report_connections, name="stageserver-store-connections")

    def _report_connections(self) -> None:
        """Tell ``on_connections`` what this process holds, every few seconds; a node
        whose connections all closed is told 0 once."""
        assert self._on_connections is not None
        told: set[tuple[str, str]] = set()
        while not self._stop_reporting.is_set():
            try:
                counts = self.batcher.connections()
                for gone in told - counts.keys():
                    counts[gone] = 0
                told = {where for where, count in counts.items() if count}
                self._on_connections(counts)
            except Exception:  # the report outlives anything
                log.exception("could not count the stage store's connections")
            self._stop_reporting.wait(CONNECTIONS_REPORT_SECONDS)

    def _forget_the_parents(self) -> None:
        self._batcher = None
        self.flusher.forget()
        self._lock = threading.Lock()

    def close(self) -> None:
        """Stop this process's tasks (each ends its loop; the flusher finishes the write
        it has begun), then close the connections. Nothing starts them again: the store
        answers StoreUnavailable from now on."""
        stop_task(self._stop_reporting, self._reporter)  # first: it reads the batcher
        with self._lock:
            self._closed = True
            batcher, self._batcher = self._batcher, None
        for part in (self.ownership, self.cancels, self.flusher, self.leases):
            part.stop()
        if batcher is not None:
            batcher.close()

    # -- a stage of this process: the listener ------------------------------------------

    def claim(self, stage: Stage) -> None:
        """Make ``stage`` the one live stage with its key, everywhere, and mirror it.
        Raises StageConflict when one runs, StoreUnavailable when Redis cannot say."""
        self.ownership.claim(stage)
        self.flusher.claimed(stage)

    def adopt(self, stage: Stage, claim: Claim) -> None:
        """Mirror a stage taken over (``take_over``): Redis holds its first events and
        its text, as ``claim`` says."""
        self.flusher.taken_over(stage, claim.epoch, claim.held)

    def on_event(self, stage: Stage, seq: int, wire: bytes) -> None:
        self.flusher.on_event(stage, seq)

    def on_continue(self, stage: Stage, record: ContinuationRecord) -> None:
        self.flusher.resummarize(stage)  # its status lists its continuations

    def on_not_continuable(self, stage: Stage) -> None:
        self.flusher.resummarize(stage)  # its taker must not continue it

    def on_finish(self, stage: Stage) -> None:
        """Write the end now, before any client can read it, so that its id is free on
        every host when one does. While Redis fails, the flusher writes it later. A stage
        handed off is written whole, then let go for another worker to take over."""
        written = self.flusher.write_end(stage)
        if written and stage.status == StageStatus.HANDED_OFF and self.flusher.let_go(stage):
            self.ownership.release_claim(stage.key, stage.instance)

    def watched_elsewhere(self, key: str) -> bool:
        """Whether a response in some worker follows the stage through the store."""
        return self.reader.watchers(key) > 0

    def can_hand_off(self, stage: Stage) -> bool:
        return True  # any live worker takes it over (takeover.py)

    def earlier_events(self, stage: Stage, after_seq: int) -> EventFeed | None:
        """From the stage's log in Redis, which holds what came before its takeover."""
        return remote_feed.feed(
            self._batcher_of_this_process, self.ownership, stage.key, stage.stage_id, after_seq
        )

    def first_kept(self, stage: Stage) -> int:
        first = stage.first_kept_seq
        return min(first, self.reader.first_kept(stage.key)) if first > 0 else first

    # -- a stage of any process -----------------------------------------------------------

    def find(self, key: str, stage_id: str) -> StageHandle:
        return StoredStage(
            self._batcher_of_this_process, self.reader, self.ownership, self.cancels, key, stage_id
        )

    def record(self, key: str) -> dict[str, Any] | None:
        """See ``reader.StoreReader.record``."""
        return self.reader.record(key)

    def take_over(self, key: str, instance: str) -> Claim | None:
        """See ``takeover.Ownership.take_over``."""
        return self.ownership.take_over(key, instance)

    def release_claim(self, key: str, instance: str) -> None:
        """See ``takeover.Ownership.release_claim``."""
        self.ownership.release_claim(key, instance)

    def reap_orphan(self, stage_key: str, stage_id: str) -> None:
        """See ``takeover.Ownership.reap_orphan``: asked before a status or a cancel."""
        self.ownership.reap_orphan(stage_key, stage_id)

    def forget(self, key: str) -> None:
        """Delete a finished stage's keys: every host forgets it. Raises StoreUnavailable."""
        with store_errors():
            self.redis.delete(*stage_keys(key))

    def claim_idempotency(
        self, key: str, stage_id: str, digest: str, ttl_seconds: float
    ) -> tuple[str, str] | None:
        """See ``idempotency.IdempotencyKeys.claim``."""
        return self.idempotency.claim(key, stage_id, digest, ttl_seconds)

    def release_idempotency(self, key: str, stage_id: str) -> None:
        """See ``idempotency.IdempotencyKeys.release``."""
        self.idempotency.release(key, stage_id)
