"""The one mapping from errors to HTTP: a status, a JSON body, and the headers they need.

Every refusal and failure from ``errors.py`` leaves with its status, ``Retry-After``
where a retry can succeed, and its own headers (``WWW-Authenticate`` for a 401).
Werkzeug's HTTP errors (404, 405, 413) and anything unexpected (500, with the traceback
in the log, never in the answer) are answered in JSON too. The body has one of two
shapes, each blueprint's own (``answer_in_json``):

- the seed's (``SEED``): ``{"error": message}``, with the ``field`` it is about and any
  further fields the error carries (``schemas.ErrorBody``);
- OpenAI's (``OPENAI``, on ``/v1``): ``{"error": {"message", "type", "param", "code"}}``,
  with the error's ``openai_status``: a validation error is 400 there, not 422, as
  OpenAI answers one; a 422 that means something else (``IdempotencyKeyReused``) stays;
- Anthropic's (``messages.ANTHROPIC``, on ``/v1/messages``, and on ``/v1/models`` for a
  request with ``anthropic-version``: ``by_header``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from operator import attrgetter
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from ..errors import StageServerError
from ..manager import manager_of
from ..schemas import ErrorBody

log = logging.getLogger("stageserver.http")


def json_error(status: int, message: str, **extra: Any) -> Response:
    """The seed's body. Built from the model the OpenAPI document shows: a field it does
    not know fails here."""
    response = jsonify(ErrorBody(error=message, **extra).body())
    response.status_code = status
    return response


_OPENAI_TYPES = {429: "rate_limit_error"}


def openai_json_error(
    status: int, message: str, *, field: str | None = None, code: str | None = None, **_: Any
) -> Response:
    """OpenAI's body: ``param`` is the field, and the type follows from the status."""
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"message": message, "type": kind, "param": field, "code": code}
    response = jsonify({"error": body})
    response.status_code = status
    return response


@dataclass(frozen=True)
class Shape:
    """How a blueprint's error bodies look: ``body(status, message, **fields)``, whether
    they carry a ``code`` (the error's, ``StageServerError.code``), and which of an
    error's statuses they answer with (``status(error)``)."""

    body: Callable[..., Response]
    codes: bool
    status: Callable[[StageServerError], int]


SEED = Shape(json_error, codes=False, status=attrgetter("http_status"))
OPENAI = Shape(openai_json_error, codes=True, status=attrgetter("openai_status"))


def by_header(header: str, present: Shape, absent: Shape) -> Shape:
    """``present``'s shape for a request that carries ``header``, else ``absent``'s: a
    path that two APIs share (``GET /v1/models``, which Anthropic's clients ask with
    ``anthropic-version``). Both get the error's ``code`` when either takes one."""

    def pick() -> Shape:
        return present if header in request.headers else absent

    return Shape(
        lambda status, message, **fields: pick().body(status, message, **fields),
        codes=present.codes or absent.codes,
        status=lambda exc: pick().status(exc),
    )


def error_response(exc: StageServerError, shape: Shape = SEED) -> Response:
    extra = dict(exc.body)
    field = exc.field
    fields = extra.get("fields")
    if field is not None:
        extra["field"] = field
    elif shape.codes and isinstance(fields, list) and fields:
        extra["field"] = str(fields[0].get("field"))  # OpenAI names one param
    if shape.codes:
        extra["code"] = exc.code
    response = shape.body(shape.status(exc), str(exc), **extra)
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(exc.retry_after)
    response.headers.update(exc.headers)
    return response


def http_error(exc: HTTPException, shape: Shape = SEED) -> Response:
    status = exc.code or 500
    if status == 413:
        limit = manager_of(current_app.extensions).settings.max_body_bytes
        message = f"request body is larger than {limit} bytes"
        if not shape.codes:  # the seed's words, which deploy/nginx.conf answers too
            return shape.body(413, message, field="body")
        # On /v1 it is mostly an image sent inline.
        message += (
            " (STAGESERVER_MAX_BODY_BYTES); an image sent inline as a data: URI counts "
            "toward it: send it by URL, or raise the limit"
        )
        return shape.body(413, message, field="body", code="request_too_large")
    response = shape.body(status, exc.description or exc.name)
    # Its own headers, such as a 405's Allow (RFC 9110 requires it), the body being ours.
    response.headers.update((k, v) for k, v in exc.get_headers() if k.lower() != "content-type")
    return response


def unexpected(exc: Exception, shape: Shape = SEED) -> Response:
    log.exception("unhandled error in %s %s", request.method, request.path)
    internal = {"code": "internal_error"} if shape.codes else {}
    return shape.body(500, "internal error in stageserver; see the server log", **internal)


def answer_in_json(bp: Blueprint, shape: Shape = SEED) -> None:
    """Have ``bp``'s errors answered by this mapping, in ``shape``."""
    bp.register_error_handler(StageServerError, partial(error_response, shape=shape))
    bp.register_error_handler(HTTPException, partial(http_error, shape=shape))
    bp.register_error_handler(Exception, partial(unexpected, shape=shape))
