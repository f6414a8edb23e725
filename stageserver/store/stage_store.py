"""``StageStore``: where a process's stages are kept beyond its memory, the one seam
between the stage manager and the store; and ``LocalStore``, the store of a process
alone (no ``STAGESERVER_STORE_URL``).

The manager holds one store always, and never asks which it holds: the same shape as
the principals' limits (``policy/limits.py``: ``LimitBook``, ``LocalLimits`` beside it,
``RedisLimits`` in Redis). ``RedisStageStore`` (``mirror.py``) is the other
implementation: stages shared by every worker and host through Redis.

A store is an extension point: another kind of shared store implements every method
below, with the meaning each docstring gives it, and is the last of a stage's listeners
(see manager/): it hears each stage's events and end (``StageListener``). What a store
keeps beyond this process:

- a stage of this process (``claim``, then the listener's hooks): its events, its status
  and its answer, so that another process can serve them and take the stage over;
- a stage of another process: found by its key (``find``, a ``StageHandle``), followed,
  cancelled, forgotten, taken over (``take_over``);
- idempotency keys, so that a retried request finds the stage its first attempt started,
  wherever it lands.

A store that keeps nothing beyond this process (``LocalStore``) answers each question as
a process alone would: no stage elsewhere, no orphan to take over, nothing to hand off.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from ..errors import UnknownStage
from ..stages.feeds import EventFeed, LocalFeed
from ..stages.handle import StageHandle
from ..stages.stage import Stage, StageListener


@dataclass(frozen=True)
class Claim:
    """A stage taken over (``StageStore.take_over``): what the store holds of it."""

    epoch: int
    held: int  # events in its log
    record: dict[str, Any]
    text: str
    content_chunks: int
    owner: str  # the worker that ran it
    taker: str  # this worker, as the store names it
    handed_off: bool  # its worker drained, rather than died
    summary: dict[str, Any]  # as its owner last wrote it


class StageStore(StageListener, ABC):
    """Where a process's stages are kept beyond its memory (see the module docstring).
    Every method may raise StoreUnavailable where it says so, never another error of the
    store's own."""

    #: Whether a stage's clients read only the events the store has made durable
    #: (``Stage(gated=...)``), so that none has seen what a taker would not continue from.
    gated: bool = False

    # -- this process -------------------------------------------------------------------

    @abstractmethod
    def start(self) -> None:
        """The manager is made: start what the store runs in the background (a shared
        store takes over orphans even before the process serves a request)."""

    @abstractmethod
    def close(self) -> None:
        """The manager is closed: stop the store's background work and close its
        connections. Idempotent; the store answers nothing afterwards."""

    # -- a stage of this process ----------------------------------------------------------

    @abstractmethod
    def claim(self, stage: Stage) -> None:
        """Make ``stage`` the one live stage with its key, wherever the store reaches, and
        keep it from now on. Raises StageConflict when one runs, StoreUnavailable."""

    @abstractmethod
    def adopt(self, stage: Stage, claim: Claim) -> None:
        """Keep a stage taken over (``take_over``): the store holds its first events and
        its text, as ``claim`` says."""

    @abstractmethod
    def watched_elsewhere(self, key: str) -> bool:
        """Whether a response in another process follows the stage ``key``."""

    @abstractmethod
    def can_hand_off(self, stage: Stage) -> bool:
        """Whether ``stage``, handed off (``Stage.hand_off``) as this process drains, goes
        on in another process: else it is ended here."""

    @abstractmethod
    def earlier_events(self, stage: Stage, after_seq: int) -> EventFeed | None:
        """The events after ``after_seq`` of a stage of this process whose memory no
        longer holds them all (``after_seq + 1 < stage.first_kept_seq``: it was taken
        over, or its log was trimmed); None when it has ended and that was its last
        event. Raises EventsExpired, StoreUnavailable."""

    @abstractmethod
    def first_kept(self, stage: Stage) -> int:
        """The oldest event of a stage of this process still kept, here or in the store."""

    # -- a stage of any process ------------------------------------------------------------

    @abstractmethod
    def find(self, key: str, stage_id: str) -> StageHandle:
        """The stage ``key`` (``stage_id`` as its principal names it) as the store knows
        it: one that runs, or ran, elsewhere. Raises UnknownStage where the store cannot
        have one (a question to a shared store is asked when the handle is used)."""

    @abstractmethod
    def record(self, key: str) -> dict[str, Any] | None:
        """The stage's record as the store holds it (JSON; ``StageRecord.from_json``);
        None without one. Raises StoreUnavailable."""

    @abstractmethod
    def take_over(self, key: str, instance: str) -> Claim | None:
        """Claim the orphaned stage ``key`` for this process's stage instance
        ``instance``; None when it is not to be taken (someone holds it, it ended, it has
        no record). Raises StoreUnavailable."""

    @abstractmethod
    def release_claim(self, key: str, instance: str) -> None:
        """Give back a claim this process cannot run: another takes it at once."""

    @abstractmethod
    def forget(self, key: str) -> None:
        """Delete a finished stage everywhere the store reaches. Raises StoreUnavailable."""

    # -- idempotency keys ---------------------------------------------------------------

    @abstractmethod
    def claim_idempotency(
        self, key: str, stage_id: str, digest: str, ttl_seconds: float
    ) -> tuple[str, str] | None:
        """Claim the idempotency key ``key`` (in its principal's namespace) for
        ``stage_id``, whose request's body has ``digest``, for ``ttl_seconds``; the stage
        id that holds it already, and its body's digest, if one does. Raises
        StoreUnavailable."""

    @abstractmethod
    def release_idempotency(self, key: str, stage_id: str) -> None:
        """Let ``key`` go, if ``stage_id`` holds it (its stage was refused)."""


class LocalStore(StageStore):
    """The store of a process alone: its stages live in its memory only (the manager's
    registry), and its idempotency keys in a dict, each kept for its TTL."""

    def __init__(self) -> None:
        #: key -> (stage id, the digest of its request's body, until (monotonic)).
        self._idempotency: dict[str, tuple[str, str, float]] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def claim(self, stage: Stage) -> None:
        pass  # the manager's registry already refuses a second live stage with its key

    def adopt(self, stage: Stage, claim: Claim) -> None:
        pass  # never asked: nothing is taken over

    def watched_elsewhere(self, key: str) -> bool:
        return False

    def can_hand_off(self, stage: Stage) -> bool:
        return False

    def earlier_events(self, stage: Stage, after_seq: int) -> EventFeed | None:
        return LocalFeed(stage, owner=False)  # which says that those events are gone

    def first_kept(self, stage: Stage) -> int:
        return stage.first_kept_seq

    def find(self, key: str, stage_id: str) -> StageHandle:
        raise UnknownStage(stage_id)

    def record(self, key: str) -> dict[str, Any] | None:
        return None

    def take_over(self, key: str, instance: str) -> Claim | None:
        return None

    def release_claim(self, key: str, instance: str) -> None:
        pass

    def forget(self, key: str) -> None:
        pass

    def claim_idempotency(
        self, key: str, stage_id: str, digest: str, ttl_seconds: float
    ) -> tuple[str, str] | None:
        now = time.monotonic()
        with self._lock:
            held = self._idempotency.get(key)
            if held is not None and held[2] > now:
                return held[0], held[1]
            self._idempotency = {k: v for k, v in self._idempotency.items() if v[2] > now}
            self._idempotency[key] = (stage_id, digest, now + ttl_seconds)
        return None

    def release_idempotency(self, key: str, stage_id: str) -> None:
        with self._lock:
            held = self._idempotency.get(key)
            if held is not None and held[0] == stage_id:
                del self._idempotency[key]
