"""``StageHandle``: a stage as a request about it sees it, wherever it runs.

The stage manager's ``find`` gives one, and the views use nothing else of a stage they
found: a stage of this process (``manager.handles.LocalStage``, and ``StartedStage`` for
the request that started it) and a stage known to the shared store, which runs or ran in
another worker or host (``store.stored.StoredStage``), answer the same questions.
"""

from __future__ import annotations

from typing import Any, Protocol

from .dialect import Dialect
from .feeds import EventFeed
from .spec import StageRecord


class StageHandle(Protocol):
    @property
    def stage_id(self) -> str:
        """The stage's id, as its principal named it (without its namespace)."""

    def summary(self) -> dict[str, object]:
        """Its status (``Stage.summary``; ``schemas.StageStatus``). Raises UnknownStage
        (a stage elsewhere that is gone), StoreUnavailable."""

    def feed(self, after_seq: int) -> EventFeed | None:
        """Its events after ``after_seq``; None when it has ended and that was its last
        event (nothing is left to send). Raises EventsExpired, UnknownStage,
        StoreUnavailable."""

    def cancel(self, reason: str) -> None:
        """Cancel it, wherever it runs. Raises StageFinished when it no longer runs,
        UnknownStage, StoreUnavailable."""

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for its end; whether it has ended."""

    def answer(self) -> tuple[dict[str, Any], int] | None:
        """Its whole answer in its dialect, and its HTTP status; None while it runs."""

    def record(self) -> StageRecord:
        """Its request: its dialect's record, its conversation (``StageRecord``). Raises
        UnknownStage, StoreUnavailable."""

    def first_kept(self) -> int:
        """Its oldest event still kept; earlier ones are gone."""

    def live_dialect(self) -> Dialect | None:
        """Its dialect as it stands, with what it has rendered so far, for a stage of this
        process; None for one elsewhere, whose dialect this process can only make again
        from its record (``StageManager.dialects``)."""
