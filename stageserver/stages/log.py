"""A stage's ordered event log: the bytes of each event, numbered from 0.

Bounded in events and in bytes: beyond ``max_events`` or ``max_bytes`` the oldest events
are dropped (never the newest), and their numbers are not reused, so a reader's cursor
(the number of the next event it wants) stays meaningful; ``first_seq`` says where the
log now begins, and a reader behind it has missed events.

A finished stage's log is compacted (``compact``): its events become one bytes object
and an array of where each ends, instead of a list of bytes objects. That is what a
finished stage costs while it stays replayable.
"""

from __future__ import annotations

from array import array

# A compacted log: every event in one bytes object, and where each one ends.
_Compacted = tuple[bytes, array]  # type: ignore[type-arg]


class EventLog:
    __slots__ = ("_events", "_first_seq", "_max_events", "_max_bytes", "_bytes")

    def __init__(self, max_events: int, max_bytes: int) -> None:
        # One attribute, so that a reader in another thread sees a list or a compacted
        # log, never half of each.
        self._events: list[bytes] | _Compacted = []
        self._first_seq = 0  # the number of the oldest event kept
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._bytes = 0

    @property
    def first_seq(self) -> int:
        return self._first_seq

    @property
    def next_seq(self) -> int:
        """The number the next event will get: also how many events there have been."""
        return self._first_seq + len(self)

    def __len__(self) -> int:
        """How many events the log still holds."""
        events = self._events
        return len(events) if isinstance(events, list) else len(events[1])

    def start_at(self, seq: int) -> None:
        """An empty log goes on from event ``seq`` (a stage taken over: another worker
        wrote the events before it)."""
        assert not len(self)
        self._first_seq = seq

    def append(self, wire: bytes) -> int:
        """Add an event; return its number."""
        events = self._events
        if not isinstance(events, list):
            raise RuntimeError("a compacted log takes no more events")
        events.append(wire)
        self._bytes += len(wire)
        seq = self._first_seq + len(events) - 1
        # The newest stays, whatever its size.
        while len(events) > 1 and (len(events) > self._max_events or self._bytes > self._max_bytes):
            self._bytes -= len(events[0])
            del events[0]
            self._first_seq += 1
        return seq

    def read(self, cursor: int, end: int) -> tuple[bytes, int]:
        """The events from number ``cursor`` up to (not including) ``end``, joined, and
        the cursor after them."""
        events = self._events
        start = max(cursor - self._first_seq, 0)
        stop = max(end - self._first_seq, 0)
        if isinstance(events, list):
            rest = events[start:stop]
            return b"".join(rest), self._first_seq + start + len(rest)
        joined, ends = events
        stop = min(stop, len(ends))
        if start >= stop:
            return b"", self._first_seq + start
        return joined[ends[start - 1] if start else 0 : ends[stop - 1]], self._first_seq + stop

    def since(self, seq: int) -> list[tuple[int, bytes]]:
        """(number, event) pairs from ``seq`` on, as far as the log reaches back."""
        events = self._events
        start = max(seq - self._first_seq, 0)
        if isinstance(events, list):
            return list(enumerate(events[start:], self._first_seq + start))
        joined, ends = events
        return [
            (self._first_seq + n, joined[ends[n - 1] if n else 0 : ends[n]])
            for n in range(start, len(ends))
        ]

    def compact(self) -> None:
        """Keep the events as one bytes object: the log of a finished stage."""
        events = self._events
        if not isinstance(events, list):
            return
        ends, end = array("L"), 0
        for wire in events:
            end += len(wire)
            ends.append(end)
        self._events = (b"".join(events), ends)

    def clear(self) -> None:
        """Forget every event; numbering goes on where it was."""
        self._first_seq = self.next_seq
        self._events = (b"", array("L"))
        self._bytes = 0
