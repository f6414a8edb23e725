"""A stage's ordered event log: the bytes of each event, numbered from 0.

Bounded: beyond ``max_events`` the oldest events are dropped, and their numbers are not
reused, so a reader's cursor (the number of the next event it wants) stays meaningful.
A reader whose cursor fell behind the window gets what is left.
"""

from __future__ import annotations


class EventLog:
    __slots__ = ("_events", "_first_seq", "_max_events")

    def __init__(self, max_events: int) -> None:
        self._events: list[bytes] = []
        self._first_seq = 0  # the number of _events[0], once old events are dropped
        self._max_events = max_events

    @property
    def next_seq(self) -> int:
        """The number the next event will get: also how many events there have been."""
        return self._first_seq + len(self._events)

    def __len__(self) -> int:
        """How many events the log still holds."""
        return len(self._events)

    def append(self, wire: bytes) -> int:
        """Add an event; return its number."""
        events = self._events
        events.append(wire)
        seq = self._first_seq + len(events) - 1
        if len(events) > self._max_events:
            drop = len(events) - self._max_events
            del events[:drop]
            self._first_seq += drop
        return seq

    def read(self, cursor: int) -> tuple[bytes, int]:
        """The events from number ``cursor`` on, joined, and the cursor after them."""
        start = max(cursor - self._first_seq, 0)
        events = self._events[start:]
        return b"".join(events), self._first_seq + start + len(events)

    def since(self, seq: int) -> list[tuple[int, bytes]]:
        """(number, event) pairs from ``seq`` on, as far as the log reaches back."""
        start = max(seq - self._first_seq, 0)
        return list(enumerate(self._events[start:], self._first_seq + start))

    def clear(self) -> None:
        """Forget every event; numbering goes on where it was."""
        self._first_seq += len(self._events)
        self._events = []
