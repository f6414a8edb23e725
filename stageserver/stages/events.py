"""The seed's dialect: a stage's events as a ``POST /chat`` client receives them, their
names, their ids, their bytes.

The seed's events, each encoded by the one SSE encoder (``sse.encode_event``):

- ``chat_completion_chunk`` ``{"stage_id", "chunk"}``: ``chunk`` is the upstream's chunk,
  spliced in as the upstream sent it;
- ``continued`` ``{"stage_id", "after", "reason", "mode", "model"}``: the answer was cut
  short (``reason``: ``upstream_failed``, ``owner_lost``, ``drain``) after event ``after``,
  and goes on from the text delivered, asked of ``model`` in ``mode``; the chunks after it
  come from the new request (their ``id`` and ``created`` are its own);
- one terminal event: ``done`` ``{"stage_id"}``, ``error`` ``{"stage_id", "error"}`` or
  ``cancel`` ``{"stage_id", "reason"}``.

Every event of a stage has the id ``<stage_id>-<kind>-<seq>``, ``kind`` being ``chunk``
or the terminal event's name and ``seq`` one counter for the whole stage, so ids are
unique and increasing and a ``Last-Event-ID`` names a place in the stage's log. Ids are
made and read here only.

One more event is not a stage's: when a response can no longer follow a stage (the shared
store went away, the stage expired from it), that response alone ends with an ``error``
event without an id, so that a client's ``Last-Event-ID`` still points at the last event
it really received.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..sse import compact_json, encode_event
from .chunk_read import ChunkRead
from .dialect import Ending
from .records import ContinuationRecord

CHUNK_EVENT = "chat_completion_chunk"
CONTINUED_EVENT = "continued"
# A stage's final status, and the event that announces it (a stage handed off to another
# worker has none here: its taker ends it).
TERMINAL_EVENT = {"done": "done", "error": "error", "cancelled": "cancel", "handed_off": "handoff"}


class SeedDialect:
    """The seed's events (``POST /chat``), each encoded by the one SSE encoder."""

    name = "seed"
    __slots__ = ("stage_id", "_chunk_data_prefix", "_chunk_id_prefix")

    def __init__(self, stage_id: str) -> None:
        self.stage_id = stage_id
        self._chunk_data_prefix = b'{"stage_id":' + compact_json(stage_id) + b',"chunk":'
        self._chunk_id_prefix = f"{stage_id}-chunk-"

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "stage_id": self.stage_id}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SeedDialect:
        return cls(str(record["stage_id"]))

    def opening(self, seq: int) -> list[bytes]:
        return []

    def chunk(self, seq: int, payload: bytes, read: ChunkRead) -> list[bytes]:
        """A ``chat_completion_chunk`` event around the upstream chunk's JSON ``payload``."""
        return [
            encode_event(
                CHUNK_EVENT,
                self._chunk_data_prefix + payload + b"}",
                self._chunk_id_prefix + str(seq),
            )
        ]

    def continued(self, seq: int, record: ContinuationRecord) -> list[bytes]:
        data = {
            "stage_id": self.stage_id,
            "after": record.after,
            "reason": record.reason,
            "mode": record.mode,
            "model": record.model,
        }
        event_id = f"{self.stage_id}-{CONTINUED_EVENT}-{seq}"
        return [encode_event(CONTINUED_EVENT, compact_json(data), event_id)]

    def resume(self, text: str) -> None:
        pass

    def ending(self, seq: int, ending: Ending) -> list[bytes]:
        return [self.terminal(ending.status, seq, **_terminal_data(ending))]

    def terminal(self, status: str, seq: int, **data: Any) -> bytes:
        """The event that ends the stage with ``status`` (``done``, ``error``, ``cancelled``)."""
        event = TERMINAL_EVENT[status]
        body = compact_json({"stage_id": self.stage_id, **data})
        return encode_event(event, body, f"{self.stage_id}-{event}-{seq}")

    def answer(self, ending: Ending) -> tuple[dict[str, Any], int]:
        """The seed's ``TextStageOutput``: 200 with the text, else its error (the failure's
        status) or its cancel (409)."""
        if ending.status == "done":
            return {
                "error": None,
                "stage_id": f"{self.stage_id}-chat-final",
                "text": ending.text,
                "type": "text",
            }, 200
        if ending.status == "error":
            status = 502 if ending.failure is None else ending.failure.http_status
            error = ending.error
        else:
            error, status = f"cancelled: {ending.reason}", 409
        return {
            "error": error,
            "stage_id": f"{self.stage_id}-chat-error",
            "text": None,
            "type": "error",
        }, status


def _terminal_data(ending: Ending) -> dict[str, Any]:
    if ending.status == "error":
        return {"error": ending.error}
    if ending.status == "cancelled":
        return {"reason": ending.reason, "usage": ending.usage}
    return {"usage": ending.usage}


def seq_of(event_id: str, stage_id: str) -> int | None:
    """The sequence number in one of ``stage_id``'s event ids; None if it is not one."""
    prefix, _, seq = event_id.rpartition("-")
    if not (seq.isascii() and seq.isdigit()) or not prefix.startswith(f"{stage_id}-"):
        return None
    return int(seq)


def lost_event(stage_id: str, message: str) -> bytes:
    """The id-less ``error`` that ends one response which cannot follow its stage further."""
    return encode_event("error", compact_json({"stage_id": stage_id, "error": message}))
