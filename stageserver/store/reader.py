"""Reading stages of other workers and hosts from the shared store (see mirror.py).

Any worker answers for any stage: its status, its events (``RemoteFeed``, which the one
follow loop in stream.py reads), and a cancel. It also notices a stage whose owner has
died: its lease (``ss:{key}:live``) gone while the stage still says ``running``. The
first reader that sees that marks the stage ``suspect_since``; one that still sees it
half a lease later takes the stage over (``adopt``, which continues its answer), or,
where that cannot be (no taker, a stage from before takeovers), ends the stage for
everyone, in one script: an ``error`` event at the end of its log (after its opening, when
its owner died before writing that), naming the worker that stopped, and the status
``error``. Half a lease leaves an owner that was only cut off from Redis the time to take
its lease back.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from ..errors import (
    EventsExpired,
    StageFinished,
    StageLost,
    UnknownStage,
    store_unavailable_message,
)
from ..stages.dialect import Ending, dialect_of, resume_at
from ..stages.events import SeedDialect
from ..stages.feeds import RefusedFeed
from ..stages.stage import Subscriber
from ..stages.usage import final_usage
from . import entries, scripts
from .batch import Batcher, Command
from .connection import STORE_ERRORS, store_errors
from .keys import stage_keys

_READ_BLOCK_SECONDS = 1.0  # a remote watcher re-checks its client and the owner this often


def _held(top: list[Any]) -> int:
    """How many events a log holds, from its last entry's id (entries.py)."""
    return entries.held_by(top[0][0]) if top else 0


class StoreReader:
    def __init__(
        self,
        batcher: Callable[[], Batcher],
        ttl_ms: int,
        event_ttl_ms: int,
        lease_seconds: float,
        adopt: Callable[[str], bool] | None = None,
    ) -> None:
        """``adopt(key)``: take the orphaned stage over; whether it, or another, has."""
        self._batcher = batcher
        self._adopt = adopt
        self.ttl_ms = ttl_ms
        self.event_ttl_ms = event_ttl_ms
        self.lease_seconds = lease_seconds

    @property
    def batcher(self) -> Batcher:
        return self._batcher()

    @property
    def redis(self) -> Any:
        return self._batcher().client

    def watchers(self, key: str) -> int:
        try:
            return int(self.redis.hget(stage_keys(key).hash, "watchers") or 0)
        except STORE_ERRORS:
            return 0

    def summary(self, stage_key: str, stage_id: str) -> dict[str, Any] | None:
        """The stage's status as ``Stage.summary`` gives it; None if the store has none."""
        with store_errors():
            self.check_owner(stage_key, stage_id)
            hash_key, log_key, text_key, _ = stage_keys(stage_key)
            pipe = self.redis.pipeline(transaction=False)
            pipe.hmget(hash_key, "summary", "gap")
            pipe.xrevrange(log_key, count=1)
            (raw, gap), top = pipe.execute()
            if raw is None:
                return None
            summary: dict[str, Any] = json.loads(raw)
            if summary["status"] == "running":
                # The summary is the one written at the claim; the text and events go on.
                text, _ = entries.read_durable_text(self.redis, text_key, log_key)
                summary.update(text=text, events=_held(top))
        if gap:
            summary["gap"] = gap.decode()
        return summary

    def feed(
        self, stage_key: str, stage_id: str, after_seq: int
    ) -> RemoteFeed | RefusedFeed | None:
        """A feed of the stage's events after ``after_seq``; None when the stage has ended
        and that was its last event. Raises UnknownStage, EventsExpired."""
        hash_key, log_key, _, _ = stage_keys(stage_key)
        with store_errors():
            pipe = self.redis.pipeline(transaction=False)
            pipe.hget(hash_key, "status")
            pipe.hget(hash_key, "summary")
            pipe.exists(log_key)
            pipe.xrevrange(log_key, count=1)
            status, raw, has_log, top = pipe.execute()
        if status is None:
            raise UnknownStage(stage_id)
        if status != b"running":
            if after_seq >= int(json.loads(raw)["events"]) - 1:
                return None
            if not has_log:
                raise EventsExpired(stage_id)
        elif after_seq >= _held(top):  # see stages.feeds.RefusedFeed
            return RefusedFeed(stage_id, after_seq, _held(top))
        return RemoteFeed(self, stage_key, stage_id)

    def first_kept(self, stage_key: str) -> int:
        """The oldest event the stage's log still holds (the next one when it holds
        none). Raises StoreUnavailable."""
        _, log_key, _, _ = stage_keys(stage_key)
        with store_errors():
            first = self.redis.xrange(log_key, count=1)
        if not first:
            return 0
        entry, values = first[0]
        events, _ = entries.events_of(values)
        return events[0][0] if events else entries.held_by(entry)

    def check_cancellable(self, stage_key: str, stage_id: str) -> None:
        """Raises UnknownStage, or StageFinished when the stage no longer runs."""
        hash_key, _, _, _ = stage_keys(stage_key)
        with store_errors():
            self.check_owner(stage_key, stage_id)
            status = self.redis.hget(hash_key, "status")
        if status is None:
            raise UnknownStage(stage_id)
        if status != b"running":
            raise StageFinished(stage_id)

    def check_owner(self, stage_key: str, stage_id: str) -> None:
        """If the running stage's owner has lost its lease for half a lease, end the stage
        (see the module docstring). Raises one of STORE_ERRORS."""
        hash_key, log_key, text_key, live_key = stage_keys(stage_key)
        redis_client = self.redis
        pipe = redis_client.pipeline(transaction=False)
        pipe.exists(live_key)
        pipe.hmget(
            hash_key, "status", "suspect_since", "owner", "summary", "prompt_tokens", "record"
        )
        pipe.xrevrange(log_key, count=1)
        live, (status, suspect_since, owner, raw, prompt, record), top = pipe.execute()
        if live or status != b"running":
            return
        now = int(time.time() * 1000)
        if suspect_since is None:
            redis_client.hsetnx(hash_key, "suspect_since", now)
            return
        if now - int(suspect_since) < self.lease_seconds * 500:
            return
        if self._adopt is not None and record and self._adopt(stage_key):
            return
        held = _held(top)
        text, _ = entries.read_durable_text(redis_client, text_key, log_key)
        worker = (owner or b"?").decode()
        message = (
            f"the worker that ran stage {stage_id!r} ({worker}) stopped: its lease lapsed "
            f"{self.lease_seconds:g} s after its last sign of life; retry the stage"
        )
        summary = json.loads(raw)
        usage = final_usage(None, int(prompt or 0), held)
        ending = Ending("error", usage, text=text, error=message)
        # A stage claimed by a worker from before dialects has no record: it is the seed's.
        dialect = dialect_of(json.loads(record)["dialect"]) if record else SeedDialect(stage_id)
        # Its owner may have died before its opening was durable: the opening comes first.
        wires = resume_at(dialect, held, text)
        wires += dialect.ending(held + len(wires), ending)
        summary.update(
            status="error", error=message, text=ending.text, events=held + len(wires), usage=usage
        )
        args = scripts.DeclareDeadArgs(
            held=held,
            summary=json.dumps(summary),
            ttl_ms=self.ttl_ms,
            event_ttl_ms=self.event_ttl_ms,
            answer=json.dumps(dialect.answer(ending)),
        )
        keys = (hash_key, log_key, text_key, live_key)
        [result] = self.batcher.run([scripts.DECLARE_DEAD.command(keys, (*args, *wires))])
        if isinstance(result, Exception):
            raise result

    def answer(self, stage_key: str) -> tuple[dict[str, Any], int] | None:
        """The whole answer of a finished stage, in its dialect, and its HTTP status; None
        while it runs, or if the store has no such stage. Raises StoreUnavailable."""
        with store_errors():
            raw = self.redis.hget(stage_keys(stage_key).hash, "answer")
        if raw is None:
            return None
        body, status = json.loads(raw)
        return body, int(status)

    def record(self, stage_key: str) -> dict[str, Any] | None:
        """The stage's request as its owner wrote it (``mirror.stage_record``)."""
        with store_errors():
            raw = self.redis.hget(stage_keys(stage_key).hash, "record")
        return None if raw is None else dict(json.loads(raw))


class RemoteFeed:
    """The events of a stage that runs in another worker or host, read from its log in
    Redis (an ``EventFeed``, see stages/feeds.py). Its reads go straight to the node
    that holds the log: never to a replica, whose copy may lag."""

    def __init__(self, reader: StoreReader, stage_key: str, stage_id: str) -> None:
        self.stage_id = stage_id
        self._reader = reader
        self._redis = reader.redis
        self._stage_key = stage_key
        self._key, self._log_key, _, _ = stage_keys(stage_key)
        # Where the last read ended: the event after it, and the id of its entry.
        self._after: tuple[int, str] | None = None

    def open(self, subscriber: Subscriber) -> None:
        try:
            self._redis.hincrby(self._key, "watchers", 1)
        except STORE_ERRORS as exc:
            raise StageLost(store_unavailable_message(exc)) from None

    def read(self, subscriber: Subscriber, cursor: int, wait: float) -> tuple[bytes, int, bool]:
        deadline = time.monotonic() + wait
        while True:
            block = min(max(deadline - time.monotonic(), 0.001), _READ_BLOCK_SECONDS)
            batch = []
            ended = False
            for entry, values in self._xread(cursor, int(block * 1000)):
                events, terminal = entries.events_of(values)
                for seq, wire in events:
                    if seq < cursor:
                        continue  # read before, or the start of a resume mid-entry
                    if seq != cursor:
                        self._gap(cursor, seq)
                    cursor = seq + 1
                    batch.append(wire)
                ended = ended or terminal
                self._after = (cursor, entry.decode())
            if batch or ended:
                return b"".join(batch), cursor, ended
            if subscriber.client_gone:
                return b"", cursor, False
            self._still_there()
            if time.monotonic() >= deadline:
                return b"", cursor, False

    def _xread(self, cursor: int, block_ms: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """One blocking XREAD of the log from ``cursor``: its entries, with their fields.
        Sent through the batcher, so that it goes to the node that holds the log, and
        follows it when its slot moves (batch.py)."""
        after = self._after
        if after is not None and after[0] == cursor:
            start = after[1]
        else:  # see entries.py: from the first epoch's entry of this event on
            start = entries.entry_id(entries.FIRST_EPOCH, cursor)
        args = ("XREAD", "COUNT", 512, "BLOCK", block_ms, "STREAMS", self._log_key, start)
        [reply] = self._reader.batcher.run([Command(self._log_key, args)])
        if isinstance(reply, Exception):
            raise StageLost(store_unavailable_message(reply))
        if not reply:
            return []
        # One stream asked for: a map of it in RESP3, a list of [key, entries] in RESP2.
        [raw_entries] = reply.values() if isinstance(reply, dict) else [reply[0][1]]
        return [(entry, _pairs(values)) for entry, values in raw_entries]

    def close(self, subscriber: Subscriber, *, disconnected: bool) -> None:
        try:
            self._redis.hincrby(self._key, "watchers", -1)
        except STORE_ERRORS:
            pass

    def _gap(self, cursor: int, seq: int) -> None:
        """The log skips from ``cursor`` to ``seq``: say so, never pass over it."""
        try:
            gap = self._redis.hget(self._key, "gap")
        except STORE_ERRORS:
            gap = None
        raise StageLost(
            f"events {cursor} to {seq - 1} of stage {self.stage_id!r} are not in the stage "
            f"store ({gap.decode() if gap else 'no longer kept'}); its status is at "
            f"/stages/{self.stage_id}"
        )

    def _still_there(self) -> None:
        try:
            self._reader.check_owner(self._stage_key, self.stage_id)
            there = self._redis.exists(self._key)
        except STORE_ERRORS as exc:
            raise StageLost(store_unavailable_message(exc)) from None
        if not there:
            raise StageLost("the stage expired from the store")


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    """An entry's fields from the raw reply, ``[name, value, name, value, ...]``."""
    return dict(zip(flat[::2], flat[1::2], strict=True))
