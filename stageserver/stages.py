"""A stage: one chat completion, run against an upstream, recorded as an ordered event log.

The runner reads the upstream in its own greenlet (or thread) and appends each event, as
the bytes a client will receive, to the stage's log. HTTP responses are subscribers that
follow the log, so the original client, a client that reconnects and any watcher all
see the same events, and a client that goes away never blocks the runner.

Every stage ends with exactly one terminal event: ``done``, ``error`` or ``cancel``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx2

from .concurrency import ReadDeadline, Task, Timer, Wakeup
from .errors import (
    FirstTokenTimeout,
    IdleTimeout,
    StageFailure,
    StageInterrupted,
    UpstreamErrorObject,
    UpstreamProtocolError,
)
from .sse import compact_json, encode_event
from .upstream_sse import SSEPayloadSplitter
from .upstreams import Upstream

if TYPE_CHECKING:
    from .redis_store import RedisStageStore

log = logging.getLogger("stageserver.stage")

RUNNING, DONE, ERROR, CANCELLED = "running", "done", "error", "cancelled"
_TERMINAL_EVENT = {DONE: "done", ERROR: "error", CANCELLED: "cancel"}
_DRAIN_SECONDS = 1.0


class Subscriber:
    """One HTTP response following a stage. ``wake`` is set when there is news for it."""

    def __init__(self) -> None:
        self.wake = Wakeup()
        self.client_gone = False


@dataclass(frozen=True)
class StageSpec:
    """Everything a stage needs, as plain values taken from a validated request."""

    stage_id: str
    upstream: Upstream
    body: dict[str, Any]
    resumable: bool
    request_id: str
    grace_seconds: float
    max_events: int


class Stage:
    def __init__(self, spec: StageSpec) -> None:
        self.spec = spec
        self.stage_id = spec.stage_id
        self.upstream = spec.upstream
        self.status = RUNNING
        self.created_at = time.time()
        self.started = time.monotonic()
        self.first_token_seconds: float | None = None
        self.duration_seconds: float | None = None
        self.text_parts: list[str] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.error: str | None = None
        self.error_kind: str | None = None
        self.http_status = 200
        self.cancel_reason: str | None = None
        self.chunk_count = 0

        self._events: list[bytes] = []
        self._first_seq = 0  # sequence number of _events[0], once old events are dropped
        self._subscribers: tuple[Subscriber, ...] = ()
        self._owner_attached = False
        self._lock = threading.Lock()
        self._task: Task | None = None
        self._response: httpx2.Response | None = None
        self._grace_timer: Timer | None = None
        self._running = False
        self._interruption: StageInterrupted | None = None
        self._chunk_data_prefix = b'{"stage_id":' + compact_json(self.stage_id) + b',"chunk":'
        self.on_finish: list[Any] = []
        # Set by a shared store (redis_store.py) that mirrors this stage's events.
        self.mirror: RedisStageStore | None = None
        self.live_ms = 0

    # -- the log -------------------------------------------------------------------------

    @property
    def next_seq(self) -> int:
        return self._first_seq + len(self._events)

    @property
    def finished(self) -> bool:
        return self.status != RUNNING

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def read(self, cursor: int) -> tuple[bytes, int, bool]:
        """Events from sequence number ``cursor`` on, joined; the next cursor; finished?"""
        finished = self.finished  # read before the events, so none can slip in between
        start = max(cursor - self._first_seq, 0)
        events = self._events[start:]
        return b"".join(events), self._first_seq + start + len(events), finished

    @property
    def has_subscribers(self) -> bool:
        return bool(self._subscribers)

    @property
    def events_expired(self) -> bool:
        return self.finished and not self._events

    def drop_events(self) -> None:
        """Forget the events of a finished stage; its status and text stay."""
        self._first_seq += len(self._events)
        self._events = []

    def events_since(self, seq: int) -> list[tuple[int, bytes]]:
        """(sequence number, event) pairs from ``seq`` on, as far as the log reaches back."""
        start = max(seq - self._first_seq, 0)
        return list(enumerate(self._events[start:], self._first_seq + start))

    def _append(self, wire: bytes) -> None:
        self._events.append(wire)
        if self.mirror is not None:
            self.mirror.mark(self)
        if len(self._events) > self.spec.max_events:
            drop = len(self._events) - self.spec.max_events
            del self._events[:drop]
            self._first_seq += drop
        for subscriber in self._subscribers:
            subscriber.wake.set()

    def _append_chunk(self, payload: bytes) -> None:
        seq = self.next_seq
        self.chunk_count += 1
        self._append(
            encode_event(
                "chat_completion_chunk",
                self._chunk_data_prefix + payload + b"}",
                f"{self.stage_id}-chunk-{seq}",
            )
        )

    # -- subscribers ---------------------------------------------------------------------

    def attach(self, subscriber: Subscriber, *, owner: bool) -> None:
        with self._lock:
            self._subscribers = (*self._subscribers, subscriber)
            self._owner_attached = self._owner_attached or owner
            if self._grace_timer is not None:
                self._grace_timer.cancel()
                self._grace_timer = None

    def detach(self, subscriber: Subscriber, *, owner: bool, disconnected: bool) -> None:
        """A subscriber leaves. A disconnect of the stage's own client stops a stage
        that is not resumable; a resumable one runs on for the grace period."""
        with self._lock:
            self._subscribers = tuple(s for s in self._subscribers if s is not subscriber)
            if self.finished or not disconnected:
                return
            if not self.spec.resumable:
                if owner:
                    self._interrupt_locked(StageInterrupted("client disconnected"))
                return
            if not self._subscribers and self._grace_timer is None:
                self._grace_timer = Timer(self.spec.grace_seconds, self._grace_expired)

    def _grace_expired(self) -> None:
        """Nobody attached here for the grace period: cancel, unless someone follows the
        stage through the shared store from another worker."""
        if self.mirror is not None and self.mirror.remote_watchers(self.stage_id) > 0:
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
        self._task = Task(self._run, name=f"stage-{self.stage_id}")

    def cancel(self, reason: str) -> bool:
        """Stop the stage wherever it is; it ends with `cancel`. False if already finished."""
        with self._lock:
            return self._interrupt_locked(StageInterrupted(reason))

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
            if not self._task.interrupt(interruption):
                _shutdown(self._response)  # threads: wake the reader blocked on the upstream
        return True

    def wait(self, timeout: float | None = None) -> None:
        if self._task is not None:
            self._task.join(timeout)

    def _run(self) -> None:
        response: httpx2.Response | None = None
        first_token: ReadDeadline | None = None
        try:
            try:
                with self._lock:
                    self._running = True
                    if self._interruption is not None:
                        raise self._interruption
                first_token = ReadDeadline(self.upstream.config.first_token_timeout)
                try:
                    with first_token:
                        response = self.upstream.open_stream(
                            self.spec.body, {"X-Request-ID": self.spec.request_id}
                        )
                except BaseException as exc:
                    if first_token.fired(exc):
                        raise FirstTokenTimeout(self.upstream.first_token_message()) from None
                    raise
                self._response = response
                if self._interruption is not None:
                    raise self._interruption
                self._relay(response, first_token)
            except StageInterrupted as exc:
                self._interrupted(exc)
            except Exception as exc:
                if self._interruption is not None:  # threads: the shutdown we caused
                    self._interrupted(self._interruption)
                elif isinstance(exc, StageFailure):
                    self._fail(exc)
                else:
                    log.exception("stage %s: unexpected failure", self.stage_id)
                    self._fail(
                        StageFailure(f"internal error in stageserver (stage {self.stage_id})")
                    )
        finally:
            if first_token is not None:
                first_token.close()
            if response is not None:
                # Closing is what tells the upstream to stop generating.
                response.close()
            self._response = None

    def _relay(self, response: httpx2.Response, first_token: ReadDeadline) -> None:
        upstream = self.upstream
        if response.headers.get("content-encoding", "identity") != "identity":
            reads = response.iter_bytes()  # decodes what the upstream compressed anyway
        else:
            reads = response.iter_raw()
        idle = ReadDeadline(upstream.config.idle_timeout)
        try:
            self._relay_reads(reads, first_token, idle)
        finally:
            idle.close()

    def _relay_reads(
        self, reads: Iterator[bytes], first_token: ReadDeadline, idle: ReadDeadline
    ) -> None:
        upstream = self.upstream
        deadline = first_token
        splitter = SSEPayloadSplitter()
        while True:
            try:
                with deadline:
                    raw = next(reads, None)
            except BaseException as exc:
                if deadline.fired(exc) or isinstance(exc, httpx2.ReadTimeout):
                    if deadline is first_token:
                        raise FirstTokenTimeout(upstream.first_token_message()) from None
                    raise IdleTimeout(upstream.idle_message()) from None
                if isinstance(exc, httpx2.TransportError):
                    raise UpstreamProtocolError(
                        f"upstream {upstream.name!r} dropped the connection mid-stream after "
                        f"{self.chunk_count} chunks: {exc or type(exc).__name__}"
                    ) from None
                raise
            if raw is None:
                break
            for payload in splitter.feed(raw):
                if payload == b"[DONE]":
                    self._finish(DONE, {})
                    self._drain(reads)
                    return
                self._take_chunk(payload)
            if self.first_token_seconds is None and self.chunk_count:
                self.first_token_seconds = time.monotonic() - self.started
                deadline = idle
        if self.finish_reason is not None and not splitter.pending():
            self._finish(DONE, {})  # some upstreams end without [DONE]
            return
        raise UpstreamProtocolError(
            f"upstream {upstream.name!r} ended the stream after {self.chunk_count} chunks "
            "without finishing it"
        )

    def _take_chunk(self, payload: bytes) -> None:
        chunk = _parse_chunk(payload)
        if not isinstance(chunk, dict):
            raise UpstreamProtocolError(
                f"upstream {self.upstream.name!r} sent a chunk that is not a JSON object: "
                f"{payload[:120].decode(errors='replace')!r}"
            )
        if "error" in chunk:
            raise UpstreamErrorObject(
                f"upstream {self.upstream.name!r} reported an error mid-stream: "
                f"{_error_message(chunk['error'])}"
            )
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            content = (choice.get("delta") or {}).get("content")
            if content:
                self.text_parts.append(content)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        self._append_chunk(payload)

    def _drain(self, reads: Iterator[bytes]) -> None:
        """Read the body to its end after [DONE], so the connection goes back to the pool.

        Bounded and best-effort: the stage has already finished, and an upstream that
        hangs or resets now costs only its connection. Under threads the read cannot be
        bounded, so the connection is closed instead.
        """
        deadline = ReadDeadline(_DRAIN_SECONDS)
        if not deadline.enforced:
            return
        try:
            with deadline:
                for _ in reads:
                    pass
        except BaseException as exc:
            if not (deadline.fired(exc) or isinstance(exc, Exception)):
                raise
        finally:
            deadline.close()

    # -- the end -------------------------------------------------------------------------

    def _interrupted(self, interruption: StageInterrupted) -> None:
        if interruption.failure is not None:
            self._fail(interruption.failure)
        else:
            self._finish(CANCELLED, {"reason": interruption.reason})

    def _fail(self, failure: StageFailure) -> None:
        self.http_status = failure.http_status
        self.error_kind = type(failure).__name__
        self._finish(ERROR, {"error": str(failure)})

    def _finish(self, status: str, extra: dict[str, Any]) -> None:
        with self._lock:
            if self.finished:
                return
            self.status = status
            self.duration_seconds = time.monotonic() - self.started
            if status == ERROR:
                self.error = str(extra["error"])
            if status == CANCELLED:
                self.cancel_reason = str(extra["reason"])
            kind = _TERMINAL_EVENT[status]
            data = compact_json({"stage_id": self.stage_id, **extra})
            self._append(encode_event(kind, data, f"{self.stage_id}-{kind}-{self.next_seq}"))
            if self._grace_timer is not None:
                self._grace_timer.cancel()
                self._grace_timer = None
        self._log_outcome()
        for callback in self.on_finish:
            callback(self)

    def _log_outcome(self) -> None:
        """One line per stage. The fields go in ``extra`` for structured formatters
        (stageserver/logs.py) and, as ``key=value``, into the message for people."""
        if not log.isEnabledFor(logging.INFO):
            return
        ttft = self.first_token_seconds
        fields: dict[str, Any] = {
            "stage_id": self.stage_id,
            "outcome": _TERMINAL_EVENT[self.status],
            "upstream": self.upstream.name,
            "request_id": self.spec.request_id,
            "ttft_ms": None if ttft is None else round(ttft * 1000, 1),
            "chunks": self.chunk_count,
            "duration_ms": round((self.duration_seconds or 0) * 1000, 1),
        }
        if self.status == ERROR:
            fields["error_kind"] = self.error_kind
            fields["error"] = self.error
        elif self.status == CANCELLED:
            fields["reason"] = self.cancel_reason
        log.info(" ".join(f"{k}={_logfmt(v)}" for k, v in fields.items()), extra=fields)

    def summary(self) -> dict[str, Any]:
        return {
            "stage_id": self.stage_id,
            "status": self.status,
            "upstream": self.upstream.name,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": self.usage,
            "error": self.error,
            "cancel_reason": self.cancel_reason if self.status == CANCELLED else None,
            "resumable": self.spec.resumable,
            "events": self.next_seq,
            "created_at": self.created_at,
            "first_token_seconds": self.first_token_seconds,
            "duration_seconds": self.duration_seconds,
        }


def _logfmt(value: Any) -> str:
    if value is None:
        return "-"
    text = str(value)
    if not text or any(c in text for c in ' "=\\') or not text.isprintable():
        return json.dumps(text, ensure_ascii=False)
    return text


_scan_json = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[attr-defined]
_JSON_SPACE = " \t\n\r"


def _parse_chunk(payload: bytes) -> Any:
    """``json.loads(payload)``, or None where that raises; once per chunk, so the usual
    payload, an object with nothing after it, goes straight to the C scanner."""
    try:
        if payload[:1] == b"{":
            text = payload.decode("utf-8", "surrogatepass")  # what json.loads does
            try:
                value, end = _scan_json(text, 0)
            except StopIteration:
                return None
            if end == len(text) or not text[end:].strip(_JSON_SPACE):
                return value
            return None
        return json.loads(payload)
    except ValueError:
        return None


def _error_message(error: Any) -> str:
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return json.dumps(error)[:300]


def _shutdown(response: httpx2.Response | None) -> None:
    if response is None:
        return
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if sock is not None:
        import socket

        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class StageConflict(Exception):
    pass


class StageRegistry:
    """The stages of this process: live ones, and finished ones until their TTL passes.

    A finished stage's events, the bulk of its memory, go sooner (``event_ttl_seconds``)
    than its status and text (``ttl_seconds``); both are swept when a stage is added."""

    def __init__(self, ttl_seconds: float, event_ttl_seconds: float) -> None:
        self.ttl_seconds = ttl_seconds
        self.event_ttl_seconds = min(event_ttl_seconds, ttl_seconds)
        self._stages: dict[str, Stage] = {}
        self._expiry: deque[tuple[float, Stage]] = deque()
        self._event_expiry: deque[tuple[float, Stage]] = deque()
        self._lock = threading.Lock()

    def add(self, stage: Stage) -> None:
        """Register a new stage; a running stage with the same id is a conflict."""
        with self._lock:
            self._expire()
            current = self._stages.get(stage.stage_id)
            if current is not None and not current.finished:
                raise StageConflict(stage.stage_id)
            self._stages[stage.stage_id] = stage
        stage.on_finish.append(self._finished)

    def get(self, stage_id: str) -> Stage | None:
        return self._stages.get(stage_id)

    def running(self) -> list[Stage]:
        return [s for s in list(self._stages.values()) if not s.finished]

    def _finished(self, stage: Stage) -> None:
        now = time.monotonic()
        with self._lock:
            self._expiry.append((now + self.ttl_seconds, stage))
            self._event_expiry.append((now + self.event_ttl_seconds, stage))

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
            if self._stages.get(stage.stage_id) is stage:
                del self._stages[stage.stage_id]
