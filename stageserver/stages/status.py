"""A stage's status: running, then how it ended (or that it went on elsewhere)."""

from __future__ import annotations

from enum import StrEnum


class StageStatus(StrEnum):
    RUNNING = "running"
    DONE = "done"
    ERROR = "error"
    CANCELLED = "cancelled"
    #: Not an end: the stage goes on in another worker (``Stage.hand_off``).
    HANDED_OFF = "handed_off"
