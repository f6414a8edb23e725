"""Dialects: how a stage's events read on the wire.

A dialect turns what the upstream sends into the events a client reads, and is chosen
when the stage starts: the seed's (``events.SeedDialect``, for ``POST /chat``), Chat
Completions' or Responses' (``openai_api/``). The stage's log stores the rendered events,
so every host replays the same bytes, and a resume is an index into the log whatever the
dialect. No view or listener branches on a dialect's name: each asks the stage's dialect.

A dialect is one object per stage, with state of its own (a Responses stream opens its
output item once). Every method returns the events it renders, each a complete SSE block;
each takes one sequence number of the log, in order, from the ``seq`` it is given.

Another host may need to end a stage whose owner died, or to take it over: ``record()`` is
what it needs to make the same dialect again (``Dialects.of``, from the dialects the
stage manager was given), written with the stage's record in the shared store;
``resume_at`` then brings it to where the log stands, and gives the events of its opening
that the log lacks (its owner died before they were durable): every stream starts with
its opening, whoever wrote the rest.
An answer continued after a failure (``upstream/continuation.py``) is one answer: a
dialect marks the seam (``continued``) only where its clients expect to be told.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import StageFailure
from .chunk_read import ChunkRead
from .records import ContinuationRecord


@dataclass(frozen=True)
class Ending:
    """How a stage ended, as its dialect renders it."""

    status: str  # "done", "error" or "cancelled"
    usage: Mapping[str, Any]
    text: str = ""
    finish_reason: str | None = None
    failure: StageFailure | None = None  # with "error"
    error: str | None = None  # with "error": the failure's message
    reason: str | None = None  # with "cancelled"


class Dialect(Protocol):
    #: The dialect's name: a label in /metrics and the logs, and the key of ``Dialects.of``.
    name: str

    def record(self) -> dict[str, Any]:
        """What makes this dialect again elsewhere (JSON): ``Dialects.of(record)``."""

    def opening(self, seq: int) -> list[bytes]:
        """The events that open the stream, before any chunk."""

    def chunk(self, seq: int, payload: bytes, read: ChunkRead) -> list[bytes]:
        """The events of one upstream chunk: its JSON ``payload`` as sent, and what it
        says. May be none."""

    def continued(self, seq: int, record: ContinuationRecord) -> list[bytes]:
        """The events that mark a continuation of the answer, before its chunks. May be
        none: the chunks go on as if nothing happened."""

    def resume(self, text: str) -> None:
        """The dialect was made again (``Dialects.of``) for a stage taken over, whose log
        holds its opening and at least one chunk's events, those of ``text`` (the answer
        so far). Called through ``resume_at`` only."""

    def ending(self, seq: int, ending: Ending) -> list[bytes]:
        """The events that end the stream; the last is its terminal event."""

    def answer(self, ending: Ending) -> tuple[dict[str, Any], int]:
        """The whole answer of a stage that was not streamed, and its HTTP status."""


def resume_at(dialect: Dialect, held: int, text: str) -> list[bytes]:
    """Bring ``dialect``, made again for a stage whose log holds ``held`` events and the
    answer ``text``, to where that log stands; return the events of its opening that the
    log lacks, numbered from ``held``, for whoever goes on from the log to add first.

    A worker may die after it claimed a stage and before the stage's opening was
    durable; the log then lacks it. (It lacks all of it, in practice: a stage appends its
    opening at once, before the store's flusher runs, and the flusher writes the events
    it finds in one entry, ``store/entries.py``. Any part is rendered right all the
    same.) A log that does not hold the whole opening, or holds nothing past it, holds no
    chunk: the dialect, as made, stands where it does, and has nothing to resume (Chat
    Completions' would take the role as sent).
    """
    opening = dialect.opening(0)
    if held > len(opening):
        dialect.resume(text)
    return opening[held:]


class DialectKind(Protocol):
    """A dialect's class, as ``Dialects`` holds it: its name, and how a dialect of it is
    made again from its ``record()``."""

    @property
    def name(self) -> str: ...

    def from_record(self, record: Mapping[str, Any]) -> Dialect:
        """The dialect ``record`` describes (``Dialect.record``). Raises KeyError,
        TypeError or ValueError for a record it cannot read."""


class Dialects:
    """The dialects a stage manager knows, by name: the ones whose stages it can take
    over, end for a worker that died, or read back from the store (``of``).

    It is given to the manager explicitly (``StageManager(..., dialects=...)``;
    ``stageserver.dialects.DIALECTS`` holds every dialect stageserver speaks), never
    filled by importing a module: a process knows the dialects it was given, whatever it
    imported, so any worker can take over a stage of any of them."""

    def __init__(self, kinds: Iterable[DialectKind]) -> None:
        self._kinds: dict[str, DialectKind] = {}
        for kind in kinds:
            if kind.name in self._kinds:
                raise ValueError(f"two dialects are named {kind.name!r}")
            self._kinds[kind.name] = kind

    def names(self) -> list[str]:
        return list(self._kinds)

    def of(self, record: Mapping[str, Any]) -> Dialect:
        """The dialect a ``record()`` describes. Raises LookupError for one this set does
        not hold, naming the ones it does; KeyError, TypeError or ValueError for a record
        its dialect cannot read."""
        name = str(record["name"])
        kind = self._kinds.get(name)
        if kind is None:
            raise LookupError(
                f"no dialect {name!r} among this stage manager's ({', '.join(self._kinds)}); "
                "give it in StageManager(dialects=...)"
            )
        return kind.from_record(record)
