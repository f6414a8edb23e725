"""The flusher: this process's stages written to Redis, a few milliseconds after their
events, and published to their clients once written.

Writes are batched and cost one command per stage: for each event the relay only marks
its stage dirty, and one flusher per process writes every dirty stage's new events a
flush window later (``STAGESERVER_STORE_FLUSH_WINDOW_SECONDS``), in one round trip per
Redis node (``batch.py``). The flusher owns that window: the claims and admissions
queued meanwhile (``Batcher.call``) go in the same round trip, and a call wakes it like
an event does. A stage's share is one plain ``XADD`` that reads nothing: its
entry id is fenced by Redis itself (``entries.py``). What an XADD cannot carry goes
through the fenced script ``WRITE`` (``scripts.py``): a stage's end, written at once,
before its clients hear of it, so that its id is free when they do (``write_end``); a
new summary; and any write after a doubt (an error, a lost connection, a failover: the
batcher's ``breaks``), which reads the log first. Once written, the events are published
(``Stage.publish``): a gated stage's clients read only what Redis holds.

Each stage it writes has a ``Mirror``: how much of the stage Redis holds, and its lease
(``leases.py``). The TTLs (every 15 s at most) and now and then a checkpoint of the text
go with the lease renewals, not with the writes. When the lease is not this instance's:

- if the stage was taken over or declared dead meanwhile, this worker was cut off past
  its lease (a partition, a long pause): it stops the stage, closes its upstream and
  writes nothing more to it (fencing, ``fence``);
- if nobody noticed (the lease merely lapsed, or Redis restarted and lost it), it takes
  the lease back and goes on: a store outage ends no healthy stream.

When Redis cannot be written, nothing ends: the stages stay dirty, the flusher tries again
every half second, and each keeps streaming to its own clients, published at once. When
Redis answers, the mirror catches up from where Redis stands (a restart or a failover may
have lost the last writes: the next write reads the log, and a renewal notices a log
shorter than it should be), from the worker's own log; what that log no longer holds is
recorded as a ``gap``, and a resume that needs it gets an ``error`` that says so, never a
silent hole.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..concurrency import Task, stop_task
from ..errors import LeaseLost
from ..stages.stage import Stage
from ..stages.status import StageStatus
from . import entries, scripts
from .batch import Batcher, Command
from .connection import Reachability, owner_name
from .keys import RUNNING_INDEX, stage_keys
from .leases import LeaseKeeper
from .retention import Retention

log = logging.getLogger("stageserver.store")

DEFAULT_FLUSH_WINDOW = 0.005  # STAGESERVER_STORE_FLUSH_WINDOW_SECONDS
_RETRY_DELAY = 0.5  # while Redis cannot be written
_TTL_REFRESH_SECONDS = 15.0  # at most this often per stage while it runs, and per quarter TTL
# A renewal writes a checkpoint of the text once this many events came since the last
# (or a quarter of the log's length, so that no entry after it is trimmed away): the
# text is rebuilt from it and the entries after it (entries.py).
_CHECKPOINT_EVENTS = 512


class Mirror:
    """One stage of this process in Redis: how much of it Redis holds, and its lease."""

    __slots__ = (
        "stage", "flusher", "keys", "epoch", "held", "next_seq", "text_parts", "chunks",
        "saved", "refreshed", "lost", "gap", "resummarize", "verified",
    )  # fmt: skip

    def __init__(self, stage: Stage, flusher: Flusher, epoch: int, held: int) -> None:
        self.stage = stage
        self.flusher = flusher
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
        self.verified: int | None = flusher.batcher.breaks

    def renew(self, lease_ms: int) -> list[Command]:
        """The renewal of its lease, with its TTLs every few seconds and now and then a
        checkpoint of its text (entries.py), and its place in the running index."""
        flusher, stage = self.flusher, self.stage
        hash_ttl = log_ttl = ""
        ttl, event_ttl = flusher.retention.of(stage)
        now = time.monotonic()
        if now - self.refreshed > min(_TTL_REFRESH_SECONDS, event_ttl / 4000):
            hash_ttl, self.refreshed = str(ttl + lease_ms), now
        log_ttl = str(event_ttl + lease_ms)
        saved = ""
        if self.held - self.saved >= min(_CHECKPOINT_EVENTS, flusher.max_events // 4):
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
            self.flusher.fence(self.stage)
        elif results[0] == 2:
            self.lose_all()
            self.flusher.mark(self.stage)
        elif isinstance(results[0], list):  # the log lost its last entries
            self.verified = None
            self.resume_from(int(results[0][0]))
            self.flusher.mark(self.stage)

    def lose_all(self) -> None:
        """The store lost the stage: write it whole."""
        self.lost, self.held, self.verified = True, 0, None
        self.resume_from(0)

    def resume_from(self, held: int) -> None:
        """Redis holds ``held`` events: write on from there, or from the oldest this worker
        still has, recording what is lost between."""
        first = self.stage.first_kept_seq
        if held >= first:
            self.next_seq = held
            return
        self.next_seq = first
        lost = f"events {held} to {first - 1} were lost by the store while it was unavailable"
        self.gap = f"{self.gap}; {lost}" if self.gap else lost

    def summary(self) -> dict[str, Any]:
        """The stage's summary as Redis keeps it: handed off, it still runs (elsewhere)."""
        stage = self.stage
        summary = stage.summary()
        if stage.status == StageStatus.HANDED_OFF:
            summary["status"] = "running"
        if self.gap:
            summary["gap"] = self.gap
        return summary


@dataclass
class _Write:
    """One stage's share of a flush, and what Redis holds of it once written."""

    mirror: Mirror
    command: Command
    upto: int
    text_parts: int
    chunks: int
    done: bool
    checked: bool  # the script that reads the log first; else a plain XADD


class Flusher:
    def __init__(
        self,
        batcher: Callable[[], Batcher],
        leases: LeaseKeeper,
        retention: Retention,
        max_events: int,
        reachability: Reachability,
        flush_window: float = DEFAULT_FLUSH_WINDOW,
        on_written: Callable[[float], None] | None = None,
    ) -> None:
        """``batcher``: gives this process's. ``reachability``: told whether each flush
        reached Redis. ``flush_window``: how long the flusher gathers writes into one
        round trip. ``on_written(seconds)``: told, for each write, how long the oldest
        event in it waited to be durable (an upper bound for every event it carried)."""
        self._batcher = batcher
        self.leases = leases
        self.retention = retention
        self.max_events = max_events
        self._maxlen = str(max_events)  # an argument of every XADD, packed as text
        self.flush_window = flush_window
        self._reachability = reachability
        self._on_written = on_written
        # Each stage to write, and when its oldest unwritten event came (monotonic).
        self._dirty: dict[Stage, float] = {}
        self._mirrors: dict[Stage, Mirror] = {}
        self._wake = threading.Event()  # a gevent event where threading is patched
        self._called = threading.Event()  # a call waits for the next batch
        self._task: Task | None = None
        self._stopping = threading.Event()
        self._failing = False

    @property
    def batcher(self) -> Batcher:
        return self._batcher()

    def start(self) -> None:
        """Start this process's flusher: once per process, not per stage."""
        self._task = Task(self._flush_forever, name="stageserver-store-flush")

    def stop(self) -> None:
        """Stop the flusher (the store is closed): it finishes the write it has begun,
        and writes nothing more."""
        stop_task(self._stopping, self._task, self._wake, self._called)

    def forget(self) -> None:
        """In a forked child: its parent's stages are none of its own."""
        self._dirty, self._mirrors = {}, {}

    # -- the stages it mirrors -----------------------------------------------------------

    def claimed(self, stage: Stage) -> None:
        """Mirror a stage this worker has just claimed: Redis holds its log's first marker
        (``scripts.CLAIM``)."""
        self._hold(Mirror(stage, self, entries.FIRST_EPOCH, 0))

    def taken_over(self, stage: Stage, epoch: int, held: int) -> None:
        """Mirror a stage taken over under ``epoch``: Redis holds its first ``held``
        events and its text. Its summary (its owner) is written at once."""
        mirror = Mirror(stage, self, epoch, held)
        mirror.resummarize = True
        self._hold(mirror)
        self.mark(stage)

    def _hold(self, mirror: Mirror) -> None:
        self._mirrors[mirror.stage] = mirror
        self.leases.hold(mirror)

    def mark(self, stage: Stage) -> None:
        """Have the flusher write what the stage has that Redis does not (a stage the
        store lost, ``Mirror.lost``, whole)."""
        if stage not in self._dirty:
            self._dirty[stage] = time.monotonic()
            self._wake.set()

    def on_event(self, stage: Stage, seq: int) -> None:
        """For every event of a mirrored stage: cheap; the flusher does the writing, and
        publishes it. While Redis cannot be written, the event is published at once."""
        self.mark(stage)
        if self._failing:
            stage.publish(seq + 1)

    def resummarize(self, stage: Stage) -> None:
        """Its summary changed while it runs (a continuation): write it again."""
        mirror = self._mirrors.get(stage)
        if mirror is not None:
            mirror.resummarize = True

    def write_end(self, stage: Stage) -> bool:
        """Write the stage's end (or hand-off) now, before any client can read it, so that
        its id is free on every host when one does; whether it was written. It goes with
        the window's next batch (``Batcher.call``): the ends of a burst share a round
        trip, and come after any write of the stage already in flight. While Redis
        fails, the flusher writes it later."""
        if self._failing or self._stopping.is_set() or stage not in self._mirrors:
            return False
        since = self._dirty.pop(stage, time.monotonic())
        try:
            if not self._flush({stage: since}, in_window=True):
                return True
        except Exception:  # the stage's end goes on to its clients regardless
            log.exception("stage %s: its end is written when the store answers", stage.key)
        self._dirty.setdefault(stage, since)  # the flusher tries again
        self._wake.set()
        return False

    def let_go(self, stage: Stage) -> bool:
        """Stop mirroring the stage, and renewing its lease; whether it was mirrored."""
        mirror = self._mirrors.pop(stage, None)
        if mirror is None:
            return False
        self.leases.release(mirror)
        return True

    def fence(self, stage: Stage) -> None:
        """Another holds this stage's lease now: stop it, and write nothing more of it."""
        if not self.let_go(stage):
            return
        log.warning("stage %s: this worker lost its lease in the store; stopping it", stage.key)
        stage.abort(
            LeaseLost(
                f"this worker ({owner_name()}) lost its lease on stage {stage.stage_id!r} "
                "while cut off from the stage store, and the stage was taken over; retry it"
            )
        )

    # -- the flusher ---------------------------------------------------------------------

    def _call_queued(self) -> None:
        self._called.set()
        self._wake.set()

    def _flush_forever(self) -> None:
        self.batcher.serve(self._call_queued)
        # Stopped at the top of a round: ``stop`` sets the flag before it wakes the
        # flusher, so a wake cleared in a round that had begun is followed by that check.
        while not self._stopping.is_set():
            self._wake.wait()
            if self._stopping.is_set():
                return
            time.sleep(self.flush_window)
            self._wake.clear()
            self._called.clear()
            batch, self._dirty = self._dirty, {}
            try:
                again = self._flush(batch)  # and the calls queued meanwhile
            except Exception:
                log.exception("stage store flush failed")
                again = batch
            if again:
                for stage, since in again.items():
                    self._dirty.setdefault(stage, since)
                self._pause()
                self._wake.set()

    def _pause(self) -> None:
        """While Redis cannot be written: the stages wait ``_RETRY_DELAY`` to be written
        again, but a call is sent at once (it is answered, if only with an error)."""
        until = time.monotonic() + _RETRY_DELAY
        while (left := until - time.monotonic()) > 0 and not self._stopping.is_set():
            if self._called.wait(left) and not self._stopping.is_set():
                self._called.clear()
                try:
                    self.batcher.run([])
                except Exception:
                    log.exception("stage store calls failed")

    def _flush(self, batch: dict[Stage, float], in_window: bool = False) -> dict[Stage, float]:
        """Write the batch; return the stages to write again later, with their times.
        One that found Redis elsewhere than expected (a restart, a write in flight, a
        slot moved) is written again at once, read first."""
        resynced, failed = self._write_batch(batch, in_window)
        if resynced:
            again, failed_again = self._write_batch({s: batch[s] for s in resynced}, in_window)
            failed |= again | failed_again
        if failed and not self._failing:
            log.warning(
                "stage store unavailable; %d stages keep streaming here and their mirror "
                "catches up when it answers",
                len(failed),
            )
        elif self._failing and not failed:
            log.warning("the stage store answers again; its mirror catches up")
        self._failing = bool(failed)
        self._reachability.found("flusher", not failed)
        for stage in failed:
            stage.publish(stage.next_seq)
        return {stage: batch[stage] for stage in failed}

    def _write_batch(
        self, batch: dict[Stage, float], in_window: bool = False
    ) -> tuple[set[Stage], set[Stage]]:
        """Write the batch in one round trip per node (``in_window``: with the window's
        next batch, as a call): the stages resynced (to write again at once), and those
        that failed (to write again later)."""
        writes = []
        for stage in batch:
            mirror = self._mirrors.get(stage)
            if mirror is not None:
                write = self._write(mirror)
                if write is not None:
                    writes.append(write)
        if not writes:
            if self.batcher.queued:
                self.batcher.run([])  # the calls alone
            return set(), set()
        send = self.batcher.call if in_window else self.batcher.run
        results = send([write.command for write in writes])
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
                self.fence(stage)
            elif result == -2:
                mirror.lose_all()
                resynced.add(stage)
            elif isinstance(result, list):
                mirror.held = int(result[0])
                mirror.resume_from(mirror.held)
                resynced.add(stage)
            elif result is None or _refused_id(result):
                resynced.add(stage)  # a plain XADD found no log, or one ahead: read it
            else:  # this stage's node could not be reached, or refused it
                failed.add(stage)
        if self._on_written is not None and oldest < now:
            self._on_written(now - oldest)
        if ended:
            [dropped] = send([Command(RUNNING_INDEX, ("ZREM", RUNNING_INDEX, *ended))])
            if isinstance(dropped, Exception):  # the sweeper drops them when it meets them
                log.warning(
                    "could not drop %d ended stages from the index: %s", len(ended), dropped
                )
        return resynced, failed

    def _write(self, mirror: Mirror) -> _Write | None:
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
        summary = json.dumps(mirror.summary()) if resummarize else ""
        # Handed off is not an end: Redis keeps it running, for its taker.
        status = "running" if stage.status == StageStatus.HANDED_OFF else stage.status
        answer = json.dumps(stage.answer()) if done else ""
        saved = "" if done else entries.checkpoint(upto, chunks, "".join(parts))
        ttl, event_ttl = self.retention.of(stage)
        args = scripts.WriteArgs(
            token=stage.instance,
            lease_ms=self.leases.lease_ms,
            epoch=mirror.epoch,
            held="" if verified else mirror.held,  # no doubt: nothing to read first
            maxlen=self.max_events,
            finished=int(done),
            ttl_ms=ttl,
            event_ttl_ms=event_ttl,
            status=status,
            summary=summary,
            checkpoint=saved,
            gap=mirror.gap,
            owner=owner_name(),
            prompt_tokens=stage.spec.prompt_tokens_estimate,
            answer=answer,
        )
        logged: list[Any] = []  # per entry: its id, its number of values, the values
        last = stage.next_seq - 1
        size = entries.MAX_EVENTS_PER_ENTRY
        for start in range(0, len(events), size):
            part = events[start : start + size]
            values = entries.fields(
                part, terminal=done and part[-1][0] == last, text="", chunks=chunks
            )
            logged += [entries.entry_id(mirror.epoch, part[-1][0] + 1), len(values), *values]
        command = scripts.WRITE.command(keys, (*args, *logged))
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


def _refused_id(error: Exception) -> bool:
    """A plain XADD refused: the log's last entry is not below its id (a write in
    flight landed, or another epoch fenced this one)."""
    return "equal or smaller" in str(error)
