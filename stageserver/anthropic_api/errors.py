"""Errors as the Messages API gives them: ``{"type": "error", "error": {"type",
"message"}}``, with Anthropic's statuses and types.

- 400 ``invalid_request_error``: a field is wrong or not taken (stageserver's 422s too),
  or the upstream refused the request itself;
- 401 ``authentication_error``: no key, a malformed one, an unknown one;
- 403 ``permission_error``, 404 ``not_found_error``;
- 413 ``request_too_large``: the body is over ``STAGESERVER_MAX_BODY_BYTES``;
- 429 ``rate_limit_error``: a principal's limit, with ``Retry-After``;
- 499 ``invalid_request_error``: not streamed, the message was cancelled through the API
  (``POST /stages/<id>/cancel``); the SDKs do not retry it, as they would a 409;
- 500 and 502 ``api_error``: stageserver's own fault, or the upstream's;
- 504 ``timeout_error``: the upstream timed out;
- 529 ``overloaded_error``: stageserver's 503s (this worker runs its limit of stages, it
  is shutting down, the shared store is down), with ``Retry-After``; and an upstream
  that answered 429, or had no replica free.

Any other status of 400 and above is ``invalid_request_error``, of 500 and above
``api_error``. A stream that has started carries the same body as an ``error`` event.
"""

from __future__ import annotations

from typing import Any

#: Anthropic's error type for each status it answers with.
TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}
#: A cancelled message's status, not streamed: "the request was closed", which the SDKs
#: do not retry (they retry a 409).
CANCELLED = 499
OVERLOADED = 529


def status_of(status: int) -> int:
    """The status the Messages API answers for one of stageserver's: a 503 is Anthropic's
    529 (overloaded: retry, after ``Retry-After``); a 422 (a field that breaks its rule)
    is a 400."""
    if status == 503:
        return OVERLOADED
    if status == 422:
        return 400
    return status


def error_type(status: int) -> str:
    """Anthropic's type of an error answered with ``status``."""
    known = TYPES.get(status)
    if known is not None:
        return known
    return "api_error" if status >= 500 else "invalid_request_error"


def error_body(status: int, message: str) -> dict[str, Any]:
    """The body of an error answered with ``status`` (``status_of``'s)."""
    return {"type": "error", "error": {"type": error_type(status), "message": message}}
