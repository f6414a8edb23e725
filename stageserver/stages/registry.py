"""The stages of this process: live ones, and finished ones until their TTL passes.

A finished stage's events, the bulk of its memory, go sooner (``event_ttl_seconds``)
than its status and text (``ttl_seconds``), and not while a client still reads them.
Both are swept when a stage is added. The registry hears of a stage's end as one of its
listeners.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from ..errors import StageConflict
from .stage import Stage, StageListener
from .status import StageStatus


class StageRegistry(StageListener):
    def __init__(self, ttl_seconds: float, event_ttl_seconds: float) -> None:
        self.ttl_seconds = ttl_seconds
        self.event_ttl_seconds = event_ttl_seconds  # StageSettings: at most ttl_seconds
        self._stages: dict[str, Stage] = {}
        self._expiry: deque[tuple[float, Stage]] = deque()
        self._event_expiry: deque[tuple[float, Stage]] = deque()
        self._lock = threading.Lock()

    def add(self, stage: Stage) -> None:
        """Register a new stage; a running stage with the same id is a conflict."""
        with self._lock:
            self._expire()
            current = self._stages.get(stage.key)
            if current is not None and not current.finished:
                raise StageConflict(stage.stage_id)
            self._stages[stage.key] = stage

    def discard(self, stage: Stage) -> None:
        """Forget a stage: one that was added but never started, or one forgotten on
        request (a deleted response)."""
        with self._lock:
            if self._stages.get(stage.key) is stage:
                del self._stages[stage.key]

    def get(self, key: str) -> Stage | None:
        """The stage with this key (its id in its principal's namespace)."""
        return self._stages.get(key)

    def running(self) -> list[Stage]:
        return [s for s in list(self._stages.values()) if not s.finished]

    def on_finish(self, stage: Stage) -> None:
        if stage.status == StageStatus.HANDED_OFF:
            self.discard(stage)  # it goes on in another worker, which answers for it
            return
        now = time.monotonic()
        # A stage that is to be kept longer only holds back the ones behind it in the
        # queue: they are kept a little longer, never dropped sooner.
        keep = max(self.ttl_seconds, stage.spec.keep_seconds)
        keep_events = min(keep, max(self.event_ttl_seconds, stage.spec.keep_events_seconds))
        with self._lock:
            self._expiry.append((now + keep, stage))
            self._event_expiry.append((now + keep_events, stage))

    def _expire(self) -> None:
        now = time.monotonic()
        while self._event_expiry and self._event_expiry[0][0] <= now:
            stage = self._event_expiry.popleft()[1]
            if stage.has_subscribers:
                # A client is still reading them: look again one TTL later.
                self._event_expiry.append((now + max(self.event_ttl_seconds, 1.0), stage))
            else:
                stage.drop_events()
        while self._expiry and self._expiry[0][0] <= now:
            _, stage = self._expiry.popleft()
            if self._stages.get(stage.key) is stage:
                del self._stages[stage.key]
