"""Browsers on other origins (``STAGESERVER_CORS_ORIGINS``, a JSON list of origins).

Unset, no CORS header is ever sent, and browsers keep pages of other origins out. For an
origin on the list, every answer of the stage API (and the browser client,
``/static/stageserver.js``, which such a page imports) carries ``Access-Control-Allow-Origin``
with that origin (and ``Vary: Origin``), exposes ``X-Request-ID`` and ``Retry-After``,
and ``X-Stage-Id``, and a preflight (``OPTIONS``) allows ``Authorization``,
``Content-Type``, ``Last-Event-ID`` and ``X-Request-ID`` on ``GET``, ``POST`` and
``DELETE``, and the headers OpenAI's and Anthropic's SDKs send (``x-stainless-*``,
``OpenAI-*``, ``Idempotency-Key``, ``x-api-key``, ``anthropic-*``, and stageserver's
``X-Stage-Resumable``) when the preflight asks for them; answers expose ``request-id``
too. An origin not on the list gets no CORS header at all. Credentials (cookies) are
not allowed across origins: a browser client sends its API key in ``Authorization``.
"""

from __future__ import annotations

from collections.abc import Collection

from flask import Request, Response

ALLOWED_HEADERS = "Authorization, Content-Type, Last-Event-ID, X-Request-ID"
#: What else a preflight may ask for: the headers of OpenAI's and Anthropic's SDKs, and
#: the one that makes a message resumable (``web/messages.py``).
SDK_HEADERS = frozenset(
    {"idempotency-key", "openai-organization", "openai-project", "x-api-key", "x-stage-resumable"}
)
SDK_HEADER_PREFIXES = ("x-stainless-", "openai-", "anthropic-")
#: ``request-id`` is the Messages API's, which Anthropic's SDK shows with an error.
EXPOSED_HEADERS = "X-Request-ID, Retry-After, X-Stage-Id, request-id"
PREFLIGHT_MAX_AGE = "600"


def apply(request: Request, response: Response, origins: Collection[str]) -> Response:
    """Add the CORS headers ``request``'s origin is due, if any, to ``response``."""
    if not origins:
        return response
    response.vary.add("Origin")
    origin = request.headers.get("Origin")
    if origin is None or origin not in origins:
        return response
    headers = response.headers
    headers["Access-Control-Allow-Origin"] = origin
    headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
    if request.method == "OPTIONS":
        headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
        headers["Access-Control-Allow-Headers"] = _allowed(request)
        headers["Access-Control-Max-Age"] = PREFLIGHT_MAX_AGE
    return response


def _allowed(request: Request) -> str:
    """The headers a preflight may send: the API's, and those of the SDKs it asks for."""
    asked = request.headers.get("Access-Control-Request-Headers", "")
    sdk = [
        name.strip()
        for name in asked.split(",")
        if name.strip().lower() in SDK_HEADERS
        or name.strip().lower().startswith(SDK_HEADER_PREFIXES)
    ]
    return ", ".join([ALLOWED_HEADERS, *sdk])
