"""The relay: one stage's upstream request, read to its end and handed to the stage.

``UpstreamRelay.run`` asks the stage's route (``route.py``) for an attempt, a lease on one
replica, sends the request through that replica's OpenAI client, reads the body as it
comes (``iter_raw``, so the chunk's bytes reach the client unchanged), splits it into SSE
payloads, has each chunk read (``chunks.py``) and appends it to the stage. It is the one
place that reads an upstream's body.

Before the first chunk, an attempt that fails in a way worth another
(``StageFailure.worth_another_replica``: refused, reset, 5xx, 429, its first-token
deadline) is recorded on the stage and the
route's next attempt begins. Nothing has reached the client yet: it sees heartbeats, then
the one stream of the attempt that served. After the first chunk the relay never
retries: a failure ends the stage with its error event, and no content comes twice.

Two deadlines bound a silent upstream: each attempt's first-token deadline (its
upstream's ``attempt_timeout``, never more than the stage's budget has left), from its
request to its first chunk, and the serving upstream's idle timeout between chunks. Each
raises its own ``StageFailure``, as does every other way an upstream can fail
(``errors.py``).

After ``[DONE]`` the stage is finished at once and the body is then read to its end, for
at most a second, so that the connection goes back to the pool. However an attempt ends,
the relay closes its response (the close is what tells the upstream to stop) and
releases its lease. Attempts run one at a time, so a cancel during failover, thrown into
the relay wherever it waits, finds one attempt open, and closes it.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import httpx2

from ..concurrency import FirstTokenDeadline, ReadDeadline
from ..errors import (
    FirstTokenTimeout,
    IdleTimeout,
    StageFailure,
    UpstreamProtocolError,
    outcome_of,
)
from ..stages.stage import ChunkRead
from .chunks import read_chunk
from .clients import Upstream
from .replicas import ReplicaAttempt
from .route import Route
from .sse import SSEPayloadSplitter

_DRAIN_SECONDS = 1.0


class ChunkSink(Protocol):
    """What the relay needs of a stage."""

    @property
    def chunk_count(self) -> int: ...

    def record_attempt(self, upstream: str, replica: str, outcome: str, ms: float) -> None: ...

    def append_chunk(self, payload: bytes, read: ChunkRead) -> None: ...

    def finish(self) -> None: ...

    def raise_if_interrupted(self) -> None: ...


class AttemptTrace(Protocol):
    """One attempt's span (``tracing.py``), or nothing when tracing is off."""

    def headers(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        """The request's headers, with this attempt's ``traceparent``."""

    def served(self, payload: bytes) -> None:
        """The attempt's first chunk, as the upstream sent it."""

    def end(self, outcome: str) -> None: ...


class AttemptTracer(Protocol):
    def attempt(self, stage: object, attempt: ReplicaAttempt) -> AttemptTrace: ...


class _NoTrace:
    def headers(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        return headers

    def served(self, payload: bytes) -> None:
        pass

    def end(self, outcome: str) -> None:
        pass


class NoTracing:
    """Tracing off: nothing is started, nothing is sent."""

    _trace = _NoTrace()

    def attempt(self, stage: object, attempt: ReplicaAttempt) -> AttemptTrace:
        return self._trace


NO_TRACING = NoTracing()


def _body_of(
    response: httpx2.Response,
) -> tuple[Iterator[bytes], Callable[[], None], socket.socket | None]:
    """What the relay keeps of a response: its body's reads, what closes it, its socket."""
    network = response.extensions.get("network_stream")
    sock = network.get_extra_info("socket") if network is not None else None
    if response.headers.get("content-encoding", "identity") != "identity":
        return response.iter_bytes(), response.close, sock  # the response decodes
    # The transport's own stream (``Response.stream``, httpx's public attribute):
    # iter_raw() would add two generators and a list to every read.
    stream = response.stream
    if not isinstance(stream, httpx2.SyncByteStream):
        raise TypeError("the upstream client answered with an async stream")
    return iter(stream), stream.close, sock


class UpstreamRelay:
    def __init__(
        self,
        route: Route,
        body: Callable[[Upstream], dict[str, Any]],
        headers: Mapping[str, str],
        tracer: AttemptTracer = NO_TRACING,
    ) -> None:
        """``body(upstream)``: the request body for an attempt at that upstream."""
        self.route = route
        self._body = body
        self._headers = headers
        self._tracer = tracer
        self._socket: socket.socket | None = None  # threads: the one to shut down

    def run(self, stage: ChunkSink) -> None:
        route = self.route
        last: StageFailure | None = None
        while (attempt := route.next_attempt()) is not None:
            try:
                self._attempt(stage, attempt)
                return
            except StageFailure as failure:
                if attempt.served or not failure.worth_another_replica:
                    raise
                last = failure
                if attempt.budget_bound and isinstance(failure, FirstTokenTimeout):
                    break  # the stage's budget is spent
        raise route.give_up(last)

    def unblock(self) -> None:
        """Threads: shut the socket down under the thread blocked reading it."""
        sock = self._socket
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _attempt(self, stage: ChunkSink, attempt: ReplicaAttempt) -> None:
        """One attempt, to the stage's end or to its failure, which it records."""
        trace = self._tracer.attempt(stage, attempt)
        began = time.monotonic()
        first_token = FirstTokenDeadline(attempt.timeout)
        idle = ReadDeadline(attempt.config.idle_timeout)
        close: Callable[[], None] | None = None
        outcome = "ok"
        try:
            upstream = attempt.upstream
            body, headers = self._body(upstream), trace.headers(self._headers)
            try:
                with first_token:
                    response = upstream.open_stream(body, headers)
            except BaseException as exc:
                if first_token.fired(exc):
                    raise self._first_token_timeout(attempt) from None
                raise
            try:
                reads, close, self._socket = _body_of(response)
            except BaseException:
                response.close()
                raise
            # The response is let go: only its body is read from here on, and its request
            # and both sets of headers would be kept for the stage's whole life.
            del response
            stage.raise_if_interrupted()
            self._relay(stage, attempt, trace, reads, first_token, idle, began)
        except BaseException as exc:
            outcome = outcome_of(exc)
            if not attempt.served:
                stage.record_attempt(
                    attempt.name, attempt.url, outcome, (time.monotonic() - began) * 1000
                )
            attempt.failed(exc)
            raise
        finally:
            first_token.close()
            idle.close()
            if close is not None:
                close()  # what tells the upstream to stop generating
            self._socket = None
            attempt.release()
            trace.end(outcome)

    def _served(
        self,
        stage: ChunkSink,
        attempt: ReplicaAttempt,
        trace: AttemptTrace,
        payload: bytes,
        began: float,
    ) -> None:
        """The attempt has its first chunk: from now on nothing is retried."""
        attempt.served_first_chunk()
        stage.record_attempt(attempt.name, attempt.url, "ok", (time.monotonic() - began) * 1000)
        trace.served(payload)

    def _first_token_timeout(self, attempt: ReplicaAttempt) -> FirstTokenTimeout:
        if attempt.budget_bound:
            return FirstTokenTimeout(self.route.first_token_message())
        return FirstTokenTimeout(
            f"upstream {attempt.name!r} at {attempt.url} sent no first token within "
            f"{attempt.timeout:g} s (its attempt_timeout)"
        )

    def _relay(
        self,
        stage: ChunkSink,
        attempt: ReplicaAttempt,
        trace: AttemptTrace,
        reads: Iterator[bytes],
        first_token: ReadDeadline,
        idle: ReadDeadline,
        began: float,
    ) -> None:
        upstream = attempt.upstream
        name = upstream.name
        deadline = first_token
        splitter = SSEPayloadSplitter()
        finished_by_upstream = False
        served = False  # a local: it is read for every chunk
        while True:
            try:
                with deadline:
                    raw = next(reads, None)
            except BaseException as exc:
                if deadline.fired(exc) or isinstance(exc, httpx2.ReadTimeout):
                    if deadline is first_token:
                        raise self._first_token_timeout(attempt) from None
                    raise IdleTimeout(upstream.idle_message()) from None
                if isinstance(exc, httpx2.TransportError):
                    raise UpstreamProtocolError(
                        f"upstream {name!r} dropped the connection mid-stream after "
                        f"{stage.chunk_count} chunks: {exc or type(exc).__name__}",
                        dropped=True,
                    ) from None
                raise
            if raw is None:
                break
            for payload in splitter.feed(raw):
                if payload == b"[DONE]":
                    if not served:
                        self._served(stage, attempt, trace, payload, began)
                    stage.finish()
                    self._drain(reads)
                    return
                read = read_chunk(payload, name)
                if not served:
                    served = True
                    self._served(stage, attempt, trace, payload, began)
                finished_by_upstream = finished_by_upstream or read[1] is not None
                stage.append_chunk(payload, read)
            if deadline is first_token and stage.chunk_count:
                deadline = idle
        if finished_by_upstream and not splitter.pending():
            stage.finish()  # some upstreams end without [DONE]
            return
        raise UpstreamProtocolError(
            f"upstream {name!r} ended the stream after {stage.chunk_count} chunks "
            "without finishing it",
            dropped=True,
        )

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
            with deadline:  # one deadline for the whole drain, not one per read
                for _ in reads:
                    pass
        except BaseException as exc:
            if not (deadline.fired(exc) or isinstance(exc, Exception)):
                raise
        finally:
            deadline.close()
