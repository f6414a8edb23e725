"""Following a stage that runs in another worker or host: its events, read from its log
in Redis (``RemoteFeed``, an ``EventFeed``, see stages/feeds.py, which the one follow
loop in stream.py reads).

Its reads go straight to the node that holds the log, through the batcher: never to a
replica, whose copy may lag. Each is a blocking ``XREAD`` of at most a second, on a
connection of the node's follow pool (connection.py says how a worker's connections are
counted); when one brings nothing, the feed checks that the stage is still there, and
first that its owner lives (``takeover.Ownership.reap_orphan``): a watcher is often the
first to notice an owner's death. A hole in the log (events the store lost) ends the feed with a
``StageLost`` that names it, never a silent skip.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from ..errors import (
    EventsExpired,
    StageLost,
    StoreUnavailable,
    UnknownStage,
    store_unavailable_message,
)
from ..stages.feeds import RefusedFeed
from ..stages.stage import Subscriber
from . import entries
from .batch import FOLLOW_WAIT_SECONDS, Batcher, Command
from .connection import STORE_ERRORS, ConnectionsExhausted, store_errors
from .keys import stage_keys
from .takeover import Ownership

# A remote watcher re-checks its client and the owner this often; it waits as long for a
# follow connection.
_READ_BLOCK_SECONDS = FOLLOW_WAIT_SECONDS


def feed(
    batcher: Callable[[], Batcher],
    ownership: Ownership,
    stage_key: str,
    stage_id: str,
    after_seq: int,
) -> RemoteFeed | RefusedFeed | None:
    """A feed of the stage's events after ``after_seq``; None when the stage has ended
    and that was its last event. Raises UnknownStage, EventsExpired, StoreUnavailable."""
    keys = stage_keys(stage_key)
    with store_errors():
        pipe = batcher().client.pipeline(transaction=False)
        pipe.hget(keys.hash, "status")
        pipe.hget(keys.hash, "summary")
        pipe.exists(keys.log)
        pipe.xrevrange(keys.log, count=1)
        status, raw, has_log, top = pipe.execute()
    if status is None:
        raise UnknownStage(stage_id)
    if status != b"running":
        if after_seq >= int(json.loads(raw)["events"]) - 1:
            return None
        if not has_log:
            raise EventsExpired(stage_id)
    elif after_seq >= entries.held_in(top):  # see stages.feeds.RefusedFeed
        return RefusedFeed(stage_id, after_seq, entries.held_in(top))
    return RemoteFeed(batcher, ownership, stage_key, stage_id)


class RemoteFeed:
    """The events of a stage that runs in another worker or host."""

    def __init__(
        self, batcher: Callable[[], Batcher], ownership: Ownership, stage_key: str, stage_id: str
    ) -> None:
        self.stage_id = stage_id
        self._batcher = batcher
        self._ownership = ownership
        self._redis = batcher().client
        self._stage_key = stage_key
        keys = stage_keys(stage_key)
        self._key, self._log_key = keys.hash, keys.log
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
        follows it when its slot moves (batch.py), on a connection of the node's follow
        pool (connection.py): none when all of them stayed busy while it would block."""
        after = self._after
        if after is not None and after[0] == cursor:
            start = after[1]
        else:  # see entries.py: from the first epoch's entry of this event on
            start = entries.entry_id(entries.FIRST_EPOCH, cursor)
        args = ("XREAD", "COUNT", 512, "BLOCK", block_ms, "STREAMS", self._log_key, start)
        reply = self._batcher().follow(Command(self._log_key, args))
        if isinstance(reply, ConnectionsExhausted):
            return []  # every follow connection to its node was busy: read again soon
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
            self._ownership.reap_orphan(self._stage_key, self.stage_id)
            with store_errors():
                there = self._redis.exists(self._key)
        except StoreUnavailable as exc:
            raise StageLost(str(exc)) from None
        if not there:
            raise StageLost("the stage expired from the store")


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    """An entry's fields from the raw reply, ``[name, value, name, value, ...]``."""
    return dict(zip(flat[::2], flat[1::2], strict=True))
