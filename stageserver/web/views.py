"""HTTP: authenticate, validate the request, ask the stage manager, answer as SSE or JSON.

Every request of this blueprint names its principal first (``auth.py``); validation
happens here; the manager gets plain values, never the request. Every refusal and
failure arrives as an exception from ``errors.py`` and leaves as JSON through the one
mapping in ``errors.py``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

from flask import Blueprint, Response, current_app, g, jsonify, request
from pydantic import ValidationError

from ..errors import ClientGone, InvalidRequest
from ..manager import LocalStage, StageManager, StartedStage, StoredStage, manager_of
from ..principals import ANONYMOUS, Principal
from ..schemas import (
    STAGE_ID_PATTERN,
    STAGE_ID_RULE,
    Cancelling,
    ChatRequest,
    UpstreamList,
    UpstreamName,
    field_errors,
)
from ..stages.conversation import Conversation
from ..stages.events import seq_of
from ..stages.feeds import EventFeed
from ..stages.spec import StageRequest
from . import cors
from .auth import authenticator_of
from .bodies import json_object
from .errors import answer_in_json
from .follow import follow

bp = Blueprint("stageserver", __name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_STAGE_ID = re.compile(STAGE_ID_PATTERN)


def _manager() -> StageManager:
    return manager_of(current_app.extensions)


@bp.before_request
def _prepare() -> None:
    request.max_content_length = _manager().settings.max_body_bytes
    request.environ.setdefault("stageserver.request_id", _request_id())
    if request.method == "OPTIONS":
        return  # a browser's preflight carries no credentials; cors.py answers it
    principal = authenticator_of(current_app.extensions).principal(request)
    g.stageserver_principal = principal
    if principal is not ANONYMOUS:
        # For the access log line: %({stageserver.principal}e)s in gunicorn_conf.py.
        request.environ["stageserver.principal"] = principal.name


def _principal() -> Principal:
    principal = g.get("stageserver_principal")
    if not isinstance(principal, Principal):
        raise RuntimeError("no principal: the request did not pass through _prepare")
    return principal


def _request_id() -> str:
    given = request.headers.get("X-Request-ID", "")
    if given and len(given) <= 128 and given.isprintable():
        return given
    return uuid.uuid4().hex


@bp.after_request
def _finish_response(response: Response) -> Response:
    request_id = request.environ.get("stageserver.request_id")
    if request_id:
        response.headers["X-Request-ID"] = request_id
    return cors.apply(request, response, _manager().settings.cors_origins)


answer_in_json(bp)


def _event_stream(events: Iterator[bytes]) -> Response:
    # Passed through: gunicorn iterates and closes our generator itself, without werkzeug's
    # two layers around it (a frame each on every write and on a parked response's stack).
    return Response(
        events, mimetype="text/event-stream", headers=SSE_HEADERS, direct_passthrough=True
    )


def _follow(feed: EventFeed, after_seq: int) -> Iterator[bytes]:
    """The events this response sends: the one follow loop, on this request's socket."""
    return follow(
        feed,
        after_seq=after_seq,
        client_socket=request.environ.get("gunicorn.socket"),
        settings=_manager().settings.follow,
    )


@bp.post("/chat")
def chat() -> Response:
    manager = _manager()
    chat_request = _chat_request(manager)
    started = manager.start(
        _stage_request(chat_request),
        request_id=request.environ["stageserver.request_id"],
        principal=_principal(),
        traceparent=request.headers.get("traceparent"),
    )
    events = _follow(started.starter_feed(), after_seq=-1)
    if chat_request.stream:
        return _event_stream(events)
    return _final_output(started, events)


def _chat_request(manager: StageManager) -> ChatRequest:
    # Any Content-Type: curl -d sends a form type. The body's size limit is _prepare's.
    body = json_object(request.get_data(cache=False))
    settings = manager.settings
    try:
        return ChatRequest.model_validate(
            body,
            context={
                "max_tokens_limit": settings.max_tokens_limit,
                "max_prompt_chars": settings.max_prompt_chars,
            },
        )
    except ValidationError as exc:
        raise _invalid(field_errors(exc)) from None


def _stage_request(chat_request: ChatRequest) -> StageRequest:
    conversation = Conversation.of_prompts(
        chat_request.model_name,
        chat_request.user_prompt,
        chat_request.system_prompt,
        max_tokens=chat_request.max_tokens,
        temperature=chat_request.temperature,
    )
    return StageRequest(
        chat_request.stage_id,
        conversation,
        upstream=chat_request.upstream,
        base_url=chat_request.base_url,
        resumable=chat_request.resumable,
    )


def _invalid(errors: list[dict[str, str]]) -> InvalidRequest:
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return InvalidRequest(f"invalid request: {summary}", fields=errors)


def _stage(stage_id: str) -> LocalStage | StoredStage:
    """The caller's stage. An id that no stage can have is a 422 naming the field, as
    in /chat, before anything is looked up."""
    if not _STAGE_ID.fullmatch(stage_id):
        raise _invalid([{"field": "stage_id", "message": STAGE_ID_RULE}])
    return _manager().find(stage_id, _principal())


def _final_output(started: StartedStage, events: Iterator[bytes]) -> Response:
    """Wait for the stage, still noticing a client that leaves, and answer the seed's way."""
    try:
        for _ in events:
            pass
    except ClientGone:
        return Response(status=499)  # nobody reads this; the stage has been cancelled
    body, status = started.answer()
    response = jsonify(body)
    response.status_code = status
    return response


@bp.get("/upstreams")
def upstreams() -> Response:
    """The upstreams the caller may use, by name, the default first: never a URL (it may
    hold credentials, and says where they are) nor an API key."""
    registry = _manager().upstreams
    listed = [
        UpstreamName(name=name, kind=registry.config(name).kind, default=n == 0)
        for n, name in enumerate(registry.usable(_principal().upstreams))
    ]
    return jsonify(UpstreamList(upstreams=listed).model_dump())


@bp.get("/stages/<stage_id>")
def stage_status(stage_id: str) -> Response:
    # Built by Stage.summary(); tests/test_openapi.py holds it to the StageStatus model.
    return jsonify(_stage(stage_id).summary())


@bp.get("/stages/<stage_id>/events")
def stage_events(stage_id: str) -> Response:
    stage = _stage(stage_id)
    last_event_id = request.headers.get("Last-Event-ID") or request.args.get("last_event_id")
    after_seq = -1
    if last_event_id:
        seq = seq_of(last_event_id, stage_id)
        if seq is None:
            raise InvalidRequest(
                f"Last-Event-ID {last_event_id!r} is not an event id of stage {stage_id!r}",
                field="Last-Event-ID",
            )
        after_seq = seq
    feed = stage.feed(after_seq)
    if feed is None:
        # The stage has ended and the client has its last event: 204 tells an
        # EventSource to stop reconnecting (the SSE specification's answer).
        return Response(status=204)
    return _event_stream(_follow(feed, after_seq))


@bp.post("/stages/<stage_id>/cancel")
def cancel_stage(stage_id: str) -> Response:
    _stage(stage_id).cancel("cancelled by request")
    response = jsonify(Cancelling(stage_id=stage_id).model_dump())
    response.status_code = 202
    return response
