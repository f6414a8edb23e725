"""The seed's API, ``POST /chat`` and ``/stages/...``: authenticate, validate the request,
ask the stage manager, answer as SSE (``stream.py``) or JSON.

Every request of this blueprint names its principal first (``auth.py``); validation
happens here; the manager gets plain values, never the request. Every refusal and
failure arrives as an exception from ``errors.py`` and leaves as JSON through the one
mapping in ``errors.py``.
"""

from __future__ import annotations

import re

from flask import Blueprint, Response, jsonify, request
from pydantic import ValidationError

from .errors import InvalidRequest
from .manager import StageManager
from .schemas import (
    STAGE_ID_PATTERN,
    STAGE_ID_RULE,
    Cancelling,
    ChatRequest,
    UpstreamList,
    UpstreamName,
    field_errors,
)
from .sse import encode_retry
from .stages.conversation import Conversation
from .stages.events import lost_event, seq_of
from .stages.handle import StageHandle
from .stages.spec import StageRequest
from .stream import Framing, event_stream
from .web import context
from .web.bodies import json_object
from .web.errors import answer_in_json

bp = Blueprint("stageserver", __name__)
bp.before_request(context.prepare)
bp.after_request(context.finish)
answer_in_json(bp)

_STAGE_ID = re.compile(STAGE_ID_PATTERN)


def _framing() -> Framing:
    """The seed's: a ``retry:`` line first, and its id-less ``error`` for a lost stage."""
    return Framing(encode_retry(context.manager().settings.follow.retry_ms), lost_event)


@bp.post("/chat")
def chat() -> Response:
    manager = context.manager()
    chat_request = _chat_request(manager)
    started = context.start(_stage_request(chat_request))
    return context.serve(started, _framing(), stream=chat_request.stream)


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


def _stage(stage_id: str) -> StageHandle:
    """The caller's stage. An id that no stage can have is a 422 naming the field, as
    in /chat, before anything is looked up."""
    if not _STAGE_ID.fullmatch(stage_id):
        raise _invalid([{"field": "stage_id", "message": STAGE_ID_RULE}])
    return context.manager().find(stage_id, context.principal())


@bp.get("/upstreams")
def upstreams() -> Response:
    """The upstreams the caller may use, by name, the default first: never a URL (it may
    hold credentials, and says where they are) nor an API key."""
    registry = context.manager().upstreams
    listed = [
        UpstreamName(name=name, kind=registry.config(name).kind, default=n == 0)
        for n, name in enumerate(registry.usable(context.principal().upstreams))
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
    return event_stream(context.follow_here(feed, after_seq, _framing()))


@bp.post("/stages/<stage_id>/cancel")
def cancel_stage(stage_id: str) -> Response:
    _stage(stage_id).cancel("cancelled by request")
    response = jsonify(Cancelling(stage_id=stage_id).model_dump())
    response.status_code = 202
    return response
