"""The ``/v1`` part of the OpenAPI document: OpenAI's API on stageserver's stages.

The request schemas are generated from the pydantic models the server validates with
(``openai_api/requests.py``). The answers are OpenAI's objects, described here as far
as a client relies on them: their ``object`` and the fields the SDKs require; an answer
may carry more. Every error has OpenAI's body, ``OpenAIError``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from ..openai_api.requests import ChatCompletionRequest, ResponseRequest

_REF = "#/components/schemas/{model}"


def _ref(model: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=model)}


def _object(kind: str, required: list[str], **properties: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["object", *required],
        "properties": {"object": {"const": kind}, **properties},
    }


_USAGE_CHAT = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        name: {"type": "integer", "minimum": 0}
        for name in ("prompt_tokens", "completion_tokens", "total_tokens")
    },
}
_ID = {"type": "string"}
_TEXT_EVENT = {"type": "string", "contentMediaType": "application/json"}

ANSWER_SCHEMAS: dict[str, Any] = {
    "OpenAIError": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
            }
        },
    },
    "ChatCompletion": _object(
        "chat.completion",
        ["id", "created", "model", "choices", "usage"],
        id=_ID,
        created={"type": "integer"},
        model={"type": "string"},
        choices={"type": "array", "minItems": 1, "maxItems": 1},
        usage=_USAGE_CHAT,
    ),
    "ChatCompletionEvent": {
        "description": "One block of the stream: `data: <chat.completion.chunk>`, then "
        '`data: [DONE]`; or `data: {"error": {...}}` when the stage fails. No `event:`, '
        "`id:` or `retry:` line.",
        "type": "object",
        "required": ["data"],
        "properties": {"data": _TEXT_EVENT},
    },
    "Response": _object(
        "response",
        ["id", "created_at", "status", "model", "output", "parallel_tool_calls", "tool_choice"],
        id=_ID,
        created_at={"type": "number"},
        status={
            "enum": ["queued", "in_progress", "completed", "failed", "cancelled", "incomplete"]
        },
        model={"type": "string"},
        output={"type": "array"},
        tools={"type": "array"},
        parallel_tool_calls={"type": "boolean"},
    ),
    "ResponseEvent": {
        "description": "One event of a response, named by its `type`; its data holds "
        "`type` and `sequence_number` (its place in the response's events, from 0). No "
        "`id:` or `retry:` line. A cancel ends the stream with `response.cancelled` (an "
        "extension of stageserver's).",
        "type": "object",
        "required": ["event", "data"],
        "properties": {"event": {"type": "string"}, "data": _TEXT_EVENT},
    },
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {
                "type": "array",
                "items": _object(
                    "model", ["id", "created", "owned_by"], id=_ID, owned_by={"type": "string"}
                ),
            },
        },
    },
    "DeletedResponse": _object("response", ["id", "deleted"], id=_ID, deleted={"const": True}),
}


def schemas() -> dict[str, Any]:
    """The ``/v1`` schemas: the requests', generated; the answers', above."""
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (ChatCompletionRequest, "validation"),
        (ResponseRequest, "validation"),
    ]
    _, top = models_json_schema(models, ref_template=_REF)
    return {**top["$defs"], **ANSWER_SCHEMAS}


def _error(description: str, **headers: Any) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _ref("OpenAIError")}},
    }
    if headers:
        answer["headers"] = headers
    return answer


_RETRY_AFTER = {
    "description": "Seconds after which a retry may succeed.",
    "required": True,
    "schema": {"type": "integer", "minimum": 0},
}
_STAGE_ID_HEADER = {
    "X-Stage-Id": {
        "description": "The stage this request is: `POST /stages/{id}/cancel` stops it from "
        "any host.",
        "required": True,
        "schema": {"type": "string"},
    }
}
_ERRORS = {
    "401": _error(
        "No valid API key (`code: invalid_api_key`).",
        **{
            "WWW-Authenticate": {
                "description": "The challenge.",
                "required": True,
                "schema": {"type": "string"},
            }
        },
    ),
    "413": _error("The body is too large."),
}
_REFUSED = {
    "429": _error(
        "The caller's principal has reached a limit (`code: rate_limit_exceeded`).",
        **{"Retry-After": _RETRY_AFTER},
    ),
    "503": _error(
        "This worker runs its limit of stages, is shutting down, or the shared store is down.",
        **{"Retry-After": _RETRY_AFTER},
    ),
}
_NOT_FOUND = _error("No such response: unknown, expired, or another principal's.")
#: gunicorn's answer to a request line over its limit (4094 bytes), before stageserver
#: sees the request: HTML, no headers of stageserver's.
URI_TOO_LONG = {"description": "The request line is longer than gunicorn's limit."}
_RESPONSE_ID = {
    "name": "response_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "example": "resp_0123456789abcdef0123456789abcdef",
}


def paths() -> dict[str, Any]:
    response = {"application/json": {"schema": _ref("Response")}}
    return {
        "/v1/chat/completions": {
            "post": {
                "operationId": "createChatCompletion",
                "summary": "A chat completion, as OpenAI's API makes one",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("ChatCompletionRequest")}},
                },
                "responses": {
                    "200": {
                        "description": 'With `"stream": true`, the chunks as they come; '
                        "else the whole `chat.completion`.",
                        "headers": _STAGE_ID_HEADER,
                        "content": {
                            "application/json": {"schema": _ref("ChatCompletion")},
                            "text/event-stream": {"schema": _ref("ChatCompletionEvent")},
                        },
                    },
                    "400": _error("A field is wrong or not supported: `param` names it."),
                    **_ERRORS,
                    **_REFUSED,
                    "409": _error("Not streamed: the stage was cancelled through the API."),
                    "502": _error("Not streamed: the upstream failed."),
                    "504": _error("Not streamed: the upstream timed out."),
                },
            }
        },
        "/v1/models": {
            "get": {
                "operationId": "listModels",
                "summary": "The models of the upstreams the caller may use",
                "responses": {
                    "200": {
                        "description": "Each upstream's `models`, or its name where it lists none.",
                        "content": {"application/json": {"schema": _ref("ModelList")}},
                    },
                    **_ERRORS,
                },
            }
        },
        "/v1/responses": {
            "post": {
                "operationId": "createResponse",
                "summary": "A response: plain, streamed, in the background, or both",
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "description": "A retried create with the same key and the same "
                        "body (in any key order or whitespace) gets the same response; another "
                        "body is refused with 422.",
                        "schema": {"type": "string"},
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("ResponseRequest")}},
                },
                "responses": {
                    "200": {
                        "description": "The events (`stream`), else the Response: whole, "
                        "or at once, in progress (`background`).",
                        "headers": _STAGE_ID_HEADER,
                        "content": {
                            **response,
                            "text/event-stream": {"schema": _ref("ResponseEvent")},
                        },
                    },
                    "400": _error(
                        "A field is wrong or not supported, or `previous_response_id` is "
                        "not one of the caller's finished responses: `param` names it."
                    ),
                    "422": _error(
                        "The `Idempotency-Key` was sent before with another body "
                        "(`code: idempotency_key_reused`, `param: Idempotency-Key`)."
                    ),
                    **_ERRORS,
                    **_REFUSED,
                },
            }
        },
        "/v1/responses/{response_id}": {
            "get": {
                "operationId": "getResponse",
                "summary": "A response as it stands, or its events again",
                "parameters": [
                    _RESPONSE_ID,
                    {
                        "name": "stream",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "boolean"},
                        "description": "Its events again, then live: only a response "
                        "created with `background` and `stream`.",
                    },
                    {
                        "name": "starting_after",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 0},
                        "description": "With `stream`: the events after this `sequence_number`.",
                    },
                ],
                "responses": {
                    "200": {
                        "description": "The Response, or its events.",
                        "headers": _STAGE_ID_HEADER,
                        "content": {
                            **response,
                            "text/event-stream": {"schema": _ref("ResponseEvent")},
                        },
                    },
                    "400": _error(
                        "`stream` is not `true` or `false`, or asks to stream a response "
                        "that cannot be streamed again; or `starting_after` is not a "
                        "sequence number, or names events no longer kept."
                    ),
                    **_ERRORS,
                    "404": _NOT_FOUND,
                    "503": _REFUSED["503"],
                },
            },
            "delete": {
                "operationId": "deleteResponse",
                "summary": "Cancel a response if it runs, and forget it",
                "parameters": [_RESPONSE_ID],
                "responses": {
                    "200": {
                        "description": "It is gone, on every host.",
                        "headers": _STAGE_ID_HEADER,
                        "content": {"application/json": {"schema": _ref("DeletedResponse")}},
                    },
                    **_ERRORS,
                    "404": _NOT_FOUND,
                    "503": _REFUSED["503"],
                },
            },
        },
        "/v1/responses/{response_id}/cancel": {
            "post": {
                "operationId": "cancelResponse",
                "summary": "Stop a response wherever it runs (idempotent)",
                "parameters": [_RESPONSE_ID],
                "responses": {
                    "200": {
                        "description": "The Response: `cancelled`, with its usage; a "
                        "finished one as it ended.",
                        "headers": _STAGE_ID_HEADER,
                        "content": response,
                    },
                    **_ERRORS,
                    "404": _NOT_FOUND,
                    "503": _REFUSED["503"],
                },
            }
        },
    }
