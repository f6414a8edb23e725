"""The stage manager: the one owner of a stage's life in a process.

It starts a stage (admits it, registers it, claims its id, starts it), finds one (a stage
of this process, or one that runs elsewhere and is reached through the shared store),
and cancels one, always on behalf of a principal (``principals.py``): a stage belongs to
the principal that started it, its id lives in that principal's namespace, and for any
other principal it does not exist. Every refusal is an exception from ``errors.py``;
turning one into HTTP is the views' business, and nothing here knows of Flask.

Each stage is given its listeners when it is made. They are, in the order it calls them:

1. the registry of this process's stages, which forgets finished ones after their TTL;
2. admission, which gives the worker's slot back when the stage ends;
3. the principal's limits, which give its stream slot back and count its tokens;
4. the Prometheus metrics;
5. the stage's trace span (with tracing on), ended when the stage ends, client or not;
6. the outcome log line;
7. the shared store's mirror (with ``STAGESERVER_STORE_URL``), so other workers see it.
   Last: it writes the stage's end to Redis at once, and a client of another worker
   that reads the end there must find every other listener done.

A stage's relay gets the stage's route (``route.py``): the pool of the upstream the
request resolved to, then its fallbacks'. The pools (one per upstream, in this worker)
report each attempt to the per-replica metrics.

With the shared store, a stage outlives its worker: the manager takes over (``adopt``) a
stage whose worker died or drained (``store/takeover.py``), and rebuilds it from its record
to continue its answer; on shutdown it hands its own off (``hand_off_unattended``, then
``abort_running``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from . import shutdown
from .concurrency import Task
from .config import StageSettings
from .errors import (
    ConfigError,
    EventsExpired,
    IdempotencyKeyReused,
    Overloaded,
    ShuttingDown,
    StageConflict,
    StageFailure,
    StageFinished,
    StageServerError,
    StoreUnavailable,
    UnknownStage,
)
from .policy.admission import Admission
from .policy.limits import LimitBook, LocalLimits
from .principals import ANONYMOUS, Principal, check_upstreams
from .stages.conversation import Conversation
from .stages.dialect import dialect_of
from .stages.feeds import EventFeed, LocalFeed, RefusedFeed
from .stages.records import ContinuationRecord
from .stages.registry import StageRegistry
from .stages.spec import StageRecord, StageRequest, StageSpec, Takeover, instance_of
from .stages.stage import Stage, StageListener
from .stages.status import StageStatus
from .stages.usage import estimate_prompt_tokens
from .telemetry import metrics
from .telemetry.logs import OutcomeLog
from .telemetry.tracing import Tracing
from .upstream.clients import ReplicaClient, UpstreamRegistry
from .upstream.continuation import ContinuationModes
from .upstream.health import ReadinessProbe
from .upstream.relay import NO_TRACING, AttemptTracer, Continuations, Resume, UpstreamRelay
from .upstream.request_body import RequestBody, check_extra_fields
from .upstream.route import ReplicaSets

if TYPE_CHECKING:
    from .store.mirror import RedisStageStore
    from .store.takeover import Claim

log = logging.getLogger("stageserver.manager")


class LocalStage:
    """A stage that runs, or ran, in this process. ``store``: the shared store, which
    holds the events of a stage taken over from before it came here."""

    def __init__(self, stage: Stage, store: RedisStageStore | None = None) -> None:
        self.stage = stage
        self.stage_id = stage.stage_id
        self._store = store

    def summary(self) -> dict[str, object]:
        return self.stage.summary()

    def feed(self, after_seq: int) -> EventFeed | None:
        """The stage's events after ``after_seq``; None when it has ended and that was its
        last event (nothing is left to send). Raises EventsExpired."""
        stage = self.stage
        if stage.finished and after_seq >= stage.next_seq - 1:
            return None
        if stage.events_expired:
            raise EventsExpired(stage.stage_id)
        if after_seq >= stage.next_seq:
            return RefusedFeed(stage.stage_id, after_seq, stage.next_seq)
        if self._store is not None and after_seq + 1 < stage.first_kept_seq:
            return self._store.feed(stage.key, stage.stage_id, after_seq)
        return LocalFeed(stage, owner=False)

    def cancel(self, reason: str) -> None:
        if not self.stage.cancel(reason):
            raise StageFinished(self.stage.stage_id)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the stage's end; whether it has ended."""
        self.stage.wait(timeout)
        return self.stage.finished

    def answer(self) -> tuple[dict[str, Any], int] | None:
        """The whole answer of the stage in its dialect, and its HTTP status; None while
        it runs."""
        return self.stage.answer() if self.stage.finished else None

    def record(self) -> StageRecord:
        """Its request: its dialect's record, its conversation (``Stage.record``)."""
        return self.stage.record()

    def first_kept(self) -> int:
        """The oldest event still kept; earlier ones are gone. A stage taken over keeps
        here what came after; the store keeps what came before."""
        first = self.stage.first_kept_seq
        if self._store is not None and first > 0:
            return min(first, self._store.reader.first_kept(self.stage.key))
        return first


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


class StoredStage:
    """A stage known to the shared store: it runs, or ran, in another worker or host.
    Whether it exists at all is the answer of each question put to the store."""

    def __init__(self, store: RedisStageStore, key: str, stage_id: str) -> None:
        self._store = store
        self.key = key
        self.stage_id = stage_id

    def summary(self) -> dict[str, object]:
        self._store.reap_orphan(self.key, self.stage_id)  # its owner may have died
        summary = self._store.reader.summary(self.key)
        if summary is None:
            raise UnknownStage(self.stage_id)
        return summary

    def feed(self, after_seq: int) -> EventFeed | None:
        return self._store.feed(self.key, self.stage_id, after_seq)

    def cancel(self, reason: str) -> None:
        self._store.reap_orphan(self.key, self.stage_id)  # its owner may have died
        self._store.request_cancel(self.key, self.stage_id, reason)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the stage's end, asking the store every
        50 ms; whether it has ended."""
        deadline = time.monotonic() + timeout
        while self.summary()["status"] == "running":
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def answer(self) -> tuple[dict[str, Any], int] | None:
        return self._store.reader.answer(self.key)

    def first_kept(self) -> int:
        return self._store.reader.first_kept(self.key)

    def record(self) -> StageRecord:
        record = self._store.reader.record(self.key)
        if record is None:
            raise UnknownStage(self.stage_id)
        return StageRecord.from_json(record)


class StageManager:
    def __init__(
        self,
        settings: StageSettings,
        upstreams: UpstreamRegistry,
        principals: list[Principal] | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        """``principals``: the configured ones, checked against the upstreams here.
        ``tracing``: None when traces are off (``tracing.start_tracing``)."""
        check_upstreams(principals or [], upstreams.names())
        self._principals = {p.name: p for p in [ANONYMOUS, *(principals or [])]}
        self.settings = settings
        self.upstreams = upstreams
        self.replica_sets = ReplicaSets(upstreams, metrics.ReplicaMetrics())
        self.tracing = tracing
        self._tracer: AttemptTracer = NO_TRACING if tracing is None else tracing
        self.readiness = ReadinessProbe(self.replica_sets, settings.ready_timeout)
        #: How each upstream continues an answer cut short (upstream/continuation.py).
        self.continuation_modes = ContinuationModes(upstreams, settings.ready_timeout)
        self.continuations = Continuations(
            self.continuation_modes, self.replica_sets, settings.max_continuations
        )
        self.admission = Admission(settings.max_active_streams)
        self.stages = StageRegistry(settings.stage_ttl_seconds, settings.event_ttl_seconds)
        self.store: RedisStageStore | None = None
        self.limits: LimitBook = LocalLimits()
        if settings.store_url:
            self.store, self.limits = _shared_store(settings, self._cancel_here, self.adopt)
        listeners: list[StageListener | None] = [
            self.stages,
            self.admission,
            self.limits,
            metrics.StageMetrics(),
            tracing,
            OutcomeLog(),
            self.store,
        ]
        self._listeners = tuple(x for x in listeners if x is not None)
        #: Idempotency keys without a shared store: (principal, key) -> (stage id, the
        #: digest of its request's body, until).
        self._idempotency: dict[tuple[str, str], tuple[str, str, float]] = {}
        self._idempotency_lock = threading.Lock()
        if self.store is not None:
            self.store.start()  # takes over orphans even before it serves a request
        # Each upstream's continuation mode, probed now rather than in a client's gap.
        self._probe = Task(self._probe_continuation_modes, name="stageserver-continuation-probe")

    def _probe_continuation_modes(self) -> None:
        self.continuation_modes.report()

    # -- start --------------------------------------------------------------------------

    def start(
        self,
        request: StageRequest,
        *,
        request_id: str,
        principal: Principal = ANONYMOUS,
        traceparent: str | None = None,
    ) -> StartedStage:
        """Start the stage ``request`` asks for, as ``principal``'s, continuing the trace
        of ``traceparent`` (the request's header) if traces are on. Raises InvalidRequest
        (its upstream), RateLimited (the principal's limits), ShuttingDown or Overloaded
        (this worker's admission), StageConflict (the principal runs a stage with this
        id) or StoreUnavailable; no upstream call is made then."""
        upstream = self.upstreams.resolve(
            request.upstream, request.base_url, principal.upstreams, request.conversation.model
        )
        check_extra_fields(request.conversation, upstream)
        stage = self._new_stage(request, request_id, upstream, principal, traceparent)
        if principal.limits:
            try:
                self.limits.admit(principal, stage)
            except StageServerError as refusal:
                metrics.limit_refused(principal, refusal.metric_reason)
                raise
        try:
            self._admit(stage)
        except BaseException:
            if principal.limits:
                self.limits.release(principal, stage)
            raise
        stage.start()
        return StartedStage(stage)

    def _admit(self, stage: Stage) -> None:
        try:
            self.admission.admit()
        except (Overloaded, ShuttingDown) as refusal:
            metrics.stage_refused(refusal.metric_reason)
            raise
        try:
            # This process's stages first: the store's claim would take over the keys of
            # one that still runs here (Redis may have lost its lease) and end it.
            self.stages.add(stage)
            if self.store is not None:
                self.store.claim(stage)
        except BaseException:
            self.stages.discard(stage)  # if it got in
            self.admission.release()  # never started: nothing else will give it back
            raise

    def _new_stage(
        self,
        request: StageRequest,
        request_id: str,
        upstream: ReplicaClient,
        principal: Principal,
        traceparent: str | None,
    ) -> Stage:
        settings = self.settings
        conversation = request.conversation
        body = RequestBody(conversation, settings.default_max_tokens)
        resumable = request.resumable
        spec = self._spec(
            request.stage_id,
            upstream.name,
            principal,
            conversation,
            resumable=settings.resumable_default if resumable is None else resumable,
            request_id=request_id,
            traceparent=traceparent,
            detached=request.detached,
            max_seconds=settings.background_max_seconds if request.detached else 0.0,
            keep_seconds=request.keep_seconds,
            keep_events_seconds=request.keep_events_seconds,
        )
        route = self.replica_sets.route(upstream.name)
        relay = UpstreamRelay(
            route, body, {"X-Request-ID": request_id}, self._tracer, self.continuations
        )
        dialect = None if request.dialect is None else request.dialect(request.stage_id)
        store = self.store
        if store is None:
            return Stage(spec, relay, self._listeners, dialect=dialect)
        return Stage(spec, relay, self._listeners, store.watched_elsewhere, dialect, gated=True)

    def _spec(
        self,
        stage_id: str,
        upstream: str,
        principal: Principal,
        conversation: Conversation,
        **given: Any,
    ) -> StageSpec:
        """A stage's spec: what ``given`` says of its request, the rest from the settings."""
        settings = self.settings
        return StageSpec(
            stage_id=stage_id,
            upstream=upstream,
            grace_seconds=settings.resume_grace_seconds,
            max_events=settings.max_events,
            max_event_bytes=settings.max_event_bytes,
            principal=principal,
            prompt_tokens_estimate=estimate_prompt_tokens(conversation.messages),
            model=conversation.model,
            conversation=conversation,
            **given,
        )

    # -- find and cancel ----------------------------------------------------------------

    def find(self, stage_id: str, principal: Principal = ANONYMOUS) -> LocalStage | StoredStage:
        """``principal``'s stage with this id: of this process, else of the shared store.
        Raises UnknownStage when neither has it, another principal's stage included."""
        key = principal.namespace + stage_id
        local = self.stages.get(key)
        if local is not None:
            return LocalStage(local, self.store)
        if self.store is not None:
            return StoredStage(self.store, key, stage_id)
        raise UnknownStage(stage_id)

    def idempotent(self, principal: Principal, key: str, stage_id: str, digest: str) -> str | None:
        """Claim the idempotency key ``key`` of ``principal`` for the stage ``stage_id``,
        whose request's body has ``digest`` (``web/bodies.digest``), for the stage TTL;
        the stage that claimed it before, if one did (a retried request). Raises
        IdempotencyKeyReused when that one's body had another digest, StoreUnavailable.
        In the shared store when there is one, so a retry may land anywhere."""
        held = self._claim_idempotency(principal, key, stage_id, digest)
        if held is None:
            return None
        earlier, earlier_digest = held
        if earlier_digest != digest:
            raise IdempotencyKeyReused(key)
        return earlier

    def _claim_idempotency(
        self, principal: Principal, key: str, stage_id: str, digest: str
    ) -> tuple[str, str] | None:
        """The stage that holds the key, and its body's digest; None if this one claimed it."""
        ttl = self.settings.stage_ttl_seconds
        if self.store is not None:
            return self.store.claim_idempotency(principal.namespace + key, stage_id, digest, ttl)
        now = time.monotonic()
        with self._idempotency_lock:
            held = self._idempotency.get((principal.name, key))
            if held is not None and held[2] > now:
                return held[0], held[1]
            self._idempotency = {k: v for k, v in self._idempotency.items() if v[2] > now}
            self._idempotency[(principal.name, key)] = (stage_id, digest, now + ttl)
        return None

    def release_idempotency(self, principal: Principal, key: str, stage_id: str) -> None:
        """Let ``key`` go, if ``stage_id`` holds it: its stage was refused."""
        if self.store is not None:
            self.store.release_idempotency(principal.namespace + key, stage_id)
            return
        with self._idempotency_lock:
            held = self._idempotency.get((principal.name, key))
            if held is not None and held[0] == stage_id:
                del self._idempotency[(principal.name, key)]

    def forget(self, stage_id: str, principal: Principal = ANONYMOUS) -> None:
        """Forget ``principal``'s finished stage with this id, here and in the shared
        store: its status, events and answer. Raises UnknownStage."""
        found = self.find(stage_id, principal)
        if isinstance(found, LocalStage):
            self.stages.discard(found.stage)
        else:
            found.summary()  # UnknownStage where the store has none
        if self.store is not None:
            self.store.forget(principal.namespace + stage_id)

    def _cancel_here(self, key: str, reason: str) -> None:
        local = self.stages.get(key)
        if local is not None:
            local.cancel(reason)

    # -- taking over -------------------------------------------------------------------

    def adopt(self, key: str) -> bool:
        """Take over the stage ``key``, orphaned by a worker that died or drained, and
        continue it here (``store/takeover.py``); whether this worker, or another, has it."""
        store = self.store
        if store is None or shutdown.shutting_down():
            return False  # a draining worker takes nothing on
        local = self.stages.get(key)
        if local is not None and not local.finished:
            return True  # it runs here: its lease comes back with the next renewal
        try:
            raw = store.reader.record(key)
            record = None if raw is None else StageRecord.from_json(raw)
        except StoreUnavailable:
            return False
        except (KeyError, TypeError, ValueError):
            record = None  # from a worker that predates takeovers: ended as before
        if record is None or record.conversation is None:
            return False
        principal = self._principals.get(record.spec.principal)
        if principal is None or record.spec.upstream not in self.upstreams.names():
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
            stage = self._taken_over(key, claim, principal, instance)
            self.stages.add(stage)
        except (StageConflict, LookupError, TypeError, ValueError) as exc:
            log.warning("stage %s: cannot be taken over here: %s", key, exc)
            self.admission.release()
            store.release_claim(key, instance)
            return True
        store.adopt(stage, claim)
        stage.start()
        return True

    def _taken_over(self, key: str, claim: Claim, principal: Principal, instance: str) -> Stage:
        """The stage ``claim`` holds, made again here from its record."""
        settings = self.settings
        record = StageRecord.from_json(claim.record)
        conversation, spec = record.conversation, record.spec
        if conversation is None:
            raise ValueError("its record has no conversation")
        dialect = dialect_of(record.dialect)
        stage_id = record.stage_id
        stage_spec = self._spec(
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
                f"lapsed {settings.owner_lease_seconds:g} s after its last sign of life"
            )
        assert self.store is not None
        resume = Resume(reason, cause, claim.owner, self.store.owner)
        relay = UpstreamRelay(
            self.replica_sets.route(stage_spec.upstream),
            RequestBody(conversation, settings.default_max_tokens),
            {"X-Request-ID": stage_spec.request_id},
            self._tracer,
            self.continuations,
            resume,
        )
        earlier = claim.summary.get("continuations") or []
        takeover = Takeover(
            next_seq=claim.held,
            text=claim.text,
            content_chunks=claim.content_chunks,
            continuations=tuple(ContinuationRecord(**c) for c in earlier),
            from_owner=claim.owner,
            created_at=spec.started_at,
        )
        return Stage(
            stage_spec,
            relay,
            self._listeners,
            self.store.watched_elsewhere,
            dialect,
            takeover,
            gated=True,
            instance=instance,
        )

    # -- the process's end --------------------------------------------------------------

    def running(self) -> list[Stage]:
        return self.stages.running()

    def abort_running(self, failure: StageFailure) -> int:
        """End every running stage with ``failure``; how many there were. With the shared
        store, a stage that can be resumed (or runs with nobody attached) is handed off
        instead, for another worker to take over."""
        ended = 0
        for stage in self.stages.running():
            if self.store is not None and (stage.spec.resumable or stage.spec.detached):
                ended += stage.hand_off()
            else:
                ended += stage.abort(failure)
        return ended

    def hand_off_unattended(self) -> int:
        """With the shared store: hand off every running stage nobody here follows (a
        background response, a resumable stage whose client left); how many."""
        if self.store is None:
            return 0
        return sum(stage.hand_off() for stage in self.stages.running() if not stage.has_subscribers)

    def close(self) -> None:
        """The process's end: its background work first (the probe asks the upstreams,
        whose clients then close), then what it holds open."""
        self._probe.join(self.settings.ready_timeout)
        self.upstreams.close()
        if self.tracing is not None:
            self.tracing.shutdown()


def _shared_store(
    settings: StageSettings,
    cancel_here: Callable[[str, str], None],
    adopt: Callable[[str], bool],
) -> tuple[RedisStageStore, LimitBook]:
    """The Redis store and the limits kept in it. Imported here, not above: redis is an
    optional dependency (``pip install 'stageserver[redis]'``)."""
    try:
        from .policy.shared_limits import RedisLimits
        from .store.mirror import RedisStageStore
    except ImportError as exc:
        raise ConfigError(
            f"STAGESERVER_STORE_URL needs the redis package ({exc}); "
            "pip install 'stageserver[redis]'"
        ) from None
    store = RedisStageStore(
        settings.store_url or "",
        ttl_seconds=settings.stage_ttl_seconds,
        event_ttl_seconds=settings.event_ttl_seconds,
        max_events=settings.max_events,
        lease_seconds=settings.owner_lease_seconds,
        cancel_here=cancel_here,
        adopt=adopt,
        flush_window=settings.store_flush_window,
        on_written=metrics.STORE_WRITE_DELAY.observe,
        on_reachable=metrics.store_reachable,
        max_connections=settings.store_max_connections,
        on_connections=metrics.store_connections,
    )
    return store, RedisLimits(lambda: store.batcher, store.leases)


def manager_of(extensions: Mapping[str, object]) -> StageManager:
    """The manager ``StageServer.init_app`` keeps in ``app.extensions``."""
    manager = extensions.get("stageserver")
    if not isinstance(manager, StageManager):
        raise RuntimeError(
            "stageserver is not registered on this app; call StageServer(app) or "
            "StageServer().init_app(app) first"
        )
    return manager
