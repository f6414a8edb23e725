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
retries the request: no content comes twice. A failure then ends the stage with its
error event, unless the answer is continued (below).

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

An answer cut short after its first chunk, in a way that leaves it worth finishing
(``StageFailure.continuable``), is continued (``continuation.py``): the same upstream,
on another replica when it has one, is asked to go on from the text delivered, with the
tokens left, and its reply is appended to the stage after a marker (``Stage.continued``).
A stage taken over from a dead or draining worker (``resume``) starts there. What it
costs the relay when nothing fails: one test per chunk.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import httpx2

from ..concurrency import FirstTokenDeadline, ReadDeadline
from ..errors import (
    ContinuationFailed,
    FirstTokenTimeout,
    IdleTimeout,
    StageFailure,
    UpstreamProtocolError,
    outcome_of,
)
from ..stages.chunk_read import ChunkRead
from ..stages.records import ContinuationRecord
from .chunks import read_chunk
from .continuation import ContinuationModes, ContinuedReply, continuation_request
from .replicas import Replica, ReplicaAttempt
from .request_body import RequestBody
from .route import ReplicaSets, Route
from .sse import SSEPayloadSplitter

_DRAIN_SECONDS = 1.0


class ChunkSink(Protocol):
    """What the relay needs of a stage."""

    @property
    def chunk_count(self) -> int: ...

    @property
    def content_chunks(self) -> int: ...

    @property
    def text(self) -> str: ...

    @property
    def upstream(self) -> str: ...

    @property
    def next_seq(self) -> int: ...

    def continuation_refused(self, limit: int) -> str | None: ...

    def record_continuation(self, record: ContinuationRecord) -> None: ...

    def finish_at_length(self) -> None: ...

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


class Continuations:
    """What continuing an answer takes, the same for every stage of a process: each
    upstream's mode, the replica sets, and how many times one stage may be continued."""

    def __init__(self, modes: ContinuationModes, replica_sets: ReplicaSets, limit: int) -> None:
        self.modes = modes
        self.replica_sets = replica_sets
        self.limit = limit


@dataclass(frozen=True)
class Resume:
    """A stage taken over from another worker: why (``owner_lost``, ``drain``), what ended
    its run there, and the workers (``host:pid``) it goes from and to."""

    reason: str
    cause: StageFailure
    from_worker: str
    to_worker: str


class _Segment:
    """One request of a stage, whichever replica serves it: its first, or a
    continuation. ``body(attempt)``: the path and body of an attempt. ``reply()``: how
    the serving attempt's reply is read (None: as the upstream sent it). ``first(attempt)``:
    called when an attempt serves the segment's first chunk, before it is appended."""

    __slots__ = ("body", "reply", "first")

    def __init__(
        self,
        body: Callable[[ReplicaAttempt], tuple[str, dict[str, Any]]],
        reply: Callable[[], ContinuedReply] | None = None,
        first: Callable[[ReplicaAttempt], None] | None = None,
    ) -> None:
        self.body = body
        self.reply = reply
        self.first = first


def _uncontinued(failure: StageFailure, reason: str, refused: str | None) -> StageFailure:
    """What ends an answer that is not continued: the failure that cut it, as it always
    did; for a stage taken over, with why it cannot go on."""
    if reason == "upstream_failed":
        return failure
    return StageFailure(f"{failure}; its answer cannot be continued: {refused}")


class UpstreamRelay:
    def __init__(
        self,
        route: Route,
        body: RequestBody,
        headers: Mapping[str, str],
        tracer: AttemptTracer = NO_TRACING,
        continuations: Continuations | None = None,
        resume: Resume | None = None,
    ) -> None:
        """``body``: the request body for an attempt at each replica. ``continuations``:
        None, never continue. ``resume``: the stage was taken over, and its first request
        continues what its log holds."""
        self.route = route
        self._body = body
        self._headers = headers
        self._tracer = tracer
        self._continuations = continuations
        self._resume = resume
        self._socket: socket.socket | None = None  # threads: the one to shut down
        self._serving: ReplicaAttempt | None = None  # the attempt whose chunks flow

    def run(self, stage: ChunkSink) -> None:
        if self._resume is not None:
            self._continue(stage, self._resume.reason, self._resume.cause)
            return
        plain = _Segment(lambda attempt: ("/chat/completions", self._body(attempt.client)))
        try:
            self._segment(stage, self.route, plain)
        except StageFailure as failure:
            if not (failure.continuable and stage.chunk_count):
                raise
            self._continue(stage, "upstream_failed", failure)

    def _segment(self, stage: ChunkSink, route: Route, segment: _Segment) -> None:
        """The route's attempts, one after another until one serves the first chunk."""
        last: StageFailure | None = None
        while (attempt := route.next_attempt()) is not None:
            try:
                self._attempt(stage, attempt, segment)
                return
            except StageFailure as failure:
                if attempt.served or not failure.worth_another_replica:
                    raise
                last = failure
                if attempt.budget_bound and isinstance(failure, FirstTokenTimeout):
                    break  # the stage's budget is spent
        raise route.give_up(last)

    # -- continuing ------------------------------------------------------------------------

    def _continue(self, stage: ChunkSink, reason: str, failure: StageFailure) -> None:
        """Continue the answer until it ends, or a continuation cannot be made."""
        while (again := self._continue_once(stage, reason, failure)) is not None:
            failure, reason = again, "upstream_failed"

    def _continue_once(
        self, stage: ChunkSink, reason: str, failure: StageFailure
    ) -> StageFailure | None:
        """One continuation: None when the stage has ended; the failure that cut the
        continuation short after its first chunk, when that may be continued in turn."""
        continuations = self._continuations
        cut = str(failure)
        refused = (
            "continuation is off"
            if continuations is None
            else stage.continuation_refused(continuations.limit)
        )
        names: list[str] = []
        if continuations is not None and refused is None:
            # The upstream that served, then the route's others that continue of their own.
            serving = stage.upstream
            order = (serving, *continuations.replica_sets.order(self.route.name))
            names = [n for n in dict.fromkeys(order) if continuations.modes.of(n).continues]
            if not names:
                mode = continuations.modes.of(serving)
                refused = f"upstream {serving!r} cannot continue an answer ({mode.mode})"
        after = stage.next_seq - 1
        if continuations is None or refused is not None:
            stage.record_continuation(
                ContinuationRecord(after, reason, "none", "refused", cause=cut, error=refused or "")
            )
            raise _uncontinued(failure, reason, refused)
        budget = self._body.max_tokens - stage.content_chunks
        if budget <= 0:
            would = continuations.modes.of(names[0]).mode
            stage.record_continuation(ContinuationRecord(after, reason, would, "length"))
            stage.finish_at_length()
            return None
        modes = continuations.modes
        delivered = stage.text
        failed = self._serving
        avoid: Replica | None = None if failed is None else failed.replica
        route = continuations.replica_sets.continuation_route(names, avoid)
        replies: list[ContinuedReply] = []  # one per attempt: how its reply is read
        served: list[ReplicaAttempt] = []  # the attempt that served its first chunk

        def body(attempt: ReplicaAttempt) -> tuple[str, dict[str, Any]]:
            mode = modes.of(attempt.name).mode
            chat = self._body(attempt.client)
            prompt: str | None = None
            stop: tuple[str, ...] = ()
            if mode == "raw":
                prompt, stop = modes.raw_prompt(attempt.name, attempt.client, chat["messages"])
            request = continuation_request(mode, chat, delivered, budget, prompt, stop)
            replies.append(ContinuedReply(request))
            return request.path, request.body

        from_replica = "" if failed is None else failed.url
        resumed = self._resume if reason != "upstream_failed" else None
        workers = {} if resumed is None else {
            "from_worker": resumed.from_worker, "to_worker": resumed.to_worker,
        }  # fmt: skip

        def first_chunk(attempt: ReplicaAttempt) -> None:
            served.append(attempt)
            stage.record_continuation(
                ContinuationRecord(
                    after, reason, modes.of(attempt.name).mode, "ok",
                    model=attempt.config.model_for(self._body.conversation.model),
                    upstream=attempt.name, from_replica=from_replica, to_replica=attempt.url,
                    cause=cut, **workers,
                )
            )  # fmt: skip

        segment = _Segment(body, lambda: replies[-1], first_chunk)
        try:
            self._segment(stage, route, segment)
            return None
        except StageFailure as last:
            if served:  # it failed after its first chunk: continued in turn, maybe
                if last.continuable:
                    return last
                raise
            stage.record_continuation(
                ContinuationRecord(
                    after, reason, modes.of(names[0]).mode, "failed", cause=cut, error=str(last)
                )  # fmt: skip
            )
            raise ContinuationFailed(f"{cut}; its continuation failed: {last}", last) from None

    def unblock(self) -> None:
        """Threads: shut the socket down under the thread blocked reading it."""
        sock = self._socket
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _attempt(self, stage: ChunkSink, attempt: ReplicaAttempt, segment: _Segment) -> None:
        """One attempt, to the stage's end or to its failure, which it records."""
        trace = self._tracer.attempt(stage, attempt)
        began = time.monotonic()
        first_token = FirstTokenDeadline(attempt.timeout)
        idle = ReadDeadline(attempt.config.idle_timeout)
        close: Callable[[], None] | None = None
        outcome = "ok"
        try:
            upstream = attempt.client
            path, body = segment.body(attempt)
            headers = trace.headers(self._headers)
            try:
                with first_token:
                    response = upstream.open_stream(body, headers, path)
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
            self._relay(stage, attempt, segment, trace, reads, first_token, idle, began)
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
        segment: _Segment,
        trace: AttemptTrace,
        payload: bytes,
        began: float,
    ) -> None:
        """The attempt has its first chunk: from now on nothing is retried."""
        attempt.served_first_chunk()
        self._serving = attempt
        stage.record_attempt(attempt.name, attempt.url, "ok", (time.monotonic() - began) * 1000)
        trace.served(payload)
        if segment.first is not None:
            segment.first(attempt)

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
        segment: _Segment,
        trace: AttemptTrace,
        reads: Iterator[bytes],
        first_token: ReadDeadline,
        idle: ReadDeadline,
        began: float,
    ) -> None:
        upstream = attempt.client
        name = upstream.name
        deadline = first_token
        splitter = SSEPayloadSplitter()
        finished_by_upstream = False
        served = False  # a local: it is read for every chunk
        shape = None if segment.reply is None else segment.reply().shape
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
                        self._served(stage, attempt, segment, trace, payload, began)
                    stage.finish()
                    self._drain(reads)
                    return
                read = read_chunk(payload, name)
                if not served:
                    served = True
                    self._served(stage, attempt, segment, trace, payload, began)
                finished_by_upstream = finished_by_upstream or read.finish_reason is not None
                if shape is None:
                    stage.append_chunk(payload, read)
                else:
                    for shaped, shaped_read in shape(payload, read):
                        stage.append_chunk(shaped, shaped_read)
            if deadline is first_token and served:
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
