"""Reading stages of other workers and hosts from the shared store: their status, the
whole answer of a finished one, its record, the first event its log still keeps, whether
it can be cancelled, and how many responses follow it through the store. Reads only: a
stage whose owner died is the business of ``takeover.py`` (``reap_orphan``), which the
callers ask first, by name. Its events are followed with ``remote_feed.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ..errors import StageFinished, UnknownStage
from . import entries
from .batch import Batcher
from .connection import STORE_ERRORS, store_errors
from .keys import stage_keys


class StoreReader:
    def __init__(self, batcher: Callable[[], Batcher]) -> None:
        """``batcher``: gives this process's."""
        self._batcher = batcher

    @property
    def redis(self) -> Any:
        return self._batcher().client

    def watchers(self, key: str) -> int:
        """How many responses follow the stage through the store (0 if Redis cannot say)."""
        try:
            return int(self.redis.hget(stage_keys(key).hash, "watchers") or 0)
        except STORE_ERRORS:
            return 0

    def summary(self, stage_key: str) -> dict[str, Any] | None:
        """The stage's status as ``Stage.summary`` gives it; None if the store has none.
        Raises StoreUnavailable."""
        keys = stage_keys(stage_key)
        with store_errors():
            pipe = self.redis.pipeline(transaction=False)
            pipe.hmget(keys.hash, "summary", "gap")
            pipe.xrevrange(keys.log, count=1)
            (raw, gap), top = pipe.execute()
            if raw is None:
                return None
            summary: dict[str, Any] = json.loads(raw)
            if summary["status"] == "running":
                # The summary is the one written at the claim; the text and events go on.
                text, _ = entries.read_durable_text(self.redis, keys.text, keys.log)
                summary.update(text=text, events=entries.held_in(top))
        if gap:
            summary["gap"] = gap.decode()
        return summary

    def first_kept(self, stage_key: str) -> int:
        """The oldest event the stage's log still holds (the next one when it holds
        none). Raises StoreUnavailable."""
        with store_errors():
            first = self.redis.xrange(stage_keys(stage_key).log, count=1)
        if not first:
            return 0
        entry, values = first[0]
        events, _ = entries.events_of(values)
        return events[0][0] if events else entries.held_by(entry)

    def check_cancellable(self, stage_key: str, stage_id: str) -> None:
        """Raises UnknownStage, or StageFinished when the stage no longer runs;
        StoreUnavailable."""
        with store_errors():
            status = self.redis.hget(stage_keys(stage_key).hash, "status")
        if status is None:
            raise UnknownStage(stage_id)
        if status != b"running":
            raise StageFinished(stage_id)

    def answer(self, stage_key: str) -> tuple[dict[str, Any], int] | None:
        """The whole answer of a finished stage, in its dialect, and its HTTP status; None
        while it runs, or if the store has no such stage. Raises StoreUnavailable."""
        with store_errors():
            raw = self.redis.hget(stage_keys(stage_key).hash, "answer")
        if raw is None:
            return None
        body, status = json.loads(raw)
        return body, int(status)

    def record(self, stage_key: str) -> dict[str, Any] | None:
        """The stage's request as its owner wrote it (``Stage.record``, written with its
        claim). Raises StoreUnavailable."""
        with store_errors():
            raw = self.redis.hget(stage_keys(stage_key).hash, "record")
        return None if raw is None else dict(json.loads(raw))
