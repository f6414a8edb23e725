"""Every way a request can be refused or a stage can fail, as one tree.

Each error carries what HTTP needs (its status, the field it is about, ``Retry-After``,
any extra fields of the JSON body); only the views turn one into a response, through
one mapping (``web/errors.py``)::

    StageServerError
     ├── ConfigError                  a STAGESERVER_* setting is wrong (start-up; also a ValueError)
     ├── Refusal                      no stage is run, or the stage asked for is not there
     │    ├── InvalidRequest          400 (422 when a field breaks its rule; 400 on /v1)
     │    ├── IdempotencyKeyReused    422, on /v1 too: an Idempotency-Key sent again with
     │    │                           another body
     │    ├── Unauthorized            401 + WWW-Authenticate: no, or an unknown, API key
     │    ├── RateLimited             429 + Retry-After: a principal's limit is reached
     │    ├── UnknownStage            404: unknown, expired, or not the caller's to see
     │    ├── EventsExpired           410: the status is still there, the events are not
     │    ├── StageConflict           409: a stage with this id is running
     │    ├── StageFinished           409: too late to cancel
     │    ├── Overloaded              503 + Retry-After: this worker runs its limit of stages
     │    ├── ShuttingDown            503 + Retry-After: this worker takes no new stages
     │    └── StoreUnavailable        503 + Retry-After: the shared store cannot answer
     ├── StageLost                    a followed stage can no longer be followed (store gone,
     │                                stage expired): that response ends with an id-less error
     └── StageFailure                 the stage ends with an `error` event (502 unstreamed)
          ├── UpstreamFailure         the upstream's fault; counted per kind in /metrics
          │    ├── UpstreamUnavailable       connection refused, DNS, TLS: nothing answered
          │    ├── UpstreamStatusError       the upstream answered HTTP 4xx/5xx (and maybe
          │    │                             Retry-After)
          │    ├── UpstreamProtocolError     dropped mid-stream (``dropped``), a chunk that is
          │    │                             not JSON
          │    ├── UpstreamErrorObject       the upstream streamed an error object
          │    ├── UpstreamTimeout           504
          │    │    ├── ConnectTimeout
          │    │    ├── FirstTokenTimeout    no chunk within the first-token timeout (prefill)
          │    │    └── IdleTimeout          silent too long between chunks
          │    ├── AllAttemptsFailed         several attempts (replicas, fallbacks) failed
          │    │                             before the first chunk; each is named
          │    ├── NoReplicaAvailable        503: nothing could be tried: every replica is
          │    │                             at its max_in_flight or held by a Retry-After
          │    └── ContinuationFailed        an answer cut short could not be continued:
          │                                  what cut it, and why the continuation failed
          ├── ServerShuttingDown      503: stageserver is stopping
          └── LeaseLost               503: this worker lost the stage to another (fencing)

Two exceptions stand outside the tree because of what they must get past:

- ``StageInterrupted`` derives from ``BaseException`` so that the openai client's
  ``except Exception`` cannot turn it into a connection error while it unwinds a
  greenlet blocked on the upstream.
- ``ClientGone`` is a ``ConnectionResetError``, raised out of a response generator so
  that gunicorn drops the connection without writing (it ignores ECONNRESET quietly).
"""

from __future__ import annotations

import errno
from typing import Any


class StageServerError(Exception):
    http_status = 500
    #: The ``reason`` label under which /metrics counts a refusal
    #: (``stageserver_stages_refused_total``, ``stageserver_principal_refused_total``).
    metric_reason = "error"
    #: The request field the error is about, named as the caller spelled it.
    field: str | None = None
    #: Seconds after which a retry may succeed (the ``Retry-After`` header).
    retry_after: int | None = None
    #: Further response headers.
    headers: dict[str, str] = {}
    #: A machine-readable code, as OpenAI's error bodies carry one (``/v1``).
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        retry_after: int | None = None,
        **body: Any,
    ) -> None:
        super().__init__(message)
        if field is not None:
            self.field = field
        if retry_after is not None:
            self.retry_after = retry_after
        #: Further fields of the JSON error body, e.g. ``reason`` and ``limit``.
        self.body = body

    @property
    def openai_status(self) -> int:
        """Its status on ``/v1``, where OpenAI's clients read it: ``http_status``, a 422
        included, unless the class says otherwise (``InvalidRequest``)."""
        return self.http_status


class ConfigError(StageServerError, ValueError):
    """A ``STAGESERVER_*`` setting is missing or malformed; the message says which and why."""


# -- refusals ----------------------------------------------------------------------------


class Refusal(StageServerError):
    http_status = 400


class InvalidRequest(Refusal):
    """400; with ``fields`` (one entry per bad field), 422, except on ``/v1``: OpenAI
    answers any request that breaks its rules with 400."""

    code = "invalid_value"

    @property
    def openai_status(self) -> int:
        return 400

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        fields: list[dict[str, str]] | None = None,
        code: str | None = None,
    ) -> None:
        if fields is None:
            super().__init__(message, field=field)
        else:
            super().__init__(message, fields=fields)
            self.http_status = 422
        if code is not None:
            self.code = code


class IdempotencyKeyReused(Refusal):
    """422, on ``/v1`` too: the ``Idempotency-Key`` of an earlier request, sent with
    another body. The key names that request for as long as it is kept, so this one can
    be neither answered with its response nor run (as the IETF draft on the header,
    ``draft-ietf-httpapi-idempotency-key-header``, says)."""

    http_status = 422
    field = "Idempotency-Key"
    code = "idempotency_key_reused"

    def __init__(self, key: str) -> None:
        super().__init__(
            f"Idempotency-Key: {key!r} was sent before with a different request body; "
            "a retry must send the same body, and a new request a new key"
        )


class Unauthorized(Refusal):
    """401; ``invalid_token`` when a key was presented (RFC 6750's error code)."""

    http_status = 401
    code = "invalid_api_key"

    def __init__(self, message: str, *, invalid_token: bool = False) -> None:
        super().__init__(message)
        challenge = 'Bearer realm="stageserver"'
        if invalid_token:
            challenge += ', error="invalid_token"'
        self.headers = {"WWW-Authenticate": challenge}


class RateLimited(Refusal):
    """429; ``limit`` names the limit, ``principal`` whose it is."""

    http_status = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int, limit: str, principal: str) -> None:
        super().__init__(message, retry_after=retry_after, limit=limit, principal=principal)
        self.metric_reason = limit


class UnknownStage(Refusal):
    http_status = 404
    field = "stage_id"
    code = "not_found"

    def __init__(self, stage_id: str) -> None:
        super().__init__(f"no stage {stage_id!r} (unknown, or expired)")


class EventsExpired(Refusal):
    http_status = 410
    field = "stage_id"

    def __init__(self, stage_id: str) -> None:
        super().__init__(
            f"the events of stage {stage_id!r} have expired; its status is at /stages/{stage_id}"
        )


class StageConflict(Refusal):
    http_status = 409
    field = "stage_id"

    def __init__(self, stage_id: str) -> None:
        super().__init__(
            f"stage {stage_id!r} is still running; wait for it, cancel it, or use another stage_id"
        )


class StageFinished(Refusal):
    http_status = 409

    def __init__(self, stage_id: str) -> None:
        super().__init__(f"stage {stage_id!r} has already finished")


class Overloaded(Refusal):
    http_status = 503
    retry_after = 1
    metric_reason = "overload"

    def __init__(self, message: str, *, limit: int) -> None:
        super().__init__(message, reason=self.metric_reason, limit=limit)


class ShuttingDown(Refusal):
    http_status = 503
    retry_after = 1
    metric_reason = "shutting_down"

    def __init__(self, message: str) -> None:
        super().__init__(message, reason=self.metric_reason)


class StoreUnavailable(Refusal):
    """503: Redis did not answer; ``cause`` is what went wrong."""

    http_status = 503
    retry_after = 1
    metric_reason = "store"

    def __init__(self, cause: BaseException | str) -> None:
        super().__init__(store_unavailable_message(cause))


def store_unavailable_message(cause: BaseException | str) -> str:
    return f"the stage store (Redis) is unavailable: {cause}; retry shortly"


# -- a followed stage that cannot be followed any more -------------------------------------


class StageLost(StageServerError):
    pass


# -- failures: the stage ends with an `error` event ------------------------------------------


class StageFailure(StageServerError):
    """A stage's end in error. When it ends an attempt at an upstream replica, it also says
    how that attempt went (``outcome``: the name ``/stages``, the metrics and the traces
    give it) and what that says of the replica (``replica_down``: it did not answer in
    time, or answered 5xx; ``replica_answered``: it is up, whatever it said). Neither:
    it says nothing of the replica (stageserver's own failure)."""

    http_status = 502
    outcome = "error"
    replica_down = False
    replica_answered = False
    #: After the first chunk: whether the answer may be continued from what it delivered
    #: (``upstream/continuation.py``): the upstream cut it, went silent, sent an error
    #: object or a chunk that does not parse. Never stageserver's own failures.
    continuable = False
    #: The upstream refused the request itself as malformed (HTTP 400 or 422: an image to
    #: a text-only model, a value out of its range): the caller's error, which OpenAI's
    #: API answers as such (400), in the upstream's words and naming its ``field``.
    refused_request = False

    @property
    def worth_another_replica(self) -> bool:
        """Before the first chunk: whether another replica may do better (this one is
        down or busy). Any other 4xx is the caller's error, and a malformed answer or an
        error object would most likely come again."""
        return self.replica_down


class UpstreamFailure(StageFailure):
    pass


class UpstreamUnavailable(UpstreamFailure):
    """Nothing answered: connection refused, DNS, TLS."""

    outcome = "refused"
    replica_down = True


class UpstreamStatusError(UpstreamFailure):
    def __init__(
        self,
        message: str,
        upstream_status: int,
        upstream_retry_after: float | None = None,
        *,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        """``param`` and ``code``: those of the upstream's error body, if it gave them."""
        super().__init__(message, field=param)
        self.upstream_status = upstream_status
        self.refused_request = upstream_status in (400, 422)
        if code is not None:
            self.code = code
        #: Seconds the upstream asked not to be called for (its ``Retry-After``), if it
        #: said; not ``retry_after``, which is what stageserver tells its own caller.
        self.upstream_retry_after = upstream_retry_after
        self.outcome = f"http_{upstream_status}"
        self.replica_down = upstream_status >= 500
        self.replica_answered = not self.replica_down

    @property
    def worth_another_replica(self) -> bool:
        return self.replica_down or self.upstream_status == 429  # busy


class UpstreamProtocolError(UpstreamFailure):
    continuable = True

    def __init__(self, message: str, *, dropped: bool = False) -> None:
        super().__init__(message)
        #: The connection dropped, or the body ended, before the stream finished: a
        #: reset, where the other protocol errors are a malformed answer. (A flag, not a
        #: subclass, so that /metrics keeps counting both as UpstreamProtocolError.)
        self.dropped = dropped
        self.outcome = "reset" if dropped else "protocol_error"
        self.replica_down = dropped
        self.replica_answered = not dropped


class UpstreamErrorObject(UpstreamFailure):
    outcome = "error_object"
    replica_answered = True
    continuable = True


class UpstreamTimeout(UpstreamFailure):
    http_status = 504


class ConnectTimeout(UpstreamTimeout):
    outcome = "connect_timeout"
    replica_down = True


class FirstTokenTimeout(UpstreamTimeout):
    outcome = "first_token_timeout"
    replica_down = True


class IdleTimeout(UpstreamTimeout):
    outcome = "idle_timeout"
    replica_down = True
    continuable = True


class AllAttemptsFailed(UpstreamFailure):
    """Several attempts failed before the first chunk; the message names each one's
    upstream, replica and outcome, then the last error. Its HTTP status is the last
    attempt's (504 when that one timed out)."""

    def __init__(self, message: str, last: StageFailure) -> None:
        super().__init__(message)
        self.http_status = last.http_status
        self.last = last


class NoReplicaAvailable(UpstreamFailure):
    """No attempt could be made: every replica the stage may use is at its
    ``max_in_flight`` in this worker, or asked (Retry-After) not to be called yet."""

    http_status = 503


class ContinuationFailed(UpstreamFailure):
    """An answer cut short (``cause``: what cut it; None when its worker died or handed
    it off) whose continuation failed before its first chunk (``last``)."""

    def __init__(self, message: str, last: StageFailure | None = None) -> None:
        super().__init__(message)
        self.last = last
        if last is not None:
            self.http_status = last.http_status
            self.outcome = last.outcome


class ServerShuttingDown(StageFailure):
    http_status = 503


class LeaseLost(StageFailure):
    http_status = 503


# -- outside the tree --------------------------------------------------------------------------


class StageInterrupted(BaseException):
    """Thrown into a stage's runner to stop it: the stage is cancelled with ``reason``, or,
    when ``failure`` is given, ends with that error instead."""

    outcome = "cancelled"

    def __init__(self, reason: str, failure: StageFailure | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.failure = failure


class StageHandedOff(StageInterrupted):
    """Thrown into a stage's runner when its worker drains: the stage stops at a chunk
    boundary, with no terminal event, for another worker to take over."""

    outcome = "handoff"


def outcome_of(exc: BaseException) -> str:
    """How an attempt that ``exc`` ended is named in ``/stages``, the metrics and the
    traces: the failure's own ``outcome``; ``error`` for anything unforeseen."""
    if isinstance(exc, StageFailure | StageInterrupted):
        return exc.outcome
    return "error"


class ClientGone(ConnectionResetError):
    """Raised out of a response so that gunicorn drops the connection without writing."""

    def __init__(self) -> None:
        super().__init__(errno.ECONNRESET, "client disconnected")


def forget_frames(exc: BaseException | None) -> None:
    """Drop the tracebacks of ``exc`` and of the exceptions chained to it, keeping their
    class and message: the frames hold whatever they were raised through."""
    pending, seen = [exc], set()
    while pending:
        exc = pending.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        exc.__traceback__ = None
        pending += [exc.__cause__, exc.__context__]
