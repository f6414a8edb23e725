"""Where one response's events come from: the ``EventFeed`` protocol, and ``LocalFeed``
for a stage of this process. ``store.remote_feed.RemoteFeed`` is the other kind, for a
stage that runs in another worker or host. The follow loop (``stream.py``) reads either."""

from __future__ import annotations

from typing import Protocol

from ..errors import StageLost
from .stage import Stage, Subscriber


class EventFeed(Protocol):
    """Where one response's events come from."""

    stage_id: str

    def open(self, subscriber: Subscriber) -> None:
        """The response starts following; may raise StageLost."""

    def read(self, subscriber: Subscriber, cursor: int, wait: float) -> tuple[bytes, int, bool]:
        """The events from number ``cursor`` on, joined; the next cursor; whether the stage
        is over. With nothing to return it waits up to ``wait`` seconds for news, and
        returns nothing only when that time passed quietly (or the subscriber was woken:
        its client left). May raise StageLost."""

    def close(self, subscriber: Subscriber, *, disconnected: bool) -> None:
        """The response stops following: its client left (``disconnected``) or it ended."""


class RefusedFeed:
    """A resume that cannot be served: the response ends at once with why (``StageLost``).

    One is a resume from beyond the end of the stage's log. No client reads an event
    before the shared store holds it (``Stage.publish``), so a client whose last event is
    not in the log got it from a worker that stopped before writing it, and the stage
    has been continued since from what the log holds: the events after its id are not
    the ones it would have got. It is told so, rather than sent a different text under
    the same ids."""

    def __init__(self, stage_id: str, after_seq: int, held: int) -> None:
        self.stage_id = stage_id
        self._message = (
            f"stage {stage_id!r} cannot be resumed after event {after_seq}: its log holds "
            f"{held} events, and the ones after that were never stored (their worker "
            f"stopped); its status is at /stages/{stage_id}"
        )

    def open(self, subscriber: Subscriber) -> None:
        raise StageLost(self._message)

    def read(self, subscriber: Subscriber, cursor: int, wait: float) -> tuple[bytes, int, bool]:
        raise StageLost(self._message)

    def close(self, subscriber: Subscriber, *, disconnected: bool) -> None:
        pass


class LocalFeed:
    """A stage of this process, read from its log. ``owner``: the response of the request
    that started the stage, whose disconnect may cancel it."""

    def __init__(self, stage: Stage, *, owner: bool) -> None:
        self.stage = stage
        self.stage_id = stage.stage_id
        self._owner = owner

    def open(self, subscriber: Subscriber) -> None:
        self.stage.attach(subscriber)

    def read(self, subscriber: Subscriber, cursor: int, wait: float) -> tuple[bytes, int, bool]:
        subscriber.wake.clear()
        batch, cursor, finished = self._read(cursor)
        if batch or finished or subscriber.client_gone:
            return batch, cursor, finished
        subscriber.wake.wait(wait)
        return self._read(cursor)  # what came while it waited, checked again

    def _read(self, cursor: int) -> tuple[bytes, int, bool]:
        """The stage's events from ``cursor`` on; StageLost when the log no longer holds
        them all (never a silent gap)."""
        stage = self.stage
        if cursor < stage.first_kept_seq:
            raise StageLost(
                f"events {cursor} to {stage.first_kept_seq - 1} of stage {self.stage_id!r} are "
                "no longer kept (STAGESERVER_EVENT_LOG_MAX_EVENTS / _MAX_BYTES); its status is "
                f"at /stages/{self.stage_id}"
            )
        return stage.read(cursor)

    def close(self, subscriber: Subscriber, *, disconnected: bool) -> None:
        self.stage.detach(subscriber, owner=self._owner, disconnected=disconnected)
