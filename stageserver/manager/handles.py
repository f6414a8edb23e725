"""The stages of this process as a request sees them: ``LocalStage``, a ``StageHandle``
(stages/handle.py) over a ``Stage``, and ``StartedStage``, the one the request that
started it holds. A stage of another process is the store's handle
(``store.stored.StoredStage``)."""

from __future__ import annotations

from typing import Any

from ..errors import EventsExpired, ShuttingDown, StageFinished
from ..stages.dialect import Dialect
from ..stages.feeds import EventFeed, LocalFeed, RefusedFeed
from ..stages.spec import StageRecord
from ..stages.stage import Stage
from ..stages.status import StageStatus
from ..store.stage_store import StageStore


class LocalStage:
    """A stage that runs, or ran, in this process. ``store``: the manager's, which holds
    the events of a stage taken over from before it came here."""

    def __init__(self, stage: Stage, store: StageStore) -> None:
        self.stage = stage
        self.stage_id = stage.stage_id
        self._store = store

    def summary(self) -> dict[str, object]:
        return self.stage.summary()

    def feed(self, after_seq: int) -> EventFeed | None:
        stage = self.stage
        if stage.finished and after_seq >= stage.next_seq - 1:
            return None
        if stage.events_expired:
            raise EventsExpired(stage.stage_id)
        if after_seq >= stage.next_seq:
            return RefusedFeed(stage.stage_id, after_seq, stage.next_seq)
        if after_seq + 1 < stage.first_kept_seq:
            return self._store.earlier_events(stage, after_seq)
        return LocalFeed(stage, owner=False)

    def cancel(self, reason: str) -> None:
        if not self.stage.cancel(reason):
            raise StageFinished(self.stage.stage_id)

    def wait(self, timeout: float) -> bool:
        self.stage.wait(timeout)
        return self.stage.finished

    def answer(self) -> tuple[dict[str, Any], int] | None:
        return self.stage.answer() if self.stage.finished else None

    def record(self) -> StageRecord:
        return self.stage.record()

    def first_kept(self) -> int:
        """A stage taken over keeps here what came after; the store keeps what came
        before."""
        return self._store.first_kept(self.stage)

    def live_dialect(self) -> Dialect | None:
        return self.stage.dialect


class StartedStage(LocalStage):
    """The stage a request has just started, as that request's response sees it."""

    def starter_feed(self) -> EventFeed:
        """The events of the response that started the stage, from the first: its client's
        disconnect cancels the stage (or starts its resume grace)."""
        return LocalFeed(self.stage, owner=True)

    def final_answer(self) -> tuple[dict[str, Any], int]:
        """The whole answer, once the request has followed the stage to its end. Raises
        ShuttingDown when this worker handed the stage off as it drained: the stage goes
        on elsewhere, and this request cannot follow it there."""
        stage = self.stage
        if stage.status == StageStatus.HANDED_OFF:
            raise ShuttingDown(
                f"stageserver is shutting down here; stage {stage.stage_id!r} goes on in "
                f"another worker: its status is at /stages/{stage.stage_id}"
            )
        return stage.answer()
