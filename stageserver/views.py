"""HTTP: validate the request, start or find the stage, answer as SSE or JSON.

Validation happens here, in the view; the stage and the response generator get plain
values, never the request.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from . import metrics
from .redis_store import StoreUnavailable
from .schemas import ChatRequest, TextStageOutput, field_errors
from .stages import Stage, StageConflict, StageSpec
from .stream import ClientGone, follow_remote_stage, follow_stage

log = logging.getLogger("stageserver.http")

bp = Blueprint("stageserver", __name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _server() -> Any:
    return current_app.extensions["stageserver"]


def _cfg(key: str) -> Any:
    return current_app.config[f"STAGESERVER_{key}"]


def error_response(status: int, message: str, **extra: Any) -> Response:
    response = jsonify({"error": message, **extra})
    response.status_code = status
    return response


@bp.before_request
def _limit_body() -> None:
    request.max_content_length = int(_cfg("MAX_BODY_BYTES"))
    request.environ.setdefault("stageserver.request_id", _request_id())


def _request_id() -> str:
    given = request.headers.get("X-Request-ID", "")
    if given and len(given) <= 128 and given.isprintable():
        return given
    return uuid.uuid4().hex


@bp.after_request
def _echo_request_id(response: Response) -> Response:
    request_id = request.environ.get("stageserver.request_id")
    if request_id:
        response.headers["X-Request-ID"] = request_id
    return response


@bp.errorhandler(HTTPException)
def http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    if status == 413:
        limit = current_app.config["STAGESERVER_MAX_BODY_BYTES"]
        return error_response(413, f"request body is larger than {limit} bytes", field="body")
    return error_response(status, exc.description or exc.name)


@bp.errorhandler(Exception)
def _unexpected(exc: Exception) -> Response:
    log.exception("unhandled error in %s %s", request.method, request.path)
    return error_response(500, "internal error in stageserver; see the server log")


@bp.post("/chat")
def chat() -> Response:
    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        return error_response(400, "request body must be a JSON object", field="body")
    try:
        chat_request = ChatRequest.model_validate(
            body,
            context={
                "max_tokens_limit": _cfg("MAX_TOKENS_LIMIT"),
                "max_prompt_chars": _cfg("MAX_PROMPT_CHARS"),
            },
        )
    except ValidationError as exc:
        errors = field_errors(exc)
        summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return error_response(422, f"invalid request: {summary}", fields=errors)

    server = _server()
    upstream, problem = server.resolve_upstream(chat_request.upstream, chat_request.base_url)
    if upstream is None:
        return error_response(400, problem["message"], field=problem["field"])

    messages = [{"role": "user", "content": chat_request.user_prompt}]
    if chat_request.system_prompt:
        messages.insert(0, {"role": "system", "content": chat_request.system_prompt})
    max_tokens = chat_request.max_tokens or int(_cfg("DEFAULT_MAX_TOKENS"))
    resumable = chat_request.resumable
    stage = Stage(
        StageSpec(
            stage_id=chat_request.stage_id,
            upstream=upstream,
            body=upstream.chat_body(
                model=chat_request.model_name,
                messages=messages,
                max_tokens=max_tokens,
                temperature=chat_request.temperature,
            ),
            resumable=bool(_cfg("RESUMABLE_DEFAULT") if resumable is None else resumable),
            request_id=request.environ["stageserver.request_id"],
            grace_seconds=float(_cfg("RESUME_GRACE_SECONDS")),
            max_events=int(_cfg("EVENT_LOG_MAX_EVENTS")),
        )
    )
    # Over the limit, or shutting down: 503 before any upstream call.
    refusal: Response | None = server.admission.admit(stage)
    if refusal is not None:
        return refusal
    try:
        server.register(stage)
    except StoreUnavailable as exc:
        server.admission.release(stage)
        return _store_down(exc)
    except StageConflict:
        server.admission.release(stage)
        return error_response(
            409,
            f"stage {stage.stage_id!r} is still running; wait for it, cancel it, or use "
            "another stage_id",
            field="stage_id",
        )
    metrics.stage_started(stage)
    stage.start()

    events = follow_stage(
        stage,
        after_seq=-1,
        heartbeat_seconds=float(_cfg("HEARTBEAT_SECONDS")),
        client_socket=request.environ.get("gunicorn.socket"),
        owner=True,
    )
    if chat_request.stream:
        return Response(events, mimetype="text/event-stream", headers=SSE_HEADERS)
    return _final_output(stage, events)


def _final_output(stage: Stage, events: Any) -> Response:
    """Wait for the stage, still noticing a client that leaves, and answer the seed's way."""
    try:
        for _ in events:
            pass
    except ClientGone:
        return Response(status=499)  # nobody reads this; the stage has been cancelled
    if stage.status == "done":
        output = TextStageOutput(
            stage_id=f"{stage.stage_id}-chat-final", type="text", text=stage.text
        )
        status = 200
    else:
        reason = stage.error if stage.status == "error" else f"cancelled: {stage.cancel_reason}"
        output = TextStageOutput(
            stage_id=f"{stage.stage_id}-chat-error", type="error", error=reason
        )
        status = stage.http_status if stage.status == "error" else 409
    response = jsonify(output.model_dump())
    response.status_code = status
    return response


def _unknown_stage(stage_id: str) -> Response:
    return error_response(404, f"no stage {stage_id!r} (unknown, or expired)", field="stage_id")


def _events_expired(stage_id: str) -> Response:
    return error_response(
        410,
        f"the events of stage {stage_id!r} have expired; its status is at /stages/{stage_id}",
        field="stage_id",
    )


def _store_down(exc: StoreUnavailable) -> Response:
    response = error_response(503, str(exc))
    response.headers["Retry-After"] = "1"
    return response


@bp.get("/stages/<stage_id>")
def stage_status(stage_id: str) -> Response:
    server = _server()
    stage = server.stages.get(stage_id)
    if stage is not None:
        return jsonify(stage.summary())
    if server.store is not None:
        try:
            summary = server.store.summary(stage_id)
        except StoreUnavailable as exc:
            return _store_down(exc)
        if summary is not None:
            return jsonify(summary)
    return _unknown_stage(stage_id)


@bp.get("/stages/<stage_id>/events")
def stage_events(stage_id: str) -> Response:
    last_event_id = request.headers.get("Last-Event-ID") or request.args.get("last_event_id")
    after_seq: int | None = -1
    if last_event_id:
        after_seq = _seq_of(last_event_id, stage_id)
        if after_seq is None:
            return error_response(
                400,
                f"Last-Event-ID {last_event_id!r} is not an event id of stage {stage_id!r}",
                field="Last-Event-ID",
            )
    server = _server()
    start = after_seq if after_seq is not None else -1
    heartbeat = float(_cfg("HEARTBEAT_SECONDS"))
    client_socket = request.environ.get("gunicorn.socket")
    stage = server.stages.get(stage_id)
    if stage is not None:
        if stage.events_expired:
            return _events_expired(stage_id)
        events = follow_stage(
            stage,
            after_seq=start,
            heartbeat_seconds=heartbeat,
            client_socket=client_socket,
            owner=False,
        )
    elif server.store is not None:
        try:
            state = server.store.events_state(stage_id)
        except StoreUnavailable as exc:
            return _store_down(exc)
        if state == "unknown":
            return _unknown_stage(stage_id)
        if state == "expired":
            return _events_expired(stage_id)
        events = follow_remote_stage(
            server.store,
            stage_id,
            after_seq=start,
            heartbeat_seconds=heartbeat,
            client_socket=client_socket,
        )
    else:
        return _unknown_stage(stage_id)
    return Response(events, mimetype="text/event-stream", headers=SSE_HEADERS)


def _seq_of(event_id: str, stage_id: str) -> int | None:
    """Event ids are ``<stage_id>-<event>-<seq>``."""
    prefix, _, seq = event_id.rpartition("-")
    if not seq.isdigit() or not prefix.startswith(f"{stage_id}-"):
        return None
    return int(seq)


@bp.post("/stages/<stage_id>/cancel")
def cancel_stage(stage_id: str) -> Response:
    server = _server()
    reason = "cancelled by request"
    stage = server.stages.get(stage_id)
    if stage is not None:
        outcome = "cancelling" if stage.cancel(reason) else "finished"
    elif server.store is not None:
        try:
            outcome = server.store.request_cancel(stage_id, reason)
        except StoreUnavailable as exc:
            return _store_down(exc)
    else:
        outcome = "unknown"
    if outcome == "unknown":
        return _unknown_stage(stage_id)
    if outcome == "finished":
        return error_response(409, f"stage {stage_id!r} has already finished")
    response = jsonify({"stage_id": stage_id, "status": "cancelling"})
    response.status_code = 202
    return response
