"""OpenAI's API on stageserver's stages: ``/v1/chat/completions``, ``/v1/models`` and
``/v1/responses`` (``openai_api/`` holds the request models and the two dialects).

Each request is a stage, with an id stageserver makes (``chatcmpl-…``, ``resp_…``),
sent in ``X-Stage-Id``: a Stop button elsewhere can ``POST /stages/<id>/cancel`` on
any host. Keys, ownership, limits, usage, metrics, traces and logs apply as on
``/chat``. Every error has OpenAI's body, ``{"error": {"message", "type", "param",
"code"}}`` (``errors.OPENAI``).

A response of ``/v1/responses`` runs in one of four modes:

- plain: the whole Response, once it has ended;
- ``stream``: its events; a client that leaves cancels it;
- ``background``: the Response at once, ``in_progress``; it runs with nobody attached,
  bounded by ``STAGESERVER_BACKGROUND_MAX_SECONDS`` and the principal's ``max_streams``;
- ``background`` + ``stream``: its events from ``sequence_number`` 0; a client that
  leaves does not cancel it, and ``GET /v1/responses/{id}?stream=true&starting_after=N``
  streams it again from any host, each event exactly once.

``GET /v1/responses/{id}`` gives the Response as it stands, ``POST …/cancel`` stops it
wherever it runs and gives its Response (idempotent: a finished one's is given as it
is), ``DELETE`` cancels it if it runs and forgets it. ``Idempotency-Key`` on a create
gives a retried request the response the first one made; the same key with another body
(``bodies.digest``) is refused with 422 (``IdempotencyKeyReused``).
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from flask import Blueprint, Response, jsonify, request

from ..errors import EventsExpired, InvalidRequest, StageFinished, UnknownStage
from ..manager.handles import StartedStage
from ..openai_api.chat import ChatCompletionsDialect, openai_error
from ..openai_api.requests import ChatCompletionRequest, ResponseRequest, validated
from ..openai_api.responses import ResponsesDialect, refused_request
from ..sse import compact_json
from ..stages.handle import StageHandle
from ..stages.spec import StageRequest
from ..stream import Framing, event_stream
from . import context
from .bodies import digest, json_object
from .errors import OPENAI, answer_in_json, by_header
from .messages import ANTHROPIC, MESSAGES_VERSION, anthropic_models

bp = Blueprint("stageserver_v1", __name__)
bp.before_request(context.prepare)
bp.after_request(context.finish)
# /v1/models answers Anthropic's clients too: in their shape, errors included.
answer_in_json(bp, by_header(MESSAGES_VERSION, ANTHROPIC, OPENAI))

#: How long a cancel or a delete waits for the response to end before it answers.
CANCEL_WAIT_SECONDS = 5.0
#: A response is kept at least this long after its end, as OpenAI keeps one; the events
#: of one that can be streamed again (background + stream) at least ``KEEP_EVENTS``.
KEEP_RESPONSE_SECONDS = 600.0
KEEP_EVENTS_SECONDS = 300.0
_RESPONSE_ID = re.compile(r"^resp_[0-9a-f]{32}$")


def _lost(stage_id: str, message: str) -> bytes:
    error = openai_error(message, "server_error", "stream_lost")
    return b"data: " + compact_json(error) + b"\n\n"


#: ``/v1`` streams carry no ``retry:`` and no ``id:`` line.
FRAMING = Framing(b"", _lost)


def _headers(stage_id: str) -> dict[str, str]:
    return {"X-Stage-Id": stage_id}


def _answer(body: dict[str, Any], status: int, stage_id: str) -> Response:
    return context.json_answer(body, status, _headers(stage_id))


# -- Chat Completions -----------------------------------------------------------------------


@bp.post("/chat/completions")
def chat_completions() -> Response:
    body = validated(ChatCompletionRequest, json_object(request.get_data(cache=False)))
    stage_id = f"chatcmpl-{uuid.uuid4().hex}"
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    model = body.model
    started = context.start(
        StageRequest(
            stage_id,
            body.conversation(),
            resumable=False,
            dialect=lambda sid: ChatCompletionsDialect(sid, model, include_usage=include_usage),
        )
    )
    return context.serve(started, FRAMING, stream=body.stream, headers=_headers(stage_id))


@bp.get("/models")
def models() -> Response:
    """The models of the upstreams the caller may use: each upstream's ``models``, or,
    where it lists none (it takes any model name), the upstream's own name. A request
    with ``anthropic-version`` (Anthropic's clients send it) gets Anthropic's listing."""
    if MESSAGES_VERSION in request.headers:
        return anthropic_models()
    registry = context.manager().upstreams
    seen: dict[str, str] = {}
    for name in registry.usable(context.principal().upstreams):
        for model in registry.config(name).models or (name,):
            seen.setdefault(model, name)
    data = [
        {"id": model, "object": "model", "created": 0, "owned_by": upstream}
        for model, upstream in seen.items()
    ]
    return jsonify({"object": "list", "data": data})


# -- Responses ------------------------------------------------------------------------------


@bp.post("/responses")
def create_response() -> Response:
    raw = json_object(request.get_data(cache=False))
    body = validated(ResponseRequest, raw)
    manager = context.manager()
    principal = context.principal()
    before = _previous_conversation(body.previous_response_id)
    stage_id = f"resp_{uuid.uuid4().hex}"
    key = request.headers.get("Idempotency-Key")
    if key:
        earlier = manager.idempotent(principal, key, stage_id, digest(raw))
        if earlier is not None:
            return _again(earlier, body)
    echo = body.model_dump(exclude_none=True, by_alias=True)
    replayable = body.background and body.stream
    model = body.model
    # An upstream's error about one of the earlier response's messages is about that id.
    params = ["previous_response_id"] * len(before) + body.message_params()
    try:
        started = context.start(
            StageRequest(
                stage_id,
                body.conversation(before),
                resumable=False,
                detached=body.background,
                dialect=lambda sid: ResponsesDialect(
                    sid, model, echo, replayable=replayable, message_params=params
                ),
                keep_seconds=KEEP_RESPONSE_SECONDS,
                keep_events_seconds=KEEP_EVENTS_SECONDS if replayable else 0.0,
            )
        )
    except BaseException:
        if key:  # refused: a retry may try again
            manager.release_idempotency(principal, key, stage_id)
        raise
    return _serve(started, body)


def _serve(started: StartedStage, body: ResponseRequest) -> Response:
    stage_id = started.stage_id
    if body.background and not body.stream:
        return _answer(_as_it_stands(started), 200, stage_id)
    headers = _headers(stage_id)
    return context.serve(started, FRAMING, stream=body.stream, headers=headers, answer=_final)


def _final(response: dict[str, Any], status: int, headers: dict[str, str] | None) -> Response:
    """A Response that ended so, as a create that waited for it answers it: a 400 where
    the upstream refused its request as malformed, as OpenAI answers."""
    refused = refused_request(response)
    if refused is not None:
        return context.json_answer(refused, 400, headers)
    return context.json_answer(response, status, headers)


def _again(stage_id: str, body: ResponseRequest) -> Response:
    """A create retried with the Idempotency-Key of one that made ``stage_id``: that
    response, in the mode this request asks for."""
    found = _response(stage_id)
    if body.stream:
        feed = found.feed(-1)
        events = context.follow_here(feed, -1, FRAMING) if feed is not None else iter(())
        return event_stream(events, _headers(stage_id))
    if not body.background:
        found.wait(context.manager().settings.background_max_seconds)
    return _answer(_as_it_stands(found), 200, stage_id)


def _previous_conversation(response_id: str | None) -> list[dict[str, Any]]:
    """The conversation of ``previous_response_id`` (the caller's, still kept), with its
    answer: the messages a continued conversation starts with."""
    if response_id is None:
        return []
    try:
        found = _response(response_id)
        record, answer = found.record(), found.answer()
    except UnknownStage:
        raise InvalidRequest(
            f"previous_response_id: no response {response_id!r} (unknown, or expired)",
            field="previous_response_id",
        ) from None
    if answer is None or record.conversation is None:
        raise InvalidRequest(
            f"previous_response_id: response {response_id!r} has not finished",
            field="previous_response_id",
        )
    messages = [dict(m) for m in record.conversation.messages]
    for item in answer[0].get("output", ()):
        if item.get("type") == "message":
            text = "".join(part.get("text", "") for part in item.get("content", ()))
            messages.append({"role": "assistant", "content": text})
        elif item.get("type") == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    return messages


def _response(response_id: str) -> StageHandle:
    """The caller's response with this id; UnknownStage (404) for any other id, another
    principal's included, and for a stage that is not a response."""
    if not _RESPONSE_ID.fullmatch(response_id):
        raise UnknownStage(response_id)
    found = context.manager().find(response_id, context.principal())
    if found.record().dialect_name != ResponsesDialect.name:
        raise UnknownStage(response_id)  # a /chat stage that a caller named so
    return found


def _as_it_stands(found: StageHandle) -> dict[str, Any]:
    """The Response: its final one once it has ended, else as far as it has come."""
    answer = found.answer()
    if answer is not None:
        return answer[0]
    dialect = found.live_dialect()
    if dialect is not None:  # it runs here: its Response so far, items and all
        assert isinstance(dialect, ResponsesDialect)  # _response() found a response
        return dialect.response("in_progress")
    stored = context.manager().dialects.of(found.record().dialect)
    assert isinstance(stored, ResponsesDialect)
    return stored.in_progress(str(found.summary().get("text") or ""))


@bp.get("/responses/<response_id>")
def retrieve_response(response_id: str) -> Response:
    stream = request.args.get("stream", "false")
    if stream not in ("true", "false"):
        raise InvalidRequest("stream: must be true or false", field="stream")
    found = _response(response_id)
    if stream == "false":
        return _answer(_as_it_stands(found), 200, response_id)
    record = found.record().dialect
    if not record.get("replayable"):
        raise InvalidRequest(
            "stream: only a response created with background and stream can be streamed again",
            field="stream",
        )
    after = _starting_after()
    expired = InvalidRequest(
        f"starting_after: the events of response {response_id!r} after {after} are no longer kept",
        field="starting_after",
    )
    try:
        feed = found.feed(after)
    except EventsExpired:
        raise expired from None
    if feed is not None and after + 1 < found.first_kept():
        raise expired  # never a silent gap
    events = context.follow_here(feed, after, FRAMING) if feed is not None else iter(())
    return event_stream(events, _headers(response_id))


def _starting_after() -> int:
    raw = request.args.get("starting_after")
    if raw is None:
        return -1
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise InvalidRequest(
            "starting_after: must be a sequence number, 0 or more", field="starting_after"
        )
    return int(raw)


@bp.post("/responses/<response_id>/cancel")
def cancel_response(response_id: str) -> Response:
    found = _response(response_id)
    _stop(found)
    return _answer(_as_it_stands(found), 200, response_id)


@bp.delete("/responses/<response_id>")
def delete_response(response_id: str) -> Response:
    found = _response(response_id)
    _stop(found)
    context.manager().forget(response_id, context.principal())
    return _answer({"id": response_id, "object": "response", "deleted": True}, 200, response_id)


def _stop(found: StageHandle) -> None:
    """Cancel the response wherever it runs, and wait a little for its end: idempotent."""
    try:
        found.cancel("cancelled by request")
    except StageFinished:
        return
    found.wait(CANCEL_WAIT_SECONDS)
