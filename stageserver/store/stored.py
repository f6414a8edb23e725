"""``StoredStage``: a stage known to the shared store, as a request about it sees it (a
``StageHandle``, stages/handle.py). It runs, or ran, in another worker or host; whether it
exists at all is the answer of each question put to the store. A question about its
status or a cancel first looks whether its owner died (``takeover.Ownership.reap_orphan``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import UnknownStage
from ..stages.dialect import Dialect
from ..stages.feeds import EventFeed
from ..stages.spec import StageRecord
from ..stages.status import StageStatus
from . import remote_feed
from .batch import Batcher
from .cancels import CancelChannel
from .reader import StoreReader
from .takeover import Ownership


@dataclass(frozen=True)
class StoredStage:
    """The stage ``key`` (``stage_id`` as its principal names it), asked through the
    store's parts. ``batcher``: gives this process's."""

    batcher: Callable[[], Batcher]
    reader: StoreReader
    ownership: Ownership
    cancels: CancelChannel
    key: str
    stage_id: str

    def summary(self) -> dict[str, object]:
        self.ownership.reap_orphan(self.key, self.stage_id)  # its owner may have died
        summary = self.reader.summary(self.key)
        if summary is None:
            raise UnknownStage(self.stage_id)
        return summary

    def feed(self, after_seq: int) -> EventFeed | None:
        return remote_feed.feed(self.batcher, self.ownership, self.key, self.stage_id, after_seq)

    def cancel(self, reason: str) -> None:
        self.ownership.reap_orphan(self.key, self.stage_id)  # its owner may have died
        self.cancels.request(self.key, self.stage_id, reason)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the stage's end, asking the store every
        50 ms; whether it has ended."""
        deadline = time.monotonic() + timeout
        while self.summary()["status"] == StageStatus.RUNNING:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def answer(self) -> tuple[dict[str, Any], int] | None:
        return self.reader.answer(self.key)

    def first_kept(self) -> int:
        return self.reader.first_kept(self.key)

    def record(self) -> StageRecord:
        record = self.reader.record(self.key)
        if record is None:
            raise UnknownStage(self.stage_id)
        return StageRecord.from_json(record)

    def live_dialect(self) -> Dialect | None:
        return None  # it runs elsewhere: its dialect is made again from its record
