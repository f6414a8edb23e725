"""What every API request of stageserver shares, whichever blueprint serves it: the
manager, the request's principal (decided first, ``auth.py``) and id, the start of a
stage for it (``start``), and the events of a stage it follows on its own socket (sent by
``stream.event_stream``), or the answer it waits for (``serve``)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response, current_app, g, jsonify, request

from ..errors import ClientGone
from ..manager import StageManager, manager_of
from ..manager.handles import StartedStage
from ..principals import ANONYMOUS, Principal
from ..stages.feeds import EventFeed
from ..stages.spec import StageRequest
from ..stream import Framing, event_stream, follow
from . import cors
from .auth import authenticator_of

#: A stage's final answer and status as a response, with the given headers.
Answer = Callable[[dict[str, Any], int, dict[str, str] | None], Response]


def manager() -> StageManager:
    return manager_of(current_app.extensions)


def prepare() -> None:
    """Before each request: its body's limit, its id, and its principal (or a 401)."""
    request.max_content_length = manager().settings.max_body_bytes
    request.environ.setdefault("stageserver.request_id", _request_id())
    if request.method == "OPTIONS":
        return  # a browser's preflight carries no credentials; cors.py answers it
    principal = authenticator_of(current_app.extensions).principal(request)
    g.stageserver_principal = principal
    if principal is not ANONYMOUS:
        # For the access log line: %({stageserver.principal}e)s in gunicorn_conf.py.
        request.environ["stageserver.principal"] = principal.name


def finish(response: Response) -> Response:
    """After each request: its id, and what CORS allows."""
    request_id = request.environ.get("stageserver.request_id")
    if request_id:
        response.headers["X-Request-ID"] = request_id
    return cors.apply(request, response, manager().settings.cors_origins)


def principal() -> Principal:
    found = g.get("stageserver_principal")
    if not isinstance(found, Principal):
        raise RuntimeError("no principal: the request did not pass through prepare()")
    return found


def request_id() -> str:
    return str(request.environ["stageserver.request_id"])


def _request_id() -> str:
    given = request.headers.get("X-Request-ID", "")
    if given and len(given) <= 128 and given.isprintable():
        return given
    return uuid.uuid4().hex


def followed_to_end(events: Iterator[bytes]) -> bool:
    """Follow a stage this request started to its end, sending nothing (it answers once
    the stage is over); False when the client left first (the stage is then cancelled,
    unless it runs detached)."""
    try:
        for _ in events:
            pass
    except ClientGone:
        return False
    return True


def follow_here(feed: EventFeed, after_seq: int, framing: Framing) -> Iterator[bytes]:
    """The events this response sends: the one follow loop, on this request's socket."""
    return follow(
        feed,
        after_seq=after_seq,
        client_socket=request.environ.get("gunicorn.socket"),
        settings=manager().settings.follow,
        framing=framing,
    )


def start(stage: StageRequest) -> StartedStage:
    """Start ``stage`` for this request: its id, its principal and its ``traceparent`` go
    with it."""
    return manager().start(
        stage,
        request_id=request_id(),
        principal=principal(),
        traceparent=request.headers.get("traceparent"),
    )


def json_answer(body: dict[str, Any], status: int, headers: dict[str, str] | None) -> Response:
    """``body`` as JSON, with ``status``, and ``headers`` where given."""
    response = jsonify(body)
    response.status_code = status
    if headers:
        response.headers.update(headers)
    return response


def serve(
    started: StartedStage,
    framing: Framing,
    *,
    stream: bool,
    headers: dict[str, str] | None = None,
    answer: Answer = json_answer,
) -> Response:
    """The response of the request that started ``started``, which follows it on its own
    socket: its events as they come (``stream``); else, once it has ended, its final
    answer and status as ``answer`` makes them a response; a 499 when the client left
    first. ``headers`` go with either."""
    events = follow_here(started.starter_feed(), -1, framing)
    if stream:
        return event_stream(events, headers)
    if not followed_to_end(events):
        return Response(status=499)  # nobody reads this; the stage has been cancelled
    body, status = started.final_answer()
    return answer(body, status, headers)
