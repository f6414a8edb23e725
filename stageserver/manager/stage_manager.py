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
7. the store (``store/stage_store.py``): with ``STAGESERVER_STORE_URL``, the mirror in
   Redis, so other workers see the stage. Last: it writes the stage's end to Redis at
   once, and a client of another worker that reads the end there must find every other
   listener done.

A stage's relay gets the stage's route (``route.py``): the pool of the upstream the
request resolved to, then its fallbacks'. The pools (one per upstream, in this worker)
report each attempt to the per-replica metrics.

The manager holds one store always (``StageStore``): ``LocalStore`` for a process alone,
``RedisStageStore`` with ``STAGESERVER_STORE_URL``; it never asks which. With the shared
store, a stage outlives its worker: the manager takes over a stage whose worker died or
drained (``takeover.py``, which the store asks), and on shutdown it hands its own off
(``hand_off_unattended``, then ``abort_running``). ``close`` ends the app's background
work: the continuation probe, and the store's tasks and connections.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ..concurrency import Task
from ..config import StageSettings
from ..errors import (
    ConfigError,
    IdempotencyKeyReused,
    Overloaded,
    ShuttingDown,
    StageFailure,
    StageServerError,
)
from ..policy.admission import Admission
from ..policy.limits import LimitBook, LocalLimits
from ..principals import ANONYMOUS, Principal, check_upstreams
from ..stages.dialect import Dialects
from ..stages.handle import StageHandle
from ..stages.registry import StageRegistry
from ..stages.spec import StageRequest
from ..stages.stage import Stage, StageListener
from ..store.stage_store import LocalStore, StageStore
from ..telemetry import metrics
from ..telemetry.logs import OutcomeLog
from ..telemetry.tracing import Tracing
from ..upstream.clients import ReplicaClient, UpstreamRegistry
from ..upstream.continuation import ContinuationModes
from ..upstream.health import ReadinessProbe
from ..upstream.relay import NO_TRACING, AttemptTracer, Continuations
from ..upstream.request_body import check_extra_fields
from ..upstream.route import ReplicaSets
from .handles import LocalStage, StartedStage
from .making import StageMaker
from .takeover import Takeovers


class StageManager:
    def __init__(
        self,
        settings: StageSettings,
        upstreams: UpstreamRegistry,
        principals: list[Principal] | None = None,
        tracing: Tracing | None = None,
        *,
        dialects: Dialects,
    ) -> None:
        """``principals``: the configured ones, checked against the upstreams here.
        ``tracing``: None when traces are off (``tracing.start_tracing``). ``dialects``:
        the dialects whose stages it can take over and read back (``stageserver.dialects``
        has them all); a stage is started with its own dialect, whatever this holds."""
        check_upstreams(principals or [], upstreams.names())
        self._principals = {p.name: p for p in [ANONYMOUS, *(principals or [])]}
        self.settings = settings
        self.upstreams = upstreams
        self.dialects = dialects
        self.replica_sets = ReplicaSets(upstreams, metrics.ReplicaMetrics())
        self.tracing = tracing
        tracer: AttemptTracer = NO_TRACING if tracing is None else tracing
        self.readiness = ReadinessProbe(self.replica_sets, settings.ready_timeout)
        #: How each upstream continues an answer cut short (upstream/continuation.py).
        self.continuation_modes = ContinuationModes(upstreams, settings.ready_timeout)
        continuations = Continuations(
            self.continuation_modes, self.replica_sets, settings.max_continuations
        )
        self.admission = Admission(settings.max_active_streams)
        self.stages = StageRegistry(settings.stage_ttl_seconds, settings.event_ttl_seconds)
        self.store, self.limits = _store(settings, self._cancel_here, self._adopt, dialects)
        listeners: list[StageListener | None] = [
            self.stages,
            self.admission,
            self.limits,
            metrics.StageMetrics(),
            tracing,
            OutcomeLog(),
            self.store,
        ]
        self._maker = StageMaker(
            settings,
            self.replica_sets,
            tracer,
            continuations,
            tuple(x for x in listeners if x is not None),
            self.store,
        )
        self._takeovers = Takeovers(
            self._maker,
            self.store,
            self.stages,
            self.admission,
            self._principals,
            upstreams.names,
            dialects,
        )
        self.store.start()  # a shared store takes over orphans even before it serves
        # Each upstream's continuation mode, probed now rather than in a client's gap.
        self._probe = Task(self._probe_continuation_modes, name="stageserver-continuation-probe")
        self._closed = False

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
        return StartedStage(stage, self.store)

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
        resumable = request.resumable
        spec = self._maker.spec(
            request.stage_id,
            upstream.name,
            principal,
            request.conversation,
            resumable=settings.resumable_default if resumable is None else resumable,
            request_id=request_id,
            traceparent=traceparent,
            detached=request.detached,
            max_seconds=settings.background_max_seconds if request.detached else 0.0,
            keep_seconds=request.keep_seconds,
            keep_events_seconds=request.keep_events_seconds,
        )
        dialect = None if request.dialect is None else request.dialect(request.stage_id)
        return self._maker.stage(spec, request.conversation, dialect)

    # -- find, forget and cancel ----------------------------------------------------------

    def find(self, stage_id: str, principal: Principal = ANONYMOUS) -> StageHandle:
        """``principal``'s stage with this id: of this process, else of the store. Raises
        UnknownStage when neither has it, another principal's stage included."""
        key = principal.namespace + stage_id
        local = self.stages.get(key)
        if local is not None:
            return LocalStage(local, self.store)
        return self.store.find(key, stage_id)

    def forget(self, stage_id: str, principal: Principal = ANONYMOUS) -> None:
        """Forget ``principal``'s finished stage with this id, here and in the store: its
        status, events and answer. Raises UnknownStage."""
        key = principal.namespace + stage_id
        local = self.stages.get(key)
        if local is not None:
            self.stages.discard(local)
        else:
            self.store.find(key, stage_id).summary()  # UnknownStage where none has it
        self.store.forget(key)

    def idempotent(self, principal: Principal, key: str, stage_id: str, digest: str) -> str | None:
        """Claim the idempotency key ``key`` of ``principal`` for the stage ``stage_id``,
        whose request's body has ``digest`` (``web/bodies.digest``), for the stage TTL;
        the stage that claimed it before, if one did (a retried request). Raises
        IdempotencyKeyReused when that one's body had another digest, StoreUnavailable.
        Kept by the store: a shared one, so that a retry may land anywhere."""
        held = self.store.claim_idempotency(
            principal.namespace + key, stage_id, digest, self.settings.stage_ttl_seconds
        )
        if held is None:
            return None
        earlier, earlier_digest = held
        if earlier_digest != digest:
            raise IdempotencyKeyReused(key)
        return earlier

    def release_idempotency(self, principal: Principal, key: str, stage_id: str) -> None:
        """Let ``key`` go, if ``stage_id`` holds it: its stage was refused."""
        self.store.release_idempotency(principal.namespace + key, stage_id)

    def _cancel_here(self, key: str, reason: str) -> None:
        """A cancel asked of another process, for a stage of this one (the store's)."""
        local = self.stages.get(key)
        if local is not None:
            local.cancel(reason)

    def _adopt(self, key: str) -> bool:
        """The store found an orphan: ``takeover.Takeovers.adopt``."""
        return self._takeovers.adopt(key)

    # -- the process's end --------------------------------------------------------------

    def running(self) -> list[Stage]:
        return self.stages.running()

    def abort_running(self, failure: StageFailure) -> int:
        """End every running stage with ``failure``; how many there were. Where the store
        lets a stage go on elsewhere, one that can be resumed (or runs with nobody
        attached) is handed off instead, for another worker to take over."""
        ended = 0
        for stage in self.stages.running():
            if self.store.can_hand_off(stage) and (stage.spec.resumable or stage.spec.detached):
                ended += stage.hand_off()
            else:
                ended += stage.abort(failure)
        return ended

    def hand_off_unattended(self) -> int:
        """Hand off every running stage nobody here follows (a background response, a
        resumable stage whose client left), where the store lets it go on elsewhere;
        how many."""
        return sum(
            stage.hand_off()
            for stage in self.stages.running()
            if not stage.has_subscribers and self.store.can_hand_off(stage)
        )

    def close(self) -> None:
        """The end of the app (``stageserver.close(app)``) or of the process: its
        background work first (the continuation probe, which asks the upstreams, whose
        clients then close; the store's tasks), then what it holds open (the upstreams'
        connections, the store's, the traces' exporter). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._probe.join(self.settings.ready_timeout)
        self.store.close()
        self.upstreams.close()
        if self.tracing is not None:
            self.tracing.shutdown()


def _store(
    settings: StageSettings,
    cancel_here: Callable[[str, str], None],
    adopt: Callable[[str], bool],
    dialects: Dialects,
) -> tuple[StageStore, LimitBook]:
    """The store, and the limits kept beside it: in Redis with ``STAGESERVER_STORE_URL``,
    else this process's. The Redis store is imported here, not above: redis is an
    optional dependency (``pip install 'stageserver[redis]'``)."""
    if not settings.store_url:
        return LocalStore(), LocalLimits()
    try:
        from ..policy.shared_limits import RedisLimits
        from ..store.mirror import RedisStageStore
    except ImportError as exc:
        raise ConfigError(
            f"STAGESERVER_STORE_URL needs the redis package ({exc}); "
            "pip install 'stageserver[redis]'"
        ) from None
    store = RedisStageStore(
        settings.store_url,
        ttl_seconds=settings.stage_ttl_seconds,
        event_ttl_seconds=settings.event_ttl_seconds,
        max_events=settings.max_events,
        lease_seconds=settings.owner_lease_seconds,
        cancel_here=cancel_here,
        adopt=adopt,
        dialects=dialects,
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
