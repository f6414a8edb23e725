"""Anthropic's Messages API on stageserver's stages: ``POST /v1/messages`` and ``POST
/v1/messages/count_tokens`` (``anthropic_api/`` holds the request models and the dialect),
and ``GET /v1/models`` in Anthropic's shape for a request with ``anthropic-version``
(``anthropic_models``, which ``v1.py``'s view hands such a request to).

Each message is a stage, with an id stageserver makes (``msg_…``), sent in
``X-Stage-Id``: a Stop button elsewhere can ``POST /stages/<id>/cancel`` on any host,
``GET /stages/<id>`` reads it, and ``GET /stages/<id>/events`` with ``Last-Event-ID``
resumes its stream, each event once (stageserver's extension: the Messages API has no
resume). A message is not resumable unless ``X-Stage-Resumable: true`` asks (or
``STAGESERVER_RESUMABLE_DEFAULT`` says so): its client's leaving stops it, as a client
that stops a stream expects. Keys (``x-api-key`` or ``Authorization: Bearer``), ownership,
limits, usage, metrics, traces and logs apply as on ``/chat``. Every error has the
Messages API's body, ``{"type": "error", "error": {"type", "message"}}``, with its
statuses (``anthropic_api/errors.py``); every answer carries ``request-id``, as
Anthropic's do, beside ``X-Request-ID``.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from flask import Blueprint, Response, jsonify, request

from ..anthropic_api import betas
from ..anthropic_api.errors import error_body, status_of
from ..anthropic_api.messages import PING, MessagesDialect, lost
from ..anthropic_api.models import limit_of, model_page
from ..anthropic_api.requests import CountTokensRequest, MessagesRequest, validated
from ..errors import InvalidRequest, StageServerError
from ..stages.spec import StageRequest
from ..stages.usage import estimate_prompt_tokens
from ..stream import Framing
from ..upstream.tokenize import count_prompt_tokens
from . import context
from .bodies import json_object
from .errors import Shape, answer_in_json

bp = Blueprint("stageserver_messages", __name__)
bp.before_request(context.prepare)


def _status(exc: StageServerError) -> int:
    return status_of(exc.openai_status)


def anthropic_json_error(
    status: int, message: str, *, field: str | None = None, **_: Any
) -> Response:
    """The Messages API's body: a bad field's path starts the message, as in
    Anthropic's (``messages.0.content: ...``)."""
    status = status_of(status)
    if field and field != "body" and status == 400 and not message.startswith(f"{field}:"):
        message = f"{field}: {message}"
    response = jsonify(error_body(status, message))
    response.status_code = status
    return response


#: The Messages API's error bodies, and its statuses (``anthropic_api/errors.py``).
ANTHROPIC = Shape(anthropic_json_error, codes=False, status=_status)
answer_in_json(bp, ANTHROPIC)

#: A Messages stream: no ``retry:`` line first, ``ping`` as its heartbeat, and an
#: ``error`` event for a response that cannot follow its stage further.
FRAMING = Framing(b"", lost, PING)
RESUMABLE_HEADER = "X-Stage-Resumable"
#: The header every Anthropic client sends: taken, whatever it says (``betas.py``).
MESSAGES_VERSION = "anthropic-version"


@bp.before_request
def _take_headers() -> None:
    """``anthropic-version`` is taken as it is; ``anthropic-beta``'s unknown names are
    logged once (``anthropic_api/betas.py``)."""
    betas.take(request.headers.getlist("anthropic-beta"))


@bp.after_request
def _finish(response: Response) -> Response:
    response.headers["request-id"] = context.request_id()
    return context.finish(response)


def _headers(stage_id: str) -> dict[str, str]:
    return {"X-Stage-Id": stage_id}


def _resumable() -> bool | None:
    raw = request.headers.get(RESUMABLE_HEADER)
    if raw is None:
        return None  # STAGESERVER_RESUMABLE_DEFAULT
    if raw.lower() not in ("true", "false"):
        raise InvalidRequest(f"{RESUMABLE_HEADER}: must be true or false", field=RESUMABLE_HEADER)
    return raw.lower() == "true"


@bp.post("/messages")
def create_message() -> Response:
    body = validated(MessagesRequest, json_object(request.get_data(cache=False)))
    resumable = _resumable()
    stage_id = f"msg_{uuid.uuid4().hex}"
    conversation = body.conversation()
    model, stops = body.model, body.stop_sequences or ()
    params, omit = body.params(), body.omits_thinking()
    input_tokens = estimate_prompt_tokens(conversation.messages)
    started = context.start(
        StageRequest(
            stage_id,
            conversation,
            resumable=resumable,
            dialect=lambda sid: MessagesDialect(
                sid,
                model,
                input_tokens=input_tokens,
                stop_sequences=stops,
                params=params,
                omit_thinking=omit,
            ),
        )
    )
    return context.serve(started, FRAMING, stream=body.stream, headers=_headers(stage_id))


@bp.post("/messages/count_tokens")
def count_tokens() -> Response:
    """The prompt's tokens, as the upstream the model picks counts them where it can
    (``upstream/tokenize.py``); else the estimate usage makes (``stages/usage.py``: the
    characters over 4, and 4 a message), the tools counted as one more message of their
    JSON, and ``"estimated": true``."""
    body = validated(CountTokensRequest, json_object(request.get_data(cache=False)))
    manager = context.manager()
    upstream = manager.upstreams.resolve(None, None, context.principal().upstreams, body.model)
    conversation = body.counted()
    counted = count_prompt_tokens(upstream, conversation, manager.settings.ready_timeout)
    if counted is not None:
        return jsonify({"input_tokens": counted})
    messages = list(conversation.messages)
    tools = conversation.passed.get("tools")
    if tools:
        text = json.dumps(tools, separators=(",", ":"), ensure_ascii=False)
        messages.append({"role": "system", "content": text})
    return jsonify({"input_tokens": estimate_prompt_tokens(messages), "estimated": True})


def anthropic_models() -> Response:
    """``GET /v1/models`` in Anthropic's shape (``anthropic_api/models.py``): the models
    of the upstreams the caller may use, as ``v1.py`` lists them for OpenAI's clients."""
    registry = context.manager().upstreams
    seen: dict[str, None] = {}
    for name in registry.usable(context.principal().upstreams):
        for model in registry.config(name).models or (name,):
            seen.setdefault(model, None)
    args = request.args
    page = model_page(
        list(seen),
        limit=limit_of(args.get("limit")),
        after_id=args.get("after_id"),
        before_id=args.get("before_id"),
    )
    return jsonify(page)
