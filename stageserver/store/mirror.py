"""Stages shared across workers and hosts through Redis (``STAGESERVER_STORE_URL``).

A stage runs in the worker that accepted it and is served from that worker's memory;
Redis is a mirror, so that any worker can answer for it (``reader.py``). The keys
of a stage, named after its key (its id in its principal's namespace) as a hash tag
(``connection.py``):

- ``ss:{key}`` (hash): status, owner, summary JSON, record, epoch, remote watchers, and
  while in doubt ``suspect_since``; ``gap`` when the store lost events it could not get
  back;
- ``ss:{key}:log`` (stream): the events, each the exact bytes a client receives, several
  to an entry (``entries.py``: ids, fencing by epoch, and the text in each entry);
- ``ss:{key}:text`` (string): a checkpoint of the text, while the stage runs;
- ``ss:{key}:live`` (string): the owner's lease, held by the one stage instance that runs
  it. ``SET NX`` on it makes a stage id unique everywhere; the worker renews it with all
  its leases (``leases.py``);
- ``ss:running`` (sorted set, a key of its own, in a slot of its own): the key of every
  running stage, scored by when its lease runs out (0: handed off by a draining worker);
- channel ``ss:cancel``: a cancel for a stage that runs elsewhere.

A stage outlives its worker: when its lease lapses, or its worker hands it off as it
drains, any live worker claims it (``take_over``: one wins, under a new lease and the
next epoch, which fence the old owner; ``manager.StageManager.adopt``), and continues
its answer from what Redis holds: its record (the request), its log, and its text, which
the log's entries carry with their events, so that the text always matches an index of
the log. For that, a client never reads an event before Redis holds it (the stage is
``gated``: the flusher publishes what it has written), and no client can have seen what
a taker would not continue from. While Redis cannot be written, the stage publishes at
once instead: an outage stops no stream, at the price of that guarantee until the mirror
has caught up.

Writes are batched and cost one command per stage: for each event the relay only marks
its stage dirty, and one flusher per process writes every dirty stage's new events a
flush window later (``STAGESERVER_STORE_FLUSH_WINDOW_SECONDS``), in one round trip per
Redis node (``batch.py``). A stage's share is one plain ``XADD`` that reads nothing: its
entry id is fenced by Redis itself (``entries.py``). What an XADD cannot carry goes
through the fenced script ``WRITE`` (``scripts.py``): a stage's end, written at once,
before its clients hear of it, so that its id is free when they do; a new summary; and
any write after a doubt (an error, a lost connection, a failover: the batcher's
``breaks``), which reads the log first. The TTLs (every 15 s at most) and now and then a
checkpoint of the text go with the lease renewals, not with the writes. When the lease is not this
instance's:

- if the stage was taken over or declared dead meanwhile, this worker was cut off past
  its lease (a partition, a long pause): it stops the stage, closes its upstream and
  writes nothing more to it (fencing);
- if nobody noticed (the lease merely lapsed, or Redis restarted and lost it), it takes
  the lease back and goes on: a store outage ends no healthy stream.

When Redis cannot be written, nothing ends: the stages stay dirty, the flusher tries again
every half second, and each keeps streaming to its own clients. When Redis answers, the
mirror catches up from where Redis stands (a restart or a failover may have lost the last
writes: the next write reads the log, and a renewal notices a log shorter than it should
be), from the worker's own log; what that log no longer holds is recorded as a ``gap``,
and a resume that needs it gets an ``error`` that says so, never a silent hole.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..concurrency import Task
from ..errors import LeaseLost, StageConflict, StoreUnavailable
from ..stages.records import ContinuationRecord
from ..stages.stage import Stage, StageListener
from ..stages.status import StageStatus
from . import entries, scripts
from .batch import Batcher, Command
from .connection import STORE_ERRORS, connect, refuse_a_cluster_node, store_errors
from .keys import CANCEL_CHANNEL, RUNNING_INDEX, idempotency_key, stage_keys
from .leases import LeaseKeeper
from .reader import StoreReader

log = logging.getLogger("stageserver.store")

DEFAULT_FLUSH_WINDOW = 0.005  # STAGESERVER_STORE_FLUSH_WINDOW_SECONDS
_RETRY_DELAY = 0.5  # while Redis cannot be written
_TTL_REFRESH_SECONDS = 15.0  # at most this often per stage while it runs, and per quarter TTL
# A renewal writes a checkpoint of the text once this many events came since the last
# (or a quarter of the log's length, so that no entry after it is trimmed away): the
# text is rebuilt from it and the entries after it (entries.py).
_CHECKPOINT_EVENTS = 512


@dataclass(frozen=True)
class Claim:
    """A stage taken over (``RedisStageStore.take_over``): what Redis holds of it."""

    epoch: int
    held: int  # events in its log
    record: dict[str, Any]
    text: str
    content_chunks: int
    owner: str  # the worker that ran it
    handed_off: bool  # its worker drained, rather than died
    summary: dict[str, Any]  # as its owner last wrote it


class _Mirror:
    """One claimed stage: how much of it Redis holds, and its lease."""

    __slots__ = (
        "stage", "store", "keys", "epoch", "held", "next_seq", "text_parts", "chunks", "saved",
        "refreshed", "lost", "gap", "resummarize", "verified",
    )  # fmt: skip

    def __init__(self, stage: Stage, store: RedisStageStore, epoch: int, held: int) -> None:
        self.stage = stage
        self.store = store
        self.keys = stage_keys(stage.key)  # named once: every write and renewal uses them
        self.epoch = epoch  # this instance's (entries.py): its log entries' ids
        self.held = held  # events Redis holds, as far as this worker knows
        self.next_seq = held  # the next event of the stage to write
        self.text_parts = len(stage.text_parts)  # the text Redis holds, in parts
        self.chunks = stage.content_chunks  # the content chunks Redis holds
        self.saved = held  # the events the text checkpoint covers
        self.refreshed = time.monotonic()  # when the keys' TTLs were last set
        self.lost = False  # the store lost the stage: write it whole
        self.gap = ""  # what the store lost of it for good, in words; kept once known
        self.resummarize = False  # its summary changed while it runs (a continuation)
        # Whether the log is known to hold exactly ``held`` events, so that the next
        # write may be a plain XADD: as of which of the batcher's breaks (batch.py). Any
        # doubt (an error, a resync, a break) makes it read the log first.
        self.verified: int | None = store.batcher.breaks

    def renew(self, lease_ms: int) -> list[Command]:
        """The renewal of its lease, with its TTLs every few seconds and now and then a
        checkpoint of its text (entries.py), and its place in the running index."""
        store, stage = self.store, self.stage
        hash_ttl = log_ttl = ""
        ttl, event_ttl = store.ttls_ms(stage)
        now = time.monotonic()
        if now - self.refreshed > min(_TTL_REFRESH_SECONDS, event_ttl / 4000):
            hash_ttl, self.refreshed = str(ttl + lease_ms), now
        log_ttl = str(event_ttl + lease_ms)
        saved = ""
        if self.held - self.saved >= min(_CHECKPOINT_EVENTS, store.max_events // 4):
            text = "".join(stage.text_parts[: self.text_parts])
            saved = entries.checkpoint(self.held, self.chunks, text)
            self.saved = self.held  # if this renewal fails, the entries still hold the text
        args = scripts.RenewArgs(
            stage.instance, lease_ms, self.epoch, hash_ttl, log_ttl, saved, self.held
        )
        deadline = int(time.time() * 1000) + lease_ms
        return [
            scripts.RENEW.command(self.keys, args),
            Command(RUNNING_INDEX, ("ZADD", RUNNING_INDEX, deadline, stage.key)),
        ]

    def renewed(self, results: list[Any]) -> None:
        if results[0] == -1:
            self.store._fence(self.stage)
        elif results[0] == 2:
            self.store._lost(self)
            self.store.mark(self.stage)
        elif isinstance(results[0], list):  # the log lost its last entries
            self.verified = None
            self.store._resume_from(self, int(results[0][0]))
            self.store.mark(self.stage)


@dataclass
class _Write:
    """One stage's share of a flush, and what Redis holds of it once written."""

    mirror: _Mirror
    command: Command
    upto: int
    text_parts: int
    chunks: int
    done: bool
    checked: bool  # the script that reads the log first; else a plain XADD


class RedisStageStore(StageListener):
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
        flush_window: float = DEFAULT_FLUSH_WINDOW,
        on_written: Callable[[float], None] | None = None,
        on_reachable: Callable[[bool], None] | None = None,
    ) -> None:
        """``cancel_here(key, reason)`` cancels a stage of this process for a request made
        elsewhere: the cancel listener calls it. ``adopt(key)`` tries to take over the
        orphaned stage with that key (``manager.StageManager.adopt``); whether it, or
        another, has. ``flush_window``: how long the flusher gathers writes into one round
        trip. ``on_written(seconds)``: told, for each write, how long the oldest event in
        it waited to be durable (an upper bound for every event it carried).
        ``on_reachable(reachable)``: told when Redis stops or starts answering this
        process, as its flusher's writes and its sweeper's looks find it."""
        self.url = url
        self.ttl_ms = int(ttl_seconds * 1000)
        self.event_ttl_ms = int(event_ttl_seconds * 1000)  # StageSettings: at most the TTL
        self.max_events = max_events
        self._maxlen = str(max_events)  # an argument of every XADD, packed as text
        self.flush_window = flush_window
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.leases = LeaseKeeper(lambda: self.batcher, lease_seconds)
        self.reader = StoreReader(
            lambda: self.batcher, self.ttl_ms, self.event_ttl_ms, lease_seconds, adopt
        )
        self._adopt = adopt
        self._on_written = on_written
        self._batcher: Batcher | None = None
        # Each stage to write, and when its oldest unwritten event came (monotonic).
        self._dirty: dict[Stage, float] = {}
        self._mirrors: dict[Stage, _Mirror] = {}
        self._wake = threading.Event()  # a gevent event where threading is patched
        self._flusher: Task | None = None
        self._listener: Task | None = None
        self._cancel_here = cancel_here
        self._lock = threading.Lock()
        self._failing = False
        self._sweep_failing = False
        self._on_reachable = on_reachable
        self._sweeper: Task | None = None

    # -- connection, per process ---------------------------------------------------------

    @property
    def batcher(self) -> Batcher:
        """This process's client, in its batcher. The first use in a process (a worker
        forked after the app was made has its own) connects, and starts the process's
        flusher and cancel listener: once per process, not per stage. Raises
        StoreUnavailable when a cluster cannot be reached to learn its slots."""
        batcher = self._batcher
        if batcher is None:
            with self._lock:
                if self._batcher is None:
                    self._start_in_this_process()
            batcher = self._batcher
            assert batcher is not None
        return batcher

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
            client = connect(self.url)
        self._batcher = Batcher(client, scripts.ALL)
        # A worker forked after this process connected has none of its client, its
        # tasks or its mirrors: it starts its own on first use.
        os.register_at_fork(after_in_child=self._forget_the_parents)
        self._flusher = Task(self._flush_forever, name="stageserver-store-flush")
        self._listener = Task(self._listen_for_cancels, name="stageserver-store-cancel")
        if self._adopt is not None:
            self._sweeper = Task(self._adopt_orphans_forever, name="stageserver-store-sweep")

    def _forget_the_parents(self) -> None:
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self._batcher = None
        self._dirty, self._mirrors = {}, {}
        self._lock = threading.Lock()

    def _call(self, command: Command) -> Any:
        """One command's reply. Raises StoreUnavailable."""
        [result] = self.batcher.run([command])
        if isinstance(result, Exception):
            raise StoreUnavailable(result)
        return result

    # -- the owner's side ----------------------------------------------------------------

    def claim(self, stage: Stage) -> None:
        """Make ``stage`` the one live stage with its key, everywhere, and mirror it.
        Raises StageConflict when one runs, StoreUnavailable when Redis cannot say."""
        lease_ms = self.leases.lease_ms
        ttl, event_ttl = self.ttls_ms(stage)
        fields = [item for pair in self._fields(stage).items() for item in pair]
        args = (
            *scripts.ClaimArgs(stage.instance, lease_ms, ttl + lease_ms, event_ttl + lease_ms),
            *fields,
        )
        deadline = int(time.time() * 1000) + lease_ms
        # One round trip: the claim (a script: atomic, one slot) and the running index
        # (its own slot). An index entry for a stage that turns out to be another's is
        # harmless: the sweeper finds its lease held.
        claimed, _ = self.batcher.run(
            [
                scripts.CLAIM.command(stage_keys(stage.key), args),
                Command(RUNNING_INDEX, ("ZADD", RUNNING_INDEX, deadline, stage.key)),
            ]
        )
        if isinstance(claimed, Exception):
            raise StoreUnavailable(claimed)
        if claimed != 1:
            raise StageConflict(stage.stage_id)
        mirror = self._mirrors[stage] = _Mirror(stage, self, entries.FIRST_EPOCH, 0)
        self.leases.hold(mirror)

    def take_over(self, key: str, instance: str) -> Claim | None:
        """Claim the orphaned stage ``key`` for the stage instance ``instance``; None when
        it is not to be taken (someone holds it, it ended, it has no record). Raises
        StoreUnavailable."""
        keys = stage_keys(key)
        lease_ms = self.leases.lease_ms
        now = int(time.time() * 1000)
        args = scripts.TakeOverArgs(
            instance, lease_ms, now, lease_ms // 2, self.event_ttl_ms + lease_ms
        )
        claimed = self._call(scripts.TAKE_OVER.command(keys, args))
        if claimed is None:
            return None
        # The index is a hint for the sweepers (its node may be down): the claim stands.
        with contextlib.suppress(*STORE_ERRORS):
            if claimed == 0:
                self.redis.zrem(RUNNING_INDEX, key)
            else:
                self.redis.zadd(RUNNING_INDEX, {key: now + lease_ms})
        if claimed == 0:
            return None
        with store_errors():
            try:
                text, chunks = entries.read_durable_text(self.redis, keys.text, keys.log)
            except STORE_ERRORS:
                self.release_claim(key, instance)  # for another worker, or this one, later
                raise
        epoch, held, record, owner, handoff, summary = claimed
        return Claim(
            epoch=int(epoch),
            held=int(held),
            record=json.loads(record) if record else {},
            text=text,
            content_chunks=chunks,
            owner=bytes(owner).decode(),
            handed_off=bool(handoff),
            summary=json.loads(summary),
        )

    def release_claim(self, key: str, instance: str) -> None:
        """Give back a claim this worker cannot run (it is full, say): any other takes it."""
        try:
            if (
                self._call(scripts.HAND_OFF.command(stage_keys(key), scripts.HandOffArgs(instance)))
                == 1
            ):
                self.redis.zadd(RUNNING_INDEX, {key: 0})
        except (StoreUnavailable, *STORE_ERRORS) as exc:
            log.warning("stage %s: its claim lapses by itself (%s)", key, exc)

    def _adopt_orphans_forever(self) -> None:
        """Every quarter of a lease: try to take over the stages whose lease ran out, or
        that a draining worker let go (``TAKE_OVER``: half a lease in doubt first). So
        an orphan is claimed within two leases of its owner's last renewal, whether or
        not anyone follows it."""
        assert self._adopt is not None
        while True:
            time.sleep(self.leases.lease_seconds / 4)
            try:
                due = int(time.time() * 1000)
                keys = self.redis.zrangebyscore(RUNNING_INDEX, "-inf", due, start=0, num=50)
            except (StoreUnavailable, *STORE_ERRORS):
                self._reached(swept=False)  # the flusher and the leases log it
                continue
            self._reached(swept=True)
            for key in keys:
                try:
                    self._adopt(bytes(key).decode())
                except Exception:
                    log.exception("could not take over stage %s", key)

    def adopt(self, stage: Stage, claim: Claim) -> None:
        """Mirror a stage taken over (``take_over``): Redis holds its first events and
        its text, as ``claim`` says."""
        mirror = self._mirrors[stage] = _Mirror(stage, self, claim.epoch, claim.held)
        mirror.resummarize = True
        self.leases.hold(mirror)
        self.mark(stage)

    def on_event(self, stage: Stage, seq: int, wire: bytes) -> None:
        """For every event of a claimed stage: cheap; the flusher does the writing, and
        publishes it. While Redis cannot be written, the event is published at once."""
        self.mark(stage)
        if self._failing:
            stage.publish(seq + 1)

    def on_continue(self, stage: Stage, record: ContinuationRecord) -> None:
        mirror = self._mirrors.get(stage)
        if mirror is not None:
            mirror.resummarize = True  # its status lists its continuations

    def on_finish(self, stage: Stage) -> None:
        """Write the end now, before any client can read it, so that its id is free on
        every host when one does. While Redis fails, the flusher writes it later. A stage
        handed off is written whole, then let go for another worker to take over."""
        if self._failing or stage not in self._mirrors:
            return
        since = self._dirty.pop(stage, time.monotonic())
        try:
            if self._flush({stage: since}):
                self._dirty.setdefault(stage, since)  # the flusher tries again
                self._wake.set()
            elif stage.status == StageStatus.HANDED_OFF:
                self._let_go(stage)
        except Exception:  # the stage's end goes on to its clients regardless
            log.exception("stage %s: its end is written when the store answers", stage.key)
            self._dirty.setdefault(stage, since)
            self._wake.set()

    def _let_go(self, stage: Stage) -> None:
        mirror = self._mirrors.pop(stage, None)
        if mirror is None:
            return
        self.leases.release(mirror)
        self.release_claim(stage.key, stage.instance)

    def mark(self, stage: Stage) -> None:
        """Have the flusher write what the stage has that Redis does not (a stage the
        store lost, ``_Mirror.lost``, whole)."""
        if stage not in self._dirty:
            self._dirty[stage] = time.monotonic()
            self._wake.set()

    # -- the flusher ---------------------------------------------------------------------

    def _flush_forever(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(self.flush_window)
            self._wake.clear()
            batch, self._dirty = self._dirty, {}
            try:
                again = self._flush(batch)
            except Exception:
                log.exception("stage store flush failed")
                again = batch
            if again:
                for stage, since in again.items():
                    self._dirty.setdefault(stage, since)
                time.sleep(_RETRY_DELAY)
                self._wake.set()

    def _flush(self, batch: dict[Stage, float]) -> dict[Stage, float]:
        """Write the batch; return the stages to write again later, with their times.
        One that found Redis elsewhere than expected (a restart, a write in flight, a
        slot moved) is written again at once, read first."""
        resynced, failed = self._write_batch(batch)
        if resynced:
            again, failed_again = self._write_batch({s: batch[s] for s in resynced})
            failed |= again | failed_again
        if failed and not self._failing:
            log.warning(
                "stage store unavailable; %d stages keep streaming here and their mirror "
                "catches up when it answers",
                len(failed),
            )
        elif self._failing and not failed:
            log.warning("the stage store answers again; its mirror catches up")
        self._reached(flushed=not failed)
        for stage in failed:
            stage.publish(stage.next_seq)
        return {stage: batch[stage] for stage in failed}

    def _reached(self, *, flushed: bool | None = None, swept: bool | None = None) -> None:
        """Record whether the flusher's write, or the sweeper's look, reached Redis; tell
        ``on_reachable`` when that changes whether both do. The sweeper looks every
        quarter of a lease, so an outage is seen with no stage running too."""
        before = not (self._failing or self._sweep_failing)
        if flushed is not None:
            self._failing = not flushed
        if swept is not None:
            self._sweep_failing = not swept
        after = not (self._failing or self._sweep_failing)
        if after != before and self._on_reachable is not None:
            self._on_reachable(after)

    def _write_batch(self, batch: dict[Stage, float]) -> tuple[set[Stage], set[Stage]]:
        """Write the batch in one round trip per node: the stages resynced (to write
        again at once), and those that failed (to write again later)."""
        writes = []
        for stage in batch:
            mirror = self._mirrors.get(stage)
            if mirror is not None:
                write = self._write(mirror)
                if write is not None:
                    writes.append(write)
        if not writes:
            return set(), set()
        results = self.batcher.run([write.command for write in writes])
        now = oldest = time.monotonic()
        resynced: set[Stage] = set()
        failed: set[Stage] = set()
        ended: list[str] = []
        for write, result in zip(writes, results, strict=True):
            mirror, stage = write.mirror, write.mirror.stage
            if result == 1 or (not write.checked and isinstance(result, bytes)):
                self._written(write)
                oldest = min(oldest, batch[stage])
                if write.done:
                    ended.append(stage.key)
                continue
            mirror.verified = None
            if result == -1:
                self._fence(stage)
            elif result == -2:
                self._lost(mirror)
                resynced.add(stage)
            elif isinstance(result, list):
                mirror.held = int(result[0])
                self._resume_from(mirror, mirror.held)
                resynced.add(stage)
            elif result is None or _refused_id(result):
                resynced.add(stage)  # a plain XADD found no log, or one ahead: read it
            else:  # this stage's node could not be reached, or refused it
                failed.add(stage)
        if self._on_written is not None and oldest < now:
            self._on_written(now - oldest)
        if ended:
            [dropped] = self.batcher.run([Command(RUNNING_INDEX, ("ZREM", RUNNING_INDEX, *ended))])
            if isinstance(dropped, Exception):  # the sweeper drops them when it meets them
                log.warning("could not drop %d ended stages from the index: %s", len(ended),
                            dropped)  # fmt: skip
        return resynced, failed

    def _write(self, mirror: _Mirror) -> _Write | None:
        """The command that writes what Redis lacks of the stage; None if nothing."""
        stage = mirror.stage
        # Read before the events, so the terminal one is in them. Handed off is not done:
        # the stage goes on elsewhere.
        done = stage.finished and stage.status != StageStatus.HANDED_OFF
        events = stage.events_since(mirror.next_seq)
        upto = events[-1][0] + 1 if events else mirror.next_seq
        parts = stage.text_parts
        chunks = stage.content_chunks
        verified = mirror.verified == self.batcher.breaks
        checked = (
            not verified
            or mirror.lost
            or mirror.resummarize
            or stage.finished
            or len(events) > entries.MAX_EVENTS_PER_ENTRY
        )
        keys = mirror.keys
        if not checked:
            if not events:
                return None
            added = "".join(parts[mirror.text_parts :])
            values = entries.fields(events, terminal=False, text=added, chunks=chunks)
            command = Command(
                keys.log,
                ("XADD", keys.log, "NOMKSTREAM", "MAXLEN", "~", self._maxlen,
                 entries.entry_id(mirror.epoch, upto), *values),
            )  # fmt: skip
            return _Write(mirror, command, upto, len(parts), chunks, done, checked=False)
        resummarize = done or mirror.lost or mirror.resummarize
        summary = json.dumps(self._summary(stage, mirror)) if resummarize else ""
        # Handed off is not an end: Redis keeps it running, for its taker.
        status = "running" if stage.status == StageStatus.HANDED_OFF else stage.status
        answer = json.dumps(stage.answer()) if done else ""
        saved = "" if done else entries.checkpoint(upto, chunks, "".join(parts))
        ttl, event_ttl = self.ttls_ms(stage)
        held = "" if verified else mirror.held  # no doubt: nothing to read first
        args: list[Any] = list(
            scripts.WriteArgs(
                token=stage.instance,
                lease_ms=self.leases.lease_ms,
                epoch=mirror.epoch,
                held=held,
                maxlen=self.max_events,
                finished=int(done),
                ttl_ms=ttl,
                event_ttl_ms=event_ttl,
                status=status,
                summary=summary,
                checkpoint=saved,
                gap=mirror.gap,
                owner=self.owner,
                prompt_tokens=stage.spec.prompt_tokens_estimate,
                answer=answer,
            )
        )
        last = stage.next_seq - 1
        size = entries.MAX_EVENTS_PER_ENTRY
        for start in range(0, len(events), size):
            part = events[start : start + size]
            values = entries.fields(
                part, terminal=done and part[-1][0] == last, text="", chunks=chunks
            )
            args += [entries.entry_id(mirror.epoch, part[-1][0] + 1), len(values), *values]
        command = scripts.WRITE.command(keys, args)
        return _Write(mirror, command, upto, len(parts), chunks, done, checked=True)

    def _written(self, write: _Write) -> None:
        mirror, stage = write.mirror, write.mirror.stage
        mirror.held = mirror.next_seq = write.upto
        mirror.text_parts, mirror.chunks = write.text_parts, write.chunks
        if write.checked:
            mirror.lost, mirror.resummarize = False, False
            mirror.verified = self.batcher.breaks
            mirror.saved = write.upto
        stage.publish(write.upto)
        if write.done:
            self._mirrors.pop(stage, None)
            self.leases.release(mirror)

    def ttls_ms(self, stage: Stage) -> tuple[int, int]:
        """How long its status and its events are kept after its end, in ms."""
        spec = stage.spec
        ttl = max(self.ttl_ms, int(spec.keep_seconds * 1000))
        return ttl, min(ttl, max(self.event_ttl_ms, int(spec.keep_events_seconds * 1000)))

    def _lost(self, mirror: _Mirror) -> None:
        mirror.lost, mirror.held, mirror.verified = True, 0, None  # write the stage whole
        self._resume_from(mirror, 0)

    def _resume_from(self, mirror: _Mirror, held: int) -> None:
        """Redis holds ``held`` events: write on from there, or from the oldest this worker
        still has, recording what is lost between."""
        first = mirror.stage.first_kept_seq
        if held >= first:
            mirror.next_seq = held
            return
        mirror.next_seq = first
        lost = f"events {held} to {first - 1} were lost by the store while it was unavailable"
        mirror.gap = f"{mirror.gap}; {lost}" if mirror.gap else lost

    def _summary(self, stage: Stage, mirror: _Mirror) -> dict[str, Any]:
        summary = stage.summary()
        if stage.status == StageStatus.HANDED_OFF:
            summary["status"] = "running"
        if mirror.gap:
            summary["gap"] = mirror.gap
        return summary

    def _fields(self, stage: Stage) -> dict[str, Any]:
        return {
            "status": stage.status,
            "owner": self.owner,
            "summary": json.dumps(stage.summary()),
            "prompt_tokens": stage.spec.prompt_tokens_estimate,
            "epoch": entries.FIRST_EPOCH,
            # What another host needs to end the stage in its dialect, or continue it.
            "record": json.dumps(stage.record().to_json()),
        }

    def _fence(self, stage: Stage) -> None:
        """Another holds this stage's lease now: stop it, and write nothing more of it."""
        mirror = self._mirrors.pop(stage, None)
        if mirror is None:
            return
        self.leases.release(mirror)
        log.warning("stage %s: this worker lost its lease in the store; stopping it", stage.key)
        stage.abort(
            LeaseLost(
                f"this worker ({self.owner}) lost its lease on stage {stage.stage_id!r} while "
                "cut off from the stage store, and the stage was taken over; retry it"
            )
        )

    def claim_idempotency(
        self, key: str, stage_id: str, digest: str, ttl_seconds: float
    ) -> tuple[str, str] | None:
        """Claim an idempotency key (``principal/key``) for ``stage_id``, whose request's
        body has ``digest``; the stage id that holds it already, and its body's digest,
        if one does. Raises StoreUnavailable."""
        name = idempotency_key(key)
        with store_errors():
            if self.redis.set(name, f"{stage_id} {digest}", nx=True, px=int(ttl_seconds * 1000)):
                return None
            held = self.redis.get(name)
        return None if held is None else _idempotency_holder(held)

    def release_idempotency(self, key: str, stage_id: str) -> None:
        name = idempotency_key(key)
        try:
            held = self.redis.get(name)
            if held is not None and _idempotency_holder(held)[0] == stage_id:
                self.redis.delete(name)
        except STORE_ERRORS as exc:
            log.warning("idempotency key of a refused stage kept until it expires: %s", exc)

    def forget(self, key: str) -> None:
        """Delete a finished stage's keys: every host forgets it. Raises StoreUnavailable."""
        with store_errors():
            self.redis.delete(*stage_keys(key))

    def watched_elsewhere(self, key: str) -> bool:
        """Whether a response in some worker follows the stage through the store."""
        return self.reader.watchers(key) > 0

    def _listen_for_cancels(self) -> None:
        """Cancels published by other workers, for stages that run here. Reconnects."""
        while True:
            pubsub = None
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(CANCEL_CHANNEL)
                while True:
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None:
                        payload = json.loads(message["data"])
                        self._cancel_here(payload["key"], payload["reason"])
            except (*STORE_ERRORS, ValueError) as exc:
                _close(pubsub)  # its socket, before the next one is opened
                log.warning("stage store cancel listener: %s; reconnecting in 1 s", exc)
                time.sleep(1.0)
                self.batcher.refresh()  # its node may have failed over
            except Exception:  # a message it cannot read: the listener outlives it
                _close(pubsub)
                log.exception("stage store cancel listener failed; reconnecting in 1 s")
                time.sleep(1.0)

    def request_cancel(self, stage_key: str, stage_id: str, reason: str) -> None:
        """Ask the worker running the stage to cancel it. Raises UnknownStage, or
        StageFinished when it no longer runs."""
        self.reader.check_cancellable(stage_key, stage_id)
        with store_errors():
            self.redis.publish(CANCEL_CHANNEL, json.dumps({"key": stage_key, "reason": reason}))


def _idempotency_holder(value: bytes) -> tuple[str, str]:
    """The stage id and the body's digest an idempotency key holds: ``<stage id> <digest>``
    (a digest is hex: the last space is the one between them)."""
    stage_id, _, digest = bytes(value).decode().rpartition(" ")
    return stage_id, digest


def _refused_id(error: Exception) -> bool:
    """A plain XADD refused: the log's last entry is not below its id (a write in
    flight landed, or another epoch fenced this one)."""
    return "equal or smaller" in str(error)


def _close(pubsub: Any) -> None:
    if pubsub is not None:
        with contextlib.suppress(Exception):
            pubsub.close()
