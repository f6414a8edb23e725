"""The takeover of a stage whose worker died or drained: ``Takeovers.adopt``.

The store finds the orphan (its sweeper, or a request about the stage that notices its
owner's lease is gone, ``store/takeover.py``) and asks this worker to adopt it. The
worker claims it in the store under the next epoch, makes the stage again from its
record (its spec, its conversation, its dialect, made again from the dialects the
manager was given), and continues its answer from what the store holds: its log and its
text (``Stage``'s ``takeover``, the relay's ``Resume``). A draining worker takes nothing
on, nor does one that is full, or one whose configuration lacks the stage's principal or
upstream: another worker will.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .. import shutdown
from ..errors import Overloaded, ShuttingDown, StageConflict, StageFailure, StoreUnavailable
from ..policy.admission import Admission
from ..principals import Principal
from ..stages.dialect import Dialects
from ..stages.records import ContinuationRecord
from ..stages.registry import StageRegistry
from ..stages.spec import StageRecord, Takeover, instance_of
from ..stages.stage import Stage
from ..store.stage_store import Claim, StageStore
from ..upstream.relay import Resume
from .making import StageMaker

log = logging.getLogger("stageserver.manager")


@dataclass(frozen=True)
class Takeovers:
    """The takeovers of one manager. ``stages`` and ``admission``: the manager's (a stage
    taken over is one of this worker's, and takes a slot); ``principals``: by name, as
    configured here; ``upstream_names``: the upstreams configured here."""

    maker: StageMaker
    store: StageStore
    stages: StageRegistry
    admission: Admission
    principals: Mapping[str, Principal]
    upstream_names: Callable[[], list[str]]
    dialects: Dialects

    def adopt(self, key: str) -> bool:
        """Take over the stage ``key``, orphaned by a worker that died or drained, and
        continue it here; whether this worker, or another, has it."""
        if shutdown.shutting_down():
            return False  # a draining worker takes nothing on
        local = self.stages.get(key)
        if local is not None and not local.finished:
            return True  # it runs here: its lease comes back with the next renewal
        store = self.store
        try:
            raw = store.record(key)
            record = None if raw is None else StageRecord.from_json(raw)
        except StoreUnavailable:
            return False
        except (KeyError, TypeError, ValueError):
            record = None  # from a worker that predates takeovers: ended as before
        if record is None or record.conversation is None:
            return False
        principal = self.principals.get(record.spec.principal)
        if principal is None or record.spec.upstream not in self.upstream_names():
            log.warning("stage %s: not taken over here (its principal or upstream is "
                        "unknown to this worker's configuration)", key)  # fmt: skip
            return False
        try:
            self.admission.admit()
        except (Overloaded, ShuttingDown):
            return False  # another worker will
        instance = instance_of(key)
        try:
            claim = store.take_over(key, instance)
        except StoreUnavailable:
            claim = None
        if claim is None:
            self.admission.release()
            return True
        try:
            stage = self._taken_over(claim, principal, instance)
            self.stages.add(stage)
        except (StageConflict, LookupError, TypeError, ValueError) as exc:
            log.warning("stage %s: cannot be taken over here: %s", key, exc)
            self.admission.release()
            store.release_claim(key, instance)
            return True
        store.adopt(stage, claim)
        stage.start()
        return True

    def _taken_over(self, claim: Claim, principal: Principal, instance: str) -> Stage:
        """The stage ``claim`` holds, made again here from its record."""
        maker = self.maker
        record = StageRecord.from_json(claim.record)
        conversation, spec = record.conversation, record.spec
        if conversation is None:
            raise ValueError("its record has no conversation")
        dialect = self.dialects.of(record.dialect)
        stage_id = record.stage_id
        stage_spec = maker.spec(
            stage_id,
            spec.upstream,
            principal,
            conversation,
            resumable=spec.resumable,
            request_id=spec.request_id,
            detached=spec.detached,
            max_seconds=spec.max_seconds,
            keep_seconds=spec.keep_seconds,
            keep_events_seconds=spec.keep_events_seconds,
        )
        if claim.handed_off:
            reason = "drain"
            cause = StageFailure(f"the worker that ran stage {stage_id!r} ({claim.owner}) drained")
        else:
            reason = "owner_lost"
            cause = StageFailure(
                f"the worker that ran stage {stage_id!r} ({claim.owner}) stopped: its lease "
                f"lapsed {maker.settings.owner_lease_seconds:g} s after its last sign of life"
            )
        earlier = claim.summary.get("continuations") or []
        takeover = Takeover(
            next_seq=claim.held,
            text=claim.text,
            content_chunks=claim.content_chunks,
            continuations=tuple(ContinuationRecord(**c) for c in earlier),
            from_owner=claim.owner,
            created_at=spec.started_at,
            continuable=claim.summary.get("continuable", True) is not False,
        )
        return maker.stage(
            stage_spec,
            conversation,
            dialect,
            resume=Resume(reason, cause, claim.owner, claim.taker),
            takeover=takeover,
            instance=instance,
        )
