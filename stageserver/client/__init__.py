"""The Python client of stageserver's HTTP API, on httpx and httpx-sse:

    from stageserver.client import ChunkEvent, StageClient

    with StageClient("http://127.0.0.1:8000") as client:
        for event in client.stream(
            stage_id="hello-1", model_name="smollm2", user_prompt="Hi!", resumable=True
        ):
            if isinstance(event, ChunkEvent):
                print(event.text, end="", flush=True)

``AsyncStageClient`` has the same methods for asyncio (``async for``, ``await``).

``stream()`` posts ``/chat`` when the iteration begins and yields the stage's events in
order: ``ChunkEvent``s (with a ``ContinuedEvent`` where an answer cut short went on: a
failed upstream, a dead or drained worker), then exactly one of ``DoneEvent``,
``ErrorEvent`` and ``CancelEvent``. If the connection drops before that last one, it
re-attaches through ``GET /stages/<id>/events`` with ``Last-Event-ID`` set to the last
event it received, waiting between attempts (the server's ``retry:``, else
``resume_delay``, doubled each time), so that the caller gets every event exactly once
and never notices the drop. Only a resumable stage outlives a drop; the server cancels
one that is not. Started with ``resumable=False``, the stream then raises ``StreamLost``
saying so; left to the server's default, it re-attaches all the same and yields the
``CancelEvent`` the server recorded, if any. ``attach()`` follows a stage that another
client started, the same way.

Stopping the iteration (``break``, or closing the generator) closes the connection at
once. That is a disconnect, not a stop: it cancels a stage that is not resumable and
leaves a resumable one running for ``attach()`` to pick up. The stop is ``cancel()``.
Under asyncio a generator left by ``break`` is closed only when it is collected; wrap it
in ``contextlib.aclosing`` to close it at once.

A stage that fails is not an exception: its ``error`` event is an ``ErrorEvent``, and
``run()`` returns a ``TextStageOutput`` of type ``error``. Exceptions are for requests
that the server refused or that did not get through:

    StageClientError              anything the client raises
     ├── StageConnectionError     the server could not be reached, or did not answer
     ├── StreamLost               a stream dropped before its end and cannot be resumed
     └── StageHTTPError           an error status: .status, .message, .body, .retry_after
          ├── InvalidRequest      400, 413, 422; .fields names each bad field
          ├── Unauthorized        401: no API key, or a wrong one
          ├── NotFound            404: no such stage (unknown, or expired)
          ├── Conflict            409: the stage is still running, or already finished
          ├── Gone                410: the stage's events expired (its status has not)
          ├── RateLimited         429: come back after .retry_after seconds
          └── Unavailable         503: come back after .retry_after seconds

Importing the client imports neither Flask nor gevent nor the server.
"""

from .clients import AsyncStageClient, StageClient
from .errors import (
    Conflict,
    Gone,
    InvalidRequest,
    NotFound,
    RateLimited,
    StageClientError,
    StageConnectionError,
    StageHTTPError,
    StreamLost,
    Unauthorized,
    Unavailable,
)
from .events import (
    CancelEvent,
    ChunkEvent,
    ContinuedEvent,
    DoneEvent,
    ErrorEvent,
    StageEvent,
    TextStageOutput,
    Usage,
)

__all__ = [
    "AsyncStageClient",
    "CancelEvent",
    "ChunkEvent",
    "Conflict",
    "ContinuedEvent",
    "DoneEvent",
    "ErrorEvent",
    "Gone",
    "InvalidRequest",
    "NotFound",
    "RateLimited",
    "StageClient",
    "StageClientError",
    "StageConnectionError",
    "StageEvent",
    "StageHTTPError",
    "StreamLost",
    "TextStageOutput",
    "Unauthorized",
    "Unavailable",
    "Usage",
]
