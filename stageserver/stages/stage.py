"""A stage: one chat completion, recorded as an ordered event log that responses follow.

A stage holds its event log, the responses following it (subscribers), the grace timer
of a resumable stage nobody follows, and its terminal state. It runs its relay
(``relay.py``) in a greenlet (or a thread) of its own, which drives it through a narrow
interface: ``record_attempt``, ``append_chunk``, ``finish``, and raising a
``StageFailure``. A cancel or an abort is thrown into that greenlet, wherever it waits.

Every stage ends with exactly one terminal event, its dialect's (``dialect.py``): the
seed's ``done``, ``error`` or ``cancel``; Chat Completions' ``[DONE]`` or error; Responses'
``response.completed``, ``.incomplete``, ``.failed`` or ``.cancelled``. The events that
close a stream (a Responses item's ``.done`` events) come just before it.

What else happens in a stage's life is its listeners' business (``StageListener``): the
stage is given them when it is made, calls them in that order, and knows none of them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..concurrency import Task, Timer, Wakeup
from ..errors import StageFailure, StageHandedOff, StageInterrupted, forget_frames
from ..sse import compact_json
from .answer import Answer
from .chunk_read import ChunkRead
from .dialect import Dialect, Ending, resume_at
from .events import TERMINAL_EVENT, SeedDialect
from .log import EventLog
from .records import AttemptRecord, ContinuationRecord, continuation_refusal
from .spec import StageRecord, StageSpec, Takeover, instance_of
from .status import StageStatus

log = logging.getLogger("stageserver.stage")


class StageListener:
    """What a stage tells its listeners; subclasses override the hooks they need.

    The hooks, called in the order the stage was given its listeners:

    - ``on_start(stage)``: the stage is registered and its relay is about to start.
    - ``on_event(stage, seq, wire)``: event number ``seq`` (its bytes, ``wire``) has been
      added to the log. Called in the relay's greenlet for every chunk: cheap, and
      never waiting on anything.
    - ``on_continue(stage, record)``: the answer was continued, or could not be
      (``record.outcome``); with ``ok``, before the marker's events are added.
    - ``on_not_continuable(stage)``: the answer has streamed tool calls or reasoning,
      which no continuation can extend: a worker that takes the stage over must not
      continue it either. Called once, in the relay's greenlet, before that chunk's
      ``on_event``.
    - ``on_finish(stage)``: the stage has its terminal status and event. Called once; no
      client reads that event (nor is its ``on_event`` called) before every listener's
      ``on_finish`` has returned, even one that waits on I/O. One that raises is logged
      and skipped; the clients still get their terminal event.

    A listener reads the stage; it never sets anything on it.
    """

    def on_start(self, stage: Stage) -> None:
        pass

    def on_event(self, stage: Stage, seq: int, wire: bytes) -> None:
        pass

    def on_continue(self, stage: Stage, record: ContinuationRecord) -> None:
        pass

    def on_not_continuable(self, stage: Stage) -> None:
        pass

    def on_finish(self, stage: Stage) -> None:
        pass


class Relay(Protocol):
    """What runs a stage (``relay.UpstreamRelay``)."""

    def run(self, stage: Stage) -> None:
        """Read the upstream into ``stage`` until it ``finish``es; raise a StageFailure."""

    def unblock(self) -> None:
        """Threads only: make a read blocked on the upstream return."""


class Subscriber:
    """One HTTP response following a stage. ``wake`` is set when there is news for it."""

    def __init__(self) -> None:
        self.wake = Wakeup()
        self.client_gone = False


class Stage:
    # Slots: a stage is one of thousands alive at once, and no one adds to it.
    __slots__ = (
        "spec", "stage_id", "key", "instance", "status", "created_at", "started",
        "first_token_seconds", "duration_seconds", "failure", "cancel_reason", "attempts",
        "served_by", "dialect", "_answer", "_final_usage",
        "_relay", "_listeners", "_event_listeners", "_watched_elsewhere", "_log", "_lock",
        "_told", "_subscribers", "_task", "_grace_timer", "_runtime_timer", "_running",
        "_interruption", "continuations", "_takeover", "_lacked", "_gated", "__weakref__",
    )  # fmt: skip

    def __init__(
        self,
        spec: StageSpec,
        relay: Relay,
        listeners: Sequence[StageListener] = (),
        watched_elsewhere: Callable[[str], bool] = lambda key: False,
        dialect: Dialect | None = None,
        takeover: Takeover | None = None,
        *,
        gated: bool = False,
        instance: str | None = None,
    ) -> None:
        """``watched_elsewhere(key)`` says whether a response in another worker still
        follows the stage; a resumable stage nobody follows here waits for it.
        ``dialect``: how its events read (``dialect.py``); the seed's by default.
        ``takeover``: the stage ran in another worker, and goes on here from its log.
        ``gated``: its clients read only the events a listener has made durable
        (``publish``), so that none has seen what a taker would not continue from.
        ``instance``: its instance id, when it was claimed before it was made."""
        self.spec = spec
        self.stage_id = spec.stage_id
        #: The stage's id everywhere inside stageserver: its id in its principal's namespace.
        self.key = spec.principal.namespace + spec.stage_id
        #: Unique to this stage, not only to its key, which a later stage may reuse.
        self.instance = instance_of(self.key) if instance is None else instance
        self.status = StageStatus.RUNNING
        self.created_at = time.time()
        self.started = time.monotonic()
        self.first_token_seconds: float | None = None
        self.duration_seconds: float | None = None
        self._answer = Answer()
        self._final_usage: dict[str, Any] | None = None  # once it has ended
        self.failure: StageFailure | None = None
        self.cancel_reason: str | None = None
        self.attempts: list[AttemptRecord] = []
        #: The attempt that served the first chunk; None while none has.
        self.served_by: AttemptRecord | None = None

        self._relay: Relay | None = relay  # dropped at the end: it holds the request body
        self._listeners = tuple(listeners)
        # Only those that want every event are called for every event.
        self._event_listeners = tuple(
            x for x in self._listeners if type(x).on_event is not StageListener.on_event
        )
        self._watched_elsewhere = watched_elsewhere
        self.dialect: Dialect = SeedDialect(spec.stage_id) if dialect is None else dialect
        self._log = EventLog(spec.max_events, spec.max_event_bytes)
        self._subscribers: tuple[Subscriber, ...] = ()
        # The events told to subscribers: the end is in the log while on_finish runs,
        # which may wait (on Redis), and no subscriber reads it before that is through.
        self._told = 0
        self._lock = threading.Lock()
        self._task: Task | None = None
        self._grace_timer: Timer | None = None
        self._runtime_timer: Timer | None = None
        self._running = False
        self._interruption: StageInterrupted | None = None
        #: Its answer's continuations (``upstream/continuation.py``), made or refused.
        self.continuations: list[ContinuationRecord] = []
        self._takeover = takeover
        # Of a stage taken over: what its log lacks of its opening, added at its start.
        self._lacked: list[bytes] = []
        self._gated = gated
        if takeover is not None:
            self._log.start_at(takeover.next_seq)
            # Its segment so far is what its earlier workers delivered: its usage counts it.
            self._answer = Answer(takeover.text, takeover.content_chunks, takeover.continuable)
            self.continuations = list(takeover.continuations)
            self._lacked = resume_at(self.dialect, takeover.next_seq, takeover.text)
            self.created_at = takeover.created_at or self.created_at

    # -- what it has to say ----------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.status != StageStatus.RUNNING

    # The answer so far (``answer.py``), as its listeners and its relay read it.

    @property
    def text(self) -> str:
        return self._answer.text

    @property
    def text_parts(self) -> list[str]:
        return self._answer.text_parts

    @property
    def content_chunks(self) -> int:
        return self._answer.content_chunks

    @property
    def chunk_count(self) -> int:
        return self._answer.chunk_count

    @property
    def finish_reason(self) -> str | None:
        return self._answer.finish_reason

    @property
    def continuable(self) -> bool:
        return self._answer.continuable

    @property
    def usage(self) -> dict[str, Any] | None:
        """The upstream's usage while the stage runs; once it has ended, its final usage."""
        return self._final_usage if self.finished else self._answer.usage

    @property
    def error(self) -> str | None:
        return None if self.failure is None else str(self.failure)

    @property
    def http_status(self) -> int:
        return 200 if self.failure is None else self.failure.http_status

    @property
    def next_seq(self) -> int:
        return self._log.next_seq

    @property
    def first_kept_seq(self) -> int:
        """The oldest event the log still holds; earlier ones are gone."""
        return self._log.first_seq

    @property
    def events_expired(self) -> bool:
        return self.finished and not len(self._log)

    def read(self, cursor: int) -> tuple[bytes, int, bool]:
        """Events from sequence number ``cursor`` on, joined; the next cursor; finished?"""
        told = self._told
        batch, cursor = self._log.read(cursor, told)
        return batch, cursor, self.finished and told == self._log.next_seq

    def events_since(self, seq: int) -> list[tuple[int, bytes]]:
        return self._log.since(seq)

    def drop_events(self) -> None:
        """Forget the events of a finished stage; its status and text stay."""
        self._log.clear()

    @property
    def upstream(self) -> str:
        """The upstream that served it (maybe a fallback); else the one it resolved to."""
        return self.spec.upstream if self.served_by is None else self.served_by.upstream

    def summary(self) -> dict[str, Any]:
        return {
            "stage_id": self.stage_id,
            "status": self.status,
            "upstream": self.upstream,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": self.usage,
            "error": self.error,
            "cancel_reason": self.cancel_reason if self.status == StageStatus.CANCELLED else None,
            "resumable": self.spec.resumable,
            "events": self._log.next_seq,
            "created_at": self.created_at,
            "first_token_seconds": self.first_token_seconds,
            "duration_seconds": self.duration_seconds,
            "attempts": [vars(a) for a in self.attempts],
            "continuations": [vars(c) for c in self.continuations],
            "continuable": self.continuable,
        }

    # -- what the relay tells it ---------------------------------------------------------

    def record_attempt(self, upstream: str, replica: str, outcome: str, ms: float) -> None:
        """An attempt has served the first chunk (``ok``) or failed before it."""
        record = AttemptRecord(upstream, replica, outcome, round(ms, 1))
        self.attempts.append(record)
        if outcome == "ok":
            self.served_by = record

    def append_chunk(self, payload: bytes, read: ChunkRead) -> None:
        """One upstream chunk: its JSON ``payload`` as sent, and what it says."""
        continuable = self._answer.continuable
        self._answer.take(read)
        if continuable and not self._answer.continuable:
            for listener in self._listeners:
                listener.on_not_continuable(self)
        if self.first_token_seconds is None:
            self.first_token_seconds = time.monotonic() - self.started
        for wire in self.dialect.chunk(self._log.next_seq, payload, read):
            self._notify(self._log.append(wire), wire)

    def finish(self) -> None:
        """The upstream has finished the completion: the stage is done."""
        self._finish(StageStatus.DONE)

    def continuation_refused(self, limit: int) -> str | None:
        """Why its answer may not be continued now; None if it may."""
        return continuation_refusal(self.continuable, self.continuations, limit)

    def record_continuation(self, record: ContinuationRecord) -> None:
        """A continuation of its answer (``ok``: about to be appended, after its marker),
        or one that could not be made."""
        self.continuations.append(record)
        for listener in self._listeners:
            listener.on_continue(self, record)
        if record.outcome != "ok":
            return
        self._answer.next_segment(self.spec.prompt_tokens_estimate)
        for wire in self.dialect.continued(self._log.next_seq, record):
            self._notify(self._log.append(wire), wire)

    def finish_at_length(self) -> None:
        """No token is left for a continuation: the answer ends at its limit."""
        chunk = {
            "id": self.stage_id,
            "object": "chat.completion.chunk",
            "created": int(self.created_at),
            "model": self.spec.model,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
        }
        self.append_chunk(compact_json(chunk), ChunkRead(finish_reason="length", delta={}))
        self.finish()

    def raise_if_interrupted(self) -> None:
        """An interruption that came while the relay was not waiting (under threads, one
        that could not be thrown in): raised here, and not thrown in again later."""
        if self._interruption is not None:
            if self._task is not None:
                self._task.withdraw()
            raise self._interruption

    def _notify(self, seq: int, wire: bytes) -> None:
        for listener in self._event_listeners:
            listener.on_event(self, seq, wire)
        if not self._gated:
            self._told = seq + 1
            for subscriber in self._subscribers:
                subscriber.wake.set()

    def publish(self, upto: int) -> None:
        """Of a gated stage: the events before ``upto`` are durable, its clients may read
        them. (The shared store calls it once it has written them, or at once while it
        cannot write: an outage stops no stream.)"""
        if upto > self._told:
            self._told = upto
            for subscriber in self._subscribers:
                subscriber.wake.set()

    # -- subscribers -----------------------------------------------------------------------

    def attach(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers = (*self._subscribers, subscriber)
            if self._grace_timer is not None:
                self._grace_timer.cancel()
                self._grace_timer = None

    def detach(self, subscriber: Subscriber, *, owner: bool, disconnected: bool) -> None:
        """A subscriber leaves. A disconnect of the stage's own client stops a stage
        that is not resumable; a resumable one runs on for the grace period."""
        with self._lock:
            self._subscribers = tuple(s for s in self._subscribers if s is not subscriber)
            if self.finished or not disconnected or self.spec.detached:
                return
            if not self.spec.resumable:
                if owner:
                    self._interrupt_locked(StageInterrupted("client disconnected"))
                return
            if not self._subscribers and self._grace_timer is None:
                self._grace_timer = Timer(self.spec.grace_seconds, self._grace_expired)

    @property
    def has_subscribers(self) -> bool:
        return bool(self._subscribers)

    def _grace_expired(self) -> None:
        """Nobody attached here for the grace period: cancel, unless one follows elsewhere."""
        if self._watched_elsewhere(self.key):
            with self._lock:
                if not self.finished and not self._subscribers:
                    self._grace_timer = Timer(self.spec.grace_seconds, self._grace_expired)
            return
        with self._lock:
            self._grace_timer = None
            if self._subscribers:
                return
        self.cancel(f"no client re-attached within {self.spec.grace_seconds:g} s")

    # -- running -------------------------------------------------------------------------

    def start(self) -> None:
        for listener in self._listeners:
            listener.on_start(self)
        # A stage taken over adds what its log lacks of its opening: its owner may have
        # died before that was durable, and every stream starts with it.
        opening = self._lacked if self._takeover is not None else self.dialect.opening(0)
        for wire in opening:
            self._notify(self._log.append(wire), wire)
        self._lacked = []
        if self.spec.max_seconds:
            self._runtime_timer = Timer(self.spec.max_seconds, self._overran)
        self._task = Task(self._run, name=f"stage-{self.stage_id}")

    def _overran(self) -> None:
        self.abort(
            StageFailure(
                f"stage {self.stage_id!r} ran longer than its limit of "
                f"{self.spec.max_seconds:g} s (STAGESERVER_BACKGROUND_MAX_SECONDS)"
            )
        )

    def cancel(self, reason: str) -> bool:
        """Stop the stage wherever it is; it ends with `cancel`. False if already finished."""
        with self._lock:
            return self._interrupt_locked(StageInterrupted(reason))

    def hand_off(self) -> bool:
        """Stop the stage at a chunk boundary without ending it, for another worker to take
        over (its worker drains). False if already finished."""
        with self._lock:
            return self._interrupt_locked(StageHandedOff("handed off"))

    def abort(self, failure: StageFailure) -> bool:
        """Stop the stage wherever it is; it ends with `error`. False if already finished."""
        with self._lock:
            return self._interrupt_locked(StageInterrupted(str(failure), failure))

    def _interrupt_locked(self, interruption: StageInterrupted) -> bool:
        if self.finished or self._interruption is not None:
            return False
        self._interruption = interruption
        # A runner that has not begun yet sees the interruption when it does.
        if self._running and self._task is not None:
            if not self._task.interrupt(interruption) and self._relay is not None:
                self._relay.unblock()  # threads: wake the reader blocked on the upstream
        return True

    def wait(self, timeout: float | None = None) -> None:
        if self._task is not None:
            self._task.join(timeout)

    def _run(self) -> None:
        try:
            with self._lock:
                self._running = True
            self.raise_if_interrupted()
            if self._relay is not None:
                self._relay.run(self)
            if not self.finished:
                self.raise_if_interrupted()
                raise RuntimeError("the relay returned without finishing the stage")
        except StageInterrupted as exc:
            self._interrupted(exc)
        except Exception as exc:
            if self._interruption is not None:  # threads: the unblocking we caused
                self._interrupted(self._interruption)
            elif isinstance(exc, StageFailure):
                self._fail(exc)
            else:
                log.exception("stage %s: unexpected failure", self.stage_id)
                self._fail(StageFailure(f"internal error in stageserver (stage {self.stage_id})"))

    # -- the end -------------------------------------------------------------------------

    def _interrupted(self, interruption: StageInterrupted) -> None:
        if isinstance(interruption, StageHandedOff):
            self._handed_off()
        elif interruption.failure is not None:
            self._fail(interruption.failure)
        else:
            self._finish(StageStatus.CANCELLED, reason=interruption.reason)

    def _fail(self, failure: StageFailure) -> None:
        self._finish(StageStatus.ERROR, failure=failure)

    def _finish(
        self, status: StageStatus, *, failure: StageFailure | None = None, reason: str | None = None
    ) -> None:
        with self._lock:
            if self.finished:
                return
            self._final_usage = self._answer.total_usage(self.spec.prompt_tokens_estimate)
            self.failure = failure
            if status == StageStatus.CANCELLED:
                self.cancel_reason = reason
            ending = self._ending(status)
            first = self._log.next_seq
            # The events are in the log before the stage reads as finished: the store
            # (which looks at the status first, then the log) never writes the end
            # without them.
            ends = self.dialect.ending(first, ending)
            for wire in ends:
                self._log.append(wire)
            self._stop_locked(status)
        # Listeners first, then the clients: a client that has the terminal event finds
        # the stage's slots given back and its metrics and log line written.
        self._tell_listeners_finished()
        for seq, wire in enumerate(ends, first):
            self._notify(seq, wire)
        self.publish(self._log.next_seq)  # written by the store's on_finish, or it is down
        self._settle()

    def _handed_off(self) -> None:
        """Stopped for another worker to take over: no terminal event. Its listeners give
        back what it held here (the store writes its events and lets its lease go), and
        its clients read what it has, then their responses end and they resume elsewhere."""
        with self._lock:
            if self.finished:
                return
            self._stop_locked(StageStatus.HANDED_OFF)
        self._tell_listeners_finished()
        self.publish(self._log.next_seq)
        for subscriber in self._subscribers:  # no new event: wake them to read the end
            subscriber.wake.set()
        self._settle()

    def _stop_locked(self, status: StageStatus) -> None:
        self.status = status
        self.duration_seconds = time.monotonic() - self.started
        for timer in (self._grace_timer, self._runtime_timer):
            if timer is not None:
                timer.cancel()
        self._grace_timer = self._runtime_timer = None

    def _tell_listeners_finished(self) -> None:
        """Each listener's ``on_finish``; one that raises is logged and skipped."""
        for listener in self._listeners:
            try:
                listener.on_finish(self)
            except Exception:
                log.exception("stage %s: a listener failed at its %s", self.stage_id, self.status)

    def _ending(self, status: StageStatus) -> Ending:
        failure = self.failure
        return Ending(
            status=status,
            usage=self._final_usage or {},
            text=self.text,
            finish_reason=self.finish_reason,
            failure=failure,
            error=None if failure is None else str(failure),
            reason=self.cancel_reason,
        )

    def record(self) -> StageRecord:
        """Its request, for another host: its dialect's record, its conversation, and what
        a host that takes it over needs of its spec."""
        return StageRecord.of(self.spec, self.dialect, self.created_at)

    def answer(self) -> tuple[dict[str, Any], int]:
        """The whole answer of a finished stage, in its dialect, and its HTTP status."""
        return self.dialect.answer(self._ending(self.status))

    def _settle(self) -> None:
        """A finished stage keeps what it says (its status, text, usage and events), not
        what it used to get there: that is what it costs while it stays retained."""
        self._log.compact()
        self._answer.settle()
        self._relay = None
        # The exception that ended it keeps the frames it went through, which hold the
        # stage: a cycle only a full collection frees, long after the registry dropped it.
        forget_frames(self.failure)
        forget_frames(self._interruption)

    @property
    def outcome(self) -> str:
        """The terminal event's name, once finished: ``done``, ``error`` or ``cancel``."""
        return TERMINAL_EVENT[self.status]
