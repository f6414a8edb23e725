"""How long Redis keeps a stage after its end: its status and answer (the hash), and its
events (the log). The settings give the least (``STAGESERVER_STAGE_TTL_SECONDS``,
``STAGESERVER_EVENT_TTL_SECONDS``, the events never longer than the status); a request
may ask for longer (``StageSpec.keep_seconds``, ``keep_events_seconds``). While the
stage runs, its keys live a lease longer than that, renewed with the lease.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..stages.stage import Stage


@dataclass(frozen=True)
class Retention:
    ttl_ms: int
    event_ttl_ms: int  # StageSettings: at most ``ttl_ms``

    def of(self, stage: Stage) -> tuple[int, int]:
        """How long the stage's status and its events are kept after its end, in ms."""
        spec = stage.spec
        ttl = max(self.ttl_ms, int(spec.keep_seconds * 1000))
        return ttl, min(ttl, max(self.event_ttl_ms, int(spec.keep_events_seconds * 1000)))
