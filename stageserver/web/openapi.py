"""The OpenAPI 3.1 document of an app's stageserver: ``GET /openapi.json``, shown at ``/docs``.

One source: every schema in it is generated from the pydantic models of ``schemas.py``
(and, for ``/v1``, of ``openai_api/requests.py`` and ``anthropic_api/requests.py``:
``openapi_v1.py``, ``openapi_messages.py``),
the ones the server validates requests with and builds its answers from. Written here by
hand is only what pydantic cannot know: the paths, each one's statuses and headers, the
auth scheme, and how the event stream is described. ``build`` makes the document once per
app (``apidocs.py`` keeps it), with the app's own limits (``max_tokens``, the prompts'
length) and the routes that app has (``/playground`` only when it is on);
tests/test_openapi.py checks that the paths are exactly the app's routes.

What it says, and why:

- **Auth**: HTTP bearer (``Authorization: Bearer <key>``), or the same key in
  ``x-api-key`` (as Anthropic's clients send it), on every operation of the stage API:
  required (``security: [{bearerAuth: []}, {apiKeyAuth: []}]``) when the app has API keys
  (``STAGESERVER_API_KEYS``); optional (the same, and ``{}``) when it has none, or a
  host app's ``identify`` may name the caller instead. The scheme's description says the
  same for a reader of any server's document. ``/healthz``, ``/readyz``, ``/metrics``,
  ``/openapi.json``, ``/docs``, ``/static/stageserver.js`` and ``/playground`` are open.
- **The event stream**: ``text/event-stream``. OpenAPI 3.1 has no schema for one item of
  a stream (3.2's ``itemSchema``), so its ``schema`` describes one event, as tools for 3.1
  read it (schemathesis does): the event's name, its id, and its data, a JSON text whose
  schema is the ``contentSchema``.
- **Stage ids in paths**: an id that breaks the rule of ``stage_id`` gets 422 naming the
  field, as in ``POST /chat``, not 404: no stage can have it, and the caller learns why.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from ..config import StageSettings
from ..release import package_version
from ..schemas import (
    STAGE_ID_PATTERN,
    CancelData,
    Cancelling,
    ChatRequest,
    ChunkData,
    ContinuedData,
    DoneData,
    ErrorBody,
    ErrorData,
    Health,
    Readiness,
    StageStatus,
    TextStageOutput,
    UpstreamList,
    max_tokens_schema,
)
from . import openapi_messages, openapi_v1
from .browser import PLAYGROUND_DIR

_REF = "#/components/schemas/{model}"
CHAT_EXAMPLE = {
    "stage_id": "summary-1",
    "model_name": "smollm2",
    "user_prompt": "Name three colours.",
    "system_prompt": "Answer briefly.",
    "stream": True,
    "max_tokens": [64],
    "resumable": False,
}
_RESPONSE_MODELS: tuple[type[BaseModel], ...] = (
    TextStageOutput,
    ErrorBody,
    StageStatus,
    Cancelling,
    UpstreamList,
    Health,
    Readiness,
    ChunkData,
    ContinuedData,
    DoneData,
    ErrorData,
    CancelData,
)
# The files of Swagger UI that /docs uses (apidocs.py serves these and no others).
DOCS_FILES = ("swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png")

DESCRIPTION = """\
Runs LLM chat stages against OpenAI-compatible upstreams and streams them as Server-Sent \
Events. A stage is started with `POST /chat`; any client may then read its status, follow \
or resume its events (`Last-Event-ID`), or cancel it.

Every answer of the stage API carries `X-Request-ID`: the request's own, when it sent a \
printable one of at most 128 characters, else a new one. Every refusal is JSON, \
`{"error": ..., "field": ...}`, naming the field it is about. With \
`STAGESERVER_CORS_ORIGINS`, pages of the origins listed may call the API from a browser \
(preflight `OPTIONS` on every path of the stage API)."""

API_KEY = """\
`x-api-key: <key>`, as Anthropic's clients send it: the same keys, principals and rules as \
`Authorization: Bearer`. A request that sends both must name one principal with them."""

BEARER = """\
`Authorization: Bearer <key>`, a key of `STAGESERVER_API_KEYS`. Required when the \
server has API keys (or a host app names the caller itself): without a valid key the \
answer is 401 with `WWW-Authenticate: Bearer`. A server without keys is open: it accepts \
requests without this header, and ignores it."""

STREAM = """\
One item per event. Ids are `<stage_id>-<event>-<n>`, one counter for the whole stage, so \
any of them may be sent back as `Last-Event-ID`. The stream is `chat_completion_chunk` \
events, then exactly one of `done`, `error` or `cancel`. SSE comments (`: heartbeat`) \
come after a quiet interval. A response that can no longer follow its stage (the shared \
store went away) ends with an `error` event without an id of its own."""


def build(settings: StageSettings, *, playground: bool, bearer_required: bool) -> dict[str, Any]:
    """The document of an app with ``settings``; ``servers`` is its caller's to set.
    ``bearer_required``: the app has API keys, and no ``identify`` to ask instead."""
    paths = {**_stage_api(settings, bearer_required), **_open_paths(playground)}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "stageserver",
            "version": package_version(),
            "description": DESCRIPTION,
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": _schemas(settings),
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "description": BEARER},
                "apiKeyAuth": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "x-api-key",
                    "description": API_KEY,
                },
            },
            "parameters": _PARAMETERS,
        },
    }


# -- schemas ---------------------------------------------------------------------------------


def _schemas(settings: StageSettings) -> dict[str, Any]:
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [(ChatRequest, "validation")]
    models += [(model, "serialization") for model in _RESPONSE_MODELS]
    _, top = models_json_schema(models, ref_template=_REF)
    schemas: dict[str, Any] = top["$defs"]
    # The limits validation takes from the app's settings (its context), told here.
    chat = schemas["ChatRequest"]["properties"]
    chat["max_tokens"].update(max_tokens_schema(settings.max_tokens_limit))
    for prompt in ("user_prompt", "system_prompt"):
        chat[prompt]["maxLength"] = settings.max_prompt_chars
    schemas.update(openapi_v1.schemas())
    schemas.update(openapi_messages.schemas())
    schemas["StageEvent"] = {
        "description": STREAM,
        "oneOf": [
            _event("chat_completion_chunk", "ChunkData", "chunk", "Part of the completion."),
            _event(
                "continued",
                "ContinuedData",
                "continued",
                "The answer was cut short and goes on from the text delivered; the chunks "
                "after it come from the new request (their `id` and `created` are its own).",
            ),
            _event("done", "DoneData", "done", "The stage is done."),
            _event(
                "error",
                "ErrorData",
                None,
                "The stage failed, or this response cannot "
                "follow it further; its id is the last event's when it has none.",
            ),
            _event("cancel", "CancelData", "cancel", "The stage was cancelled."),
        ],
    }
    return schemas


def _event(name: str, data: str, kind: str | None, description: str) -> dict[str, Any]:
    event_id: dict[str, Any] = {"type": "string"}
    if kind is not None:
        event_id["pattern"] = f"-{kind}-[0-9]+$"
    return {
        "type": "object",
        "description": description,
        "required": ["event", "data"] + (["id"] if kind else []),
        "properties": {
            "event": {"const": name},
            "id": event_id,
            "retry": {"type": "integer", "minimum": 0},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {"$ref": _REF.format(model=data)},
            },
        },
    }


# -- responses -------------------------------------------------------------------------------


def _json(model: str, **media: Any) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": _REF.format(model=model)}, **media}}


def _either(*models: str) -> dict[str, Any]:
    return {
        "application/json": {"schema": {"oneOf": [{"$ref": _REF.format(model=m)} for m in models]}}
    }


def _header(description: str, schema: dict[str, Any], required: bool) -> dict[str, Any]:
    return {"description": description, "required": required, "schema": schema}


def _retry_after(required: bool) -> dict[str, Any]:
    return _header(
        "Seconds after which a retry may succeed.", {"type": "integer", "minimum": 0}, required
    )


def _error(description: str, **headers: dict[str, Any]) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description, "content": _json("ErrorBody")}
    if headers:
        answer["headers"] = {name.replace("_", "-"): h for name, h in headers.items()}
    return answer


_UNAUTHORIZED = _error(
    "No valid API key, on a server that has keys.",
    WWW_Authenticate=_header(
        'The challenge: `Bearer realm="stageserver"`, with `error="invalid_token"` when a '
        "key was sent.",
        {"type": "string", "pattern": "^Bearer realm="},
        True,
    ),
)
_INVALID_ID = _error(f"The stage id breaks its rule (`{STAGE_ID_PATTERN}`): `fields` names it.")
_NOT_FOUND = _error("No such stage: unknown, expired, or another principal's.")
_STORE = _error("The shared store (Redis) cannot answer.", Retry_After=_retry_after(True))
_PARAMETERS = {
    "stage_id": {
        "name": "stage_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": STAGE_ID_PATTERN},
        "example": "summary-1",
    },
    "Last-Event-ID": {
        "name": "Last-Event-ID",
        "in": "header",
        "required": False,
        "description": "Resume after this event (an id of this stage).",
        "schema": {"type": "string"},
        "example": "summary-1-chunk-3",
    },
    "last_event_id": {
        "name": "last_event_id",
        "in": "query",
        "required": False,
        "description": "The same, for a browser's `EventSource`, which cannot set headers; "
        "the header wins.",
        "schema": {"type": "string"},
    },
}
_STAGE_ID = {"$ref": "#/components/parameters/stage_id"}


_EVENTS = {"text/event-stream": {"schema": {"$ref": _REF.format(model="StageEvent")}}}


# -- paths -----------------------------------------------------------------------------------


def _stage_api(settings: StageSettings, bearer_required: bool) -> dict[str, Any]:
    chat_responses = {
        "200": {
            "description": 'With `"stream": true`, the events as they come (the headers at '
            "once, before the upstream answers); else, once the stage is done, the seed's "
            "`TextStageOutput`.",
            "content": {**_EVENTS, **_json("TextStageOutput")},
        },
        "400": _error(
            "The body is not a JSON object (`field: body`; the message says what "
            "is wrong with it), an unknown `upstream`, or a `base_url` that is not "
            "a configured upstream's."
        ),
        "401": _UNAUTHORIZED,
        "409": {
            "description": "A stage with this `stage_id` is still running (`ErrorBody`); "
            'or, not streamed, the stage was cancelled through the API (`"type": "error"`).',
            "content": _either("ErrorBody", "TextStageOutput"),
        },
        "413": _error(f"The body is larger than {settings.max_body_bytes} bytes."),
        "422": _error("A field breaks its rule: `fields` lists each one."),
        "429": _error(
            "The caller's principal has reached one of its limits.", Retry_After=_retry_after(True)
        ),
        "502": {
            "description": "Not streamed: the upstream failed.",
            "content": _json("TextStageOutput"),
        },
        "503": {
            "description": "No stage was started: this worker runs its limit of stages, is "
            "shutting down, or the shared store is down (`ErrorBody`, `Retry-After`). Not "
            "streamed: the server began shutting down, or could not record the stage, while "
            "it ran (`TextStageOutput`).",
            "content": _either("ErrorBody", "TextStageOutput"),
            "headers": {"Retry-After": _retry_after(False)},
        },
        "504": {
            "description": "Not streamed: the upstream timed out.",
            "content": _json("TextStageOutput"),
        },
    }
    paths: dict[str, dict[str, dict[str, Any]]] = {
        "/chat": {
            "post": {
                "operationId": "chat",
                "summary": "Start a stage",
                "requestBody": {
                    "required": True,
                    "content": _json("ChatRequest", example=CHAT_EXAMPLE),
                },
                "responses": chat_responses,
            }
        },
        "/upstreams": {
            "get": {
                "operationId": "listUpstreams",
                "summary": "The upstreams the caller may use",
                "responses": {
                    "200": {
                        "description": "By name, the default first; never a URL or a key.",
                        "content": _json("UpstreamList"),
                    },
                    "401": _UNAUTHORIZED,
                },
            }
        },
        "/stages/{stage_id}": {
            "get": {
                "operationId": "getStage",
                "summary": "A stage's status",
                "parameters": [_STAGE_ID],
                "responses": {
                    "200": {
                        "description": "Its status, text and usage so far.",
                        "content": _json("StageStatus"),
                    },
                    "401": _UNAUTHORIZED,
                    "404": _NOT_FOUND,
                    "422": _INVALID_ID,
                    "503": _STORE,
                },
            }
        },
        "/stages/{stage_id}/events": {
            "get": {
                "operationId": "followStage",
                "summary": "Follow or resume a stage's events",
                "parameters": [
                    _STAGE_ID,
                    {"$ref": "#/components/parameters/Last-Event-ID"},
                    {"$ref": "#/components/parameters/last_event_id"},
                ],
                "responses": {
                    "200": {
                        "description": "The events after `Last-Event-ID` (all, without one), "
                        "then live until the stage's terminal event.",
                        "content": _EVENTS,
                    },
                    "204": {
                        "description": "The stage has ended and nothing follows "
                        "`Last-Event-ID`: an `EventSource` stops reconnecting."
                    },
                    "400": _error("`Last-Event-ID` is not an event id of this stage."),
                    "401": _UNAUTHORIZED,
                    "404": _NOT_FOUND,
                    "410": _error("The stage's events have expired; its status has not."),
                    "422": _INVALID_ID,
                    "503": _STORE,
                },
            }
        },
        "/stages/{stage_id}/cancel": {
            "post": {
                "operationId": "cancelStage",
                "summary": "Stop a stage, wherever it runs",
                "parameters": [_STAGE_ID],
                "responses": {
                    "202": {
                        "description": "Cancelling: every client following it gets `cancel`.",
                        "content": _json("Cancelling"),
                    },
                    "401": _UNAUTHORIZED,
                    "404": _NOT_FOUND,
                    "409": _error("The stage has already finished."),
                    "422": _INVALID_ID,
                    "503": _STORE,
                },
            }
        },
        **openapi_v1.paths(),
        **openapi_messages.paths(),
    }
    openapi_messages.add_to_models(paths["/v1/models"]["get"])
    request_id = _header(
        "The request's id (see the description above).", {"type": "string", "minLength": 1}, True
    )
    for path, item in paths.items():
        for operation in item.values():
            operation["tags"] = [_tag(path)]
            # Either key; without keys, or with a host app's identify(), a request may come
            # without one.
            keys: list[dict[str, Any]] = [{"bearerAuth": []}, {"apiKeyAuth": []}]
            operation["security"] = keys + ([] if bearer_required else [{}])
            operation["responses"] = {
                status: {
                    **answer,
                    "headers": {**answer.get("headers", {}), "X-Request-ID": request_id},
                }
                for status, answer in operation["responses"].items()
            }
            if "parameters" in operation:  # a path or query value can make the line long
                operation["responses"]["414"] = openapi_v1.URI_TOO_LONG
    return paths


def _tag(path: str) -> str:
    if path.startswith("/v1/messages"):
        return "anthropic"
    return "openai" if path.startswith("/v1/") else "stages"


def _get(
    operation_id: str,
    summary: str,
    responses: dict[str, Any],
    tag: str,
    parameters: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": operation_id,
        "summary": summary,
        "tags": [tag],
        "security": [],
        "responses": responses,
    }
    if parameters:
        operation["parameters"] = parameters
    return {"get": operation}


def _file(description: str, *media_types: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {m: {"schema": {"type": "string"}} for m in media_types},
    }


def _filename(names: list[str]) -> list[dict[str, Any]]:
    return [
        {
            "name": "filename",
            "in": "path",
            "required": True,
            "schema": {"type": "string", "enum": names},
        }
    ]


def _open_paths(playground: bool) -> dict[str, Any]:
    not_found = _error("No such file.")
    paths = {
        "/healthz": _get(
            "healthz",
            "Whether the worker answers",
            {
                "200": {
                    "description": "Always, while the worker's loop runs.",
                    "content": _json("Health"),
                }
            },
            "operations",
        ),
        "/readyz": _get(
            "readyz",
            "Whether the worker can serve stages now",
            {
                "200": {
                    "description": "Every upstream answered `GET /models` in time.",
                    "content": _json("Readiness"),
                },
                "503": {
                    "description": "An upstream did not, none is configured, or the worker "
                    "is shutting down.",
                    "content": _json("Readiness"),
                },
            },
            "operations",
        ),
        "/metrics": _get(
            "metrics",
            "Prometheus metrics",
            {"200": _file("Prometheus' text format.", "text/plain")},
            "operations",
        ),
        "/openapi.json": _get(
            "openapi",
            "This document",
            {
                "200": {
                    "description": "OpenAPI 3.1.",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
            "documents",
        ),
        "/docs": _get(
            "docs",
            "This document, in Swagger UI",
            {"200": _file("The page.", "text/html")},
            "documents",
        ),
        "/docs/{filename}": _get(
            "docsFile",
            "Swagger UI's files, served here",
            {
                "200": _file("The file.", "text/css", "text/javascript", "image/png"),
                "404": not_found,
            },
            "documents",
            _filename(list(DOCS_FILES)),
        ),
        "/static/stageserver.js": _get(
            "clientModule",
            "The browser client, an ES module",
            {"200": _file("The module.", "text/javascript")},
            "documents",
        ),
    }
    if playground:
        files = sorted(p.name for p in PLAYGROUND_DIR.iterdir() if p.is_file())
        paths["/playground"] = _get(
            "playground",
            "A page to try stages by hand",
            {"200": _file("The page.", "text/html")},
            "documents",
        )
        paths["/playground/{filename}"] = _get(
            "playgroundFile",
            "The playground's files",
            {
                "200": _file("The file.", "text/html", "text/css", "text/javascript"),
                "404": not_found,
            },
            "documents",
            _filename(files),
        )
    return paths
