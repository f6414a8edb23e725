"""A stage's log in Redis (``ss:{key}:log``, a stream): one entry per write of its owner.

An entry holds the events that one write carried, each under its sequence number as
the field's name (``b"17"``: the exact bytes a client receives), and:

- ``t``: present when the last of them is the stage's terminal event;
- ``x``: the text they added to the answer, and ``c``: the answer's content chunks with
  them (both only when they added text);
- ``m``: the entry is a marker and carries no event (see epochs, below).

Its id is ``<epoch>-<n>``: ``n`` is how many events the log holds with it (the last
event's seq + 1; for a marker, the count when it was written), and ``epoch`` that of the
writer. The worker that starts a stage writes epoch 1 (``FIRST_EPOCH``), after a marker
``1-0``. A worker that takes the stage over, or ends it for a dead owner, takes the next
epoch and writes its marker first. Redis refuses an id not above the log's last, so that
marker fences every writer of an older epoch: the owner's plain ``XADD`` (the flusher's
fast path, which reads nothing) fails once the stage is no longer its own.

A reader resuming after event ``s`` reads from ``<FIRST_EPOCH>-<s+1>``: that finds the
entries of epoch 1 that hold later events, and every entry of a later epoch, in order,
whose events up to ``s`` it skips.

The text so far is what a taker continues from, and what a status shows. The owner does
not write it whole with each write, only its entries' ``x``; ``ss:{key}:text`` holds a
checkpoint, ``<n>:<chunks>:<text>``: the answer as of the log's first ``n`` events. The
owner writes one with a lease renewal once some hundreds of events came since the last,
and with every write that reads the log first. The text is the checkpoint and the ``x``
of every later entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

FIRST_EPOCH = 1
#: Events per entry: an entry is one Lua call's arguments in the checked write.
MAX_EVENTS_PER_ENTRY = 256


def entry_id(epoch: int, held: int) -> str:
    return f"{epoch}-{held}"


def held_by(entry: bytes) -> int:
    """How many events the log holds with the entry of this id."""
    return int(entry.rpartition(b"-")[2])


def held_in(newest: Sequence[tuple[bytes, Any]]) -> int:
    """How many events a log holds, from its newest entry (``XREVRANGE ... COUNT 1``)."""
    return held_by(newest[0][0]) if newest else 0


def fields(
    events: Sequence[tuple[int, bytes]], *, terminal: bool, text: str, chunks: int
) -> list[Any]:
    """An entry's fields and values, flat, as ``XADD`` takes them (no int: see batch.py)."""
    flat: list[Any] = []
    for seq, wire in events:
        flat += (str(seq), wire)
    if terminal:
        flat += ("t", "1")
    if text:
        flat += ("x", text, "c", str(chunks))
    return flat


def events_of(entry_fields: dict[bytes, bytes]) -> tuple[list[tuple[int, bytes]], bool]:
    """The events of an entry (seq, wire), and whether the last is terminal."""
    events = [(int(name), wire) for name, wire in entry_fields.items() if name[:1].isdigit()]
    return events, b"t" in entry_fields


def checkpoint(held: int, chunks: int, text: str) -> str:
    return f"{held}:{chunks}:{text}"


def durable_text(
    saved: bytes | None, newest_first: Sequence[tuple[bytes, dict[bytes, bytes]]]
) -> tuple[str, int, bool]:
    """The text and content chunks of a log, from its checkpoint and its entries, newest
    first (``XREVRANGE``); and whether those entries reached back to the checkpoint (if
    not, read more)."""
    held, chunks, text = 0, 0, ""
    if saved:
        count, _, rest = saved.partition(b":")
        saved_chunks, _, saved_text = rest.partition(b":")
        held, chunks, text = int(count), int(saved_chunks), saved_text.decode()
    added: list[bytes] = []
    last_chunks: int | None = None
    reached = False
    for entry, values in newest_first:
        if held_by(entry) <= held:
            reached = True
            break
        if b"x" in values:
            added.append(values[b"x"])
            if last_chunks is None:
                last_chunks = int(values[b"c"])
    if last_chunks is not None:
        chunks = last_chunks
    return text + b"".join(reversed(added)).decode(), chunks, reached


def read_durable_text(client: Any, text_key: str, log_key: str) -> tuple[str, int]:
    """The stage's text and content chunks as Redis holds them (one round trip, unless
    the checkpoint is old)."""
    page = 256
    pipe = client.pipeline(transaction=False)
    pipe.get(text_key)
    pipe.xrevrange(log_key, count=page)
    saved, entries = pipe.execute()
    while True:
        text, chunks, reached = durable_text(saved, entries)
        if reached or len(entries) < page:
            return text, chunks
        page *= 4
        entries = client.xrevrange(log_key, count=page)
