"""What the client raises, and which error each HTTP status becomes.

The tree is drawn in ``stageserver.client``'s docstring. A stage that fails is not among
these: that is the stage's outcome (an ``ErrorEvent``, or a ``TextStageOutput`` of type
``error``), not a refusal of the request.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from ..retry_after import retry_after_seconds


class StageClientError(Exception):
    """Anything the client raises."""


class StageConnectionError(StageClientError):
    """The server could not be reached, or did not answer."""


class StreamLost(StageClientError):
    """A stream dropped before its end and cannot be resumed."""


class StageHTTPError(StageClientError):
    """An error status: ``status``, ``message``, the JSON ``body`` (or None) and
    ``retry_after`` (seconds, from the ``Retry-After`` header, or None)."""

    def __init__(
        self, status: int, message: str, body: Any = None, retry_after: float | None = None
    ) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.body = body
        self.retry_after = retry_after


class InvalidRequest(StageHTTPError):
    """400, 413, 422: the request was refused; ``fields`` names each bad field."""

    @property
    def fields(self) -> list[dict[str, str]]:
        """``[{"field", "message"}]``, one per bad field (a 413 names ``body``)."""
        body = self.body if isinstance(self.body, dict) else {}
        listed = body.get("fields")
        if isinstance(listed, list):
            return [f for f in listed if isinstance(f, dict)]
        if isinstance(body.get("field"), str):
            return [{"field": body["field"], "message": self.message}]
        return []


class Unauthorized(StageHTTPError):
    """401: no API key, or a wrong one."""


class NotFound(StageHTTPError):
    """404: no such stage (unknown, expired, or another principal's)."""


class Conflict(StageHTTPError):
    """409: the stage is still running, or already finished."""


class Gone(StageHTTPError):
    """410: the stage's events expired (its status has not)."""


class RateLimited(StageHTTPError):
    """429: a limit of the caller's principal; come back after ``retry_after``
    seconds."""


class Unavailable(StageHTTPError):
    """503: the server is overloaded, shutting down or without its store; come back
    after ``retry_after`` seconds."""


_BY_STATUS: dict[int, type[StageHTTPError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    410: Gone,
    413: InvalidRequest,
    422: InvalidRequest,
    429: RateLimited,
    503: Unavailable,
}


def http_error(response: httpx.Response) -> StageHTTPError:
    """The exception for an error answer whose body has been read."""
    body = json_or_none(response.content)
    message = body.get("error") if isinstance(body, dict) else None
    if not isinstance(message, str):
        message = response.text.strip()[:500] or response.reason_phrase
    error_class = _BY_STATUS.get(response.status_code, StageHTTPError)
    retry_after = retry_after_seconds(response.headers.get("Retry-After"))
    return error_class(response.status_code, message, body, retry_after)


def json_or_none(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return None
