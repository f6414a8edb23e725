"""Where one response's events come from: the ``EventFeed`` protocol, and ``LocalFeed``
for a stage of this process. ``store.reader.RemoteFeed`` is the other kind, for a stage
that runs in another worker or host. The follow loop (``web/follow.py``) reads either."""

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
