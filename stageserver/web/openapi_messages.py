"""The Messages API's part of the OpenAPI document: ``POST /v1/messages``, ``POST
/v1/messages/count_tokens``, and ``GET /v1/models`` as Anthropic's clients ask it (with
``anthropic-version``).

The request schemas are generated from the pydantic models the server validates with
(``anthropic_api/requests.py``). The answers are Anthropic's objects, described as far as
a client relies on them; an answer may carry more. Every error has the Messages API's
body, ``AnthropicError``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from ..anthropic_api.models import MAX_LIMIT
from ..anthropic_api.requests import CountTokensRequest, MessagesRequest

_REF = "#/components/schemas/{model}"


def _ref(model: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=model)}


_USAGE = {
    "type": "object",
    "required": ["input_tokens", "output_tokens"],
    "properties": {
        name: {"type": "integer", "minimum": 0}
        for name in (
            "input_tokens",
            "output_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
        )
    },
}
_STOP_REASONS = ["end_turn", "max_tokens", "stop_sequence", "tool_use", "refusal"]

ANSWER_SCHEMAS: dict[str, Any] = {
    "AnthropicError": {
        "type": "object",
        "required": ["type", "error"],
        "properties": {
            "type": {"const": "error"},
            "error": {
                "type": "object",
                "required": ["type", "message"],
                "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
    "Message": {
        "type": "object",
        "required": ["id", "type", "role", "model", "content", "stop_reason", "usage"],
        "properties": {
            "id": {"type": "string", "pattern": "^msg_"},
            "type": {"const": "message"},
            "role": {"const": "assistant"},
            "model": {"type": "string"},
            "content": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["type"],
                    "properties": {"type": {"enum": ["text", "thinking", "tool_use"]}},
                },
            },
            "stop_reason": {"enum": _STOP_REASONS},
            "stop_sequence": {"type": ["string", "null"]},
            "usage": _USAGE,
        },
    },
    "MessageEvent": {
        "description": "One event of a message, named by its `type` (`message_start`, "
        "`content_block_start`, `content_block_delta`, `content_block_stop`, "
        "`message_delta`, `message_stop`, or `error`), with its id, "
        "`<message id>-<type>-<n>` (`n` its place in the stage's log: "
        "`GET /stages/{id}/events` resumes after any with `Last-Event-ID`). The heartbeat "
        "is a `ping` event, without an id.",
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {
                "enum": [
                    "message_start",
                    "content_block_start",
                    "content_block_delta",
                    "content_block_stop",
                    "message_delta",
                    "message_stop",
                    "error",
                    "ping",
                ]
            },
            "id": {"type": "string", "pattern": "^msg_[0-9a-f]+-[a-z_]+-[0-9]+$"},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {
                    "type": "object",
                    "required": ["type"],
                    "properties": {"type": {"type": "string"}},
                },
            },
        },
    },
    "MessageTokensCount": {
        "type": "object",
        "required": ["input_tokens"],
        "properties": {
            "input_tokens": {"type": "integer", "minimum": 0},
            "estimated": {
                "const": True,
                "description": "Present when the upstream has no tokenizer to ask: the "
                "count is stageserver's estimate.",
            },
        },
    },
    "AnthropicModelList": {
        "type": "object",
        "required": ["data", "has_more", "first_id", "last_id"],
        "properties": {
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["type", "id", "display_name", "created_at"],
                    "properties": {
                        "type": {"const": "model"},
                        "id": {"type": "string"},
                        "display_name": {"type": "string"},
                        "created_at": {"type": "string"},
                    },
                },
            },
            "has_more": {"type": "boolean"},
            "first_id": {"type": ["string", "null"]},
            "last_id": {"type": ["string", "null"]},
        },
    },
}


def schemas() -> dict[str, Any]:
    """The Messages API's schemas: the requests', generated; the answers', above."""
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (MessagesRequest, "validation"),
        (CountTokensRequest, "validation"),
    ]
    _, top = models_json_schema(models, ref_template=_REF)
    return {**top["$defs"], **ANSWER_SCHEMAS}


def _error(description: str, **headers: Any) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _ref("AnthropicError")}},
    }
    if headers:
        answer["headers"] = headers
    return answer


def _retry_after(required: bool) -> dict[str, Any]:
    return {
        "description": "Seconds after which a retry may succeed.",
        "required": required,
        "schema": {"type": "integer", "minimum": 0},
    }


_WWW_AUTHENTICATE = {
    "description": "The challenge.",
    "required": True,
    "schema": {"type": "string"},
}
_UNAUTHORIZED = _error(
    "No valid API key (`x-api-key` or `Authorization: Bearer`): `authentication_error`.",
    **{"WWW-Authenticate": _WWW_AUTHENTICATE},
)
_TOO_LARGE = _error("The body is too large: `request_too_large`.")
_HEADERS = [
    {
        "name": "anthropic-version",
        "in": "header",
        "required": False,
        "description": "Taken, whatever it says (stageserver answers as `2023-06-01`).",
        "schema": {"type": "string"},
    },
    {
        "name": "anthropic-beta",
        "in": "header",
        "required": False,
        "description": "Taken; a name this server does not know is ignored, and logged once.",
        "schema": {"type": "string"},
    },
]
_REQUEST_ID = {
    "request-id": {
        "description": "The request's id, as Anthropic's answers carry one (`X-Request-ID`).",
        "required": True,
        "schema": {"type": "string", "minLength": 1},
    }
}
_STAGE_ID = {
    "X-Stage-Id": {
        "description": "The stage this message is (its id): `POST /stages/{id}/cancel` stops "
        "it from any host, `GET /stages/{id}/events` resumes its stream.",
        "required": True,
        "schema": {"type": "string", "pattern": "^msg_"},
    }
}


def paths() -> dict[str, Any]:
    message_errors = {
        "400": _error(
            "A field is wrong or not taken, or the upstream refused the request: "
            "`invalid_request_error`, the message starting with the field's path."
        ),
        "401": _UNAUTHORIZED,
        "413": _TOO_LARGE,
        "429": _error(
            "The caller's principal has reached a limit: `rate_limit_error`.",
            **{"Retry-After": _retry_after(True)},
        ),
        "499": _error(
            "Not streamed: the message was cancelled through the API (`invalid_request_error`)."
        ),
        "500": _error("Not streamed: stageserver failed (`api_error`)."),
        "502": _error("Not streamed: the upstream failed (`api_error`)."),
        "504": _error("Not streamed: the upstream timed out (`timeout_error`)."),
        "529": _error(
            "This worker runs its limit of stages, is shutting down, or the shared store is "
            "down (with `Retry-After`); or, not streamed, the upstream was busy: "
            "`overloaded_error`.",
            **{"Retry-After": _retry_after(False)},
        ),
    }
    return {
        "/v1/messages": {
            "post": {
                "operationId": "createMessage",
                "summary": "A message, as Anthropic's Messages API makes one",
                "parameters": [
                    *_HEADERS,
                    {
                        "name": "X-Stage-Resumable",
                        "in": "header",
                        "required": False,
                        "description": "`true`: the message outlives its client's leaving "
                        "(for `STAGESERVER_RESUME_GRACE_SECONDS`), so that it can be resumed; "
                        "default `STAGESERVER_RESUMABLE_DEFAULT`.",
                        "schema": {"enum": ["true", "false"]},
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("MessagesRequest")}},
                },
                "responses": {
                    "200": {
                        "description": 'With `"stream": true`, the events as they come; else '
                        "the whole Message.",
                        "headers": {**_STAGE_ID, **_REQUEST_ID},
                        "content": {
                            "application/json": {"schema": _ref("Message")},
                            "text/event-stream": {"schema": _ref("MessageEvent")},
                        },
                    },
                    **message_errors,
                },
            }
        },
        "/v1/messages/count_tokens": {
            "post": {
                "operationId": "countMessageTokens",
                "summary": "A message's input tokens, by the upstream's tokenizer where it has one",
                "parameters": _HEADERS,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("CountTokensRequest")}},
                },
                "responses": {
                    "200": {
                        "description": "The count; `estimated` when no tokenizer counted.",
                        "headers": _REQUEST_ID,
                        "content": {"application/json": {"schema": _ref("MessageTokensCount")}},
                    },
                    "400": message_errors["400"],
                    "401": _UNAUTHORIZED,
                    "413": _TOO_LARGE,
                },
            }
        },
    }


def add_to_models(operation: dict[str, Any]) -> None:
    """``GET /v1/models`` (``openapi_v1.py``'s operation) as Anthropic's clients ask it:
    with ``anthropic-version``, Anthropic's listing, a page at a time, and its errors."""
    paging = [
        {
            "name": name,
            "in": "query",
            "required": False,
            "description": f"With `anthropic-version`: {says}",
            "schema": {"type": "string"},
        }
        for name, says in (
            ("limit", f"the models of a page, a whole number from 1 to {MAX_LIMIT} (20)."),
            ("after_id", "the page after this model."),
            ("before_id", "the page before this model."),
        )
    ]
    operation["parameters"] = [*operation.get("parameters", ()), *_HEADERS, *paging]
    responses = operation["responses"]
    openai = responses["200"]["content"]["application/json"]["schema"]
    responses["200"]["description"] += " With `anthropic-version`, in Anthropic's shape."
    responses["200"]["content"]["application/json"]["schema"] = {
        "oneOf": [openai, _ref("AnthropicModelList")]
    }
    for status, answer in responses.items():
        content = answer.get("content", {}).get("application/json")
        if status != "200" and content is not None:
            content["schema"] = {"oneOf": [content["schema"], _ref("AnthropicError")]}
    responses["400"] = _error(
        "With `anthropic-version`: a paging parameter is wrong (`invalid_request_error`)."
    )
