"""The one mapping from errors to HTTP: a status, a JSON body, and the headers they need.

Every refusal and failure from ``errors.py`` leaves as ``{"error": ...}`` with the
``field`` it is about and any further fields it carries, ``Retry-After`` where a retry
can succeed, and its own headers (``WWW-Authenticate`` for a 401). Werkzeug's HTTP
errors (404, 405, 413) and anything unexpected (500, with the traceback in the log, never
in the answer) are answered in JSON too.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from ..errors import StageServerError
from ..manager import manager_of
from ..schemas import ErrorBody

log = logging.getLogger("stageserver.http")


def json_error(status: int, message: str, **extra: Any) -> Response:
    # Built from the model the OpenAPI document shows: a field it does not know fails here.
    response = jsonify(ErrorBody(error=message, **extra).body())
    response.status_code = status
    return response


def error_response(exc: StageServerError) -> Response:
    extra = dict(exc.body)
    if exc.field is not None:
        extra["field"] = exc.field
    response = json_error(exc.http_status, str(exc), **extra)
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(exc.retry_after)
    response.headers.update(exc.headers)
    return response


def http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    if status == 413:
        limit = manager_of(current_app.extensions).settings.max_body_bytes
        return json_error(413, f"request body is larger than {limit} bytes", field="body")
    response = json_error(status, exc.description or exc.name)
    # Its own headers, such as a 405's Allow (RFC 9110 requires it), the body being ours.
    response.headers.update((k, v) for k, v in exc.get_headers() if k.lower() != "content-type")
    return response


def unexpected(exc: Exception) -> Response:
    log.exception("unhandled error in %s %s", request.method, request.path)
    return json_error(500, "internal error in stageserver; see the server log")


def answer_in_json(bp: Blueprint) -> None:
    """Have ``bp``'s errors answered by this mapping."""
    bp.register_error_handler(StageServerError, error_response)
    bp.register_error_handler(HTTPException, http_error)
    bp.register_error_handler(Exception, unexpected)


# -- /v1: OpenAI's error bodies -----------------------------------------------------------

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def openai_error_response(
    status: int, message: str, param: str | None, code: str | None
) -> Response:
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    response = jsonify({"error": {"message": message, "type": kind, "param": param, "code": code}})
    response.status_code = status
    return response


def openai_refusal(exc: StageServerError) -> Response:
    """A refusal or failure on ``/v1``: its status (a validation error is 400, as OpenAI
    answers one), its ``param``, its ``code``, and the headers it needs."""
    param = exc.field
    fields = exc.body.get("fields")
    if param is None and isinstance(fields, list) and fields:
        param = str(fields[0].get("field"))
    status = 400 if exc.http_status == 422 else exc.http_status
    response = openai_error_response(status, str(exc), param, exc.code)
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(exc.retry_after)
    response.headers.update(exc.headers)
    return response


def openai_http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    if status == 413:
        limit = manager_of(current_app.extensions).settings.max_body_bytes
        message = f"request body is larger than {limit} bytes"
        return openai_error_response(413, message, "body", "request_too_large")
    response = openai_error_response(status, exc.description or exc.name, None, None)
    response.headers.update((k, v) for k, v in exc.get_headers() if k.lower() != "content-type")
    return response


def openai_unexpected(exc: Exception) -> Response:
    log.exception("unhandled error in %s %s", request.method, request.path)
    return openai_error_response(
        500, "internal error in stageserver; see the server log", None, "internal_error"
    )


def answer_in_openai_json(bp: Blueprint) -> None:
    """Have ``bp``'s errors answered in OpenAI's shape."""
    bp.register_error_handler(StageServerError, openai_refusal)
    bp.register_error_handler(HTTPException, openai_http_error)
    bp.register_error_handler(Exception, openai_unexpected)
