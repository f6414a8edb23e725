"""How a stage fails, in words a caller can act on.

Every upstream failure becomes one of these before it reaches a client::

    StageFailure                      (stage ends with an `error` event; HTTP 502)
     ├── UpstreamUnavailable          connection refused, DNS, TLS: nothing answered
     ├── UpstreamStatusError          the upstream answered HTTP 4xx/5xx
     ├── UpstreamProtocolError        dropped mid-stream, a chunk that is not JSON
     ├── UpstreamErrorObject          the upstream streamed an error object
     ├── ServerShuttingDown           stageserver is stopping (HTTP 503)
     └── UpstreamTimeout              (HTTP 504)
          ├── ConnectTimeout
          ├── FirstTokenTimeout       no chunk within the first-token timeout (prefill)
          └── IdleTimeout             silent too long between chunks

``StageInterrupted`` is different: it derives from ``BaseException`` so that the openai
client's ``except Exception`` cannot turn it into a connection error while it unwinds a
greenlet blocked on the upstream.
"""

from __future__ import annotations


class StageFailure(Exception):
    http_status = 502


class UpstreamUnavailable(StageFailure):
    pass


class UpstreamStatusError(StageFailure):
    def __init__(self, message: str, upstream_status: int) -> None:
        super().__init__(message)
        self.upstream_status = upstream_status


class UpstreamProtocolError(StageFailure):
    pass


class UpstreamErrorObject(StageFailure):
    pass


class UpstreamTimeout(StageFailure):
    http_status = 504


class ConnectTimeout(UpstreamTimeout):
    pass


class FirstTokenTimeout(UpstreamTimeout):
    pass


class IdleTimeout(UpstreamTimeout):
    pass


class ServerShuttingDown(StageFailure):
    http_status = 503


class StageInterrupted(BaseException):
    """Thrown into a stage's runner to stop it: the stage is cancelled with ``reason``, or,
    when ``failure`` is given, ends with that error instead."""

    def __init__(self, reason: str, failure: StageFailure | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.failure = failure
