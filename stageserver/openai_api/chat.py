"""The Chat Completions dialect: a stage as ``POST /v1/chat/completions`` streams it.

Each upstream chunk becomes one ``data: {chat.completion.chunk}`` block, with no
``event:``, ``id:`` or ``retry:`` line (the JavaScript SDK wraps named events; the
Python SDK's decoder fails on ``id:`` and a lone ``retry:``). The chunk's ``id``,
``created`` and ``model`` are the stage's, the same in every chunk whichever upstream
or replica served it: upstream ids collide across servers. The ``delta`` is the
upstream's (a reasoning model's ``reasoning_content`` included), with its ``role`` sent
once: an answer continued after a failure reads as one answer, its seam invisible. The
``logprobs`` are the upstream's, where it sent them. Then:

- ``done``: the usage chunk (``choices: []``) only when ``stream_options.include_usage``
  asked for it, then ``data: [DONE]``;
- ``error``: ``data: {"error": {"message", "type", "code", "param"}}``, and no ``[DONE]``
  (``invalid_request_error``, naming its ``param``, where the upstream refused the
  request as malformed: an image to a text-only model, say);
- ``cancelled`` (a cancel from another request; a client that leaves reads nothing):
  the same error form, with ``code: "cancelled"``.

Without ``stream``, the answer is one ``chat.completion``, its tool calls, its
``reasoning_content`` and its logprobs assembled from the chunks. The usage carries the
upstream's token details (``reasoning_tokens``, ``cached_tokens``) where it sent them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from ..sse import compact_json
from ..stages.chunk_read import ChunkRead
from ..stages.dialect import Ending
from ..stages.records import ContinuationRecord

DONE_EVENT = b"data: [DONE]\n\n"


class ChatCompletionsDialect:
    name = "chat.completions"

    def __init__(
        self, stage_id: str, model: str, *, include_usage: bool, created: int | None = None
    ) -> None:
        self.stage_id = stage_id
        self.model = model
        self.include_usage = include_usage
        self.created = int(time.time()) if created is None else created
        self._head = (
            b'{"id":' + compact_json(stage_id) + b',"object":"chat.completion.chunk","created":'
            + str(self.created).encode() + b',"model":' + compact_json(model)
        )  # fmt: skip
        self._role_sent = False
        # What the whole answer assembles from the chunks: the tool calls by index (id,
        # name, arguments), the reasoning, and the tokens' logprobs.
        self._tool_calls: dict[int, dict[str, Any]] = {}
        self._reasoning: list[str] = []
        self._logprobs: list[Any] = []

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "stage_id": self.stage_id,
            "model": self.model,
            "include_usage": self.include_usage,
            "created": self.created,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ChatCompletionsDialect:
        return cls(
            str(record["stage_id"]),
            str(record["model"]),
            include_usage=bool(record["include_usage"]),
            created=int(record["created"]),
        )

    def opening(self, seq: int) -> list[bytes]:
        return []

    def chunk(self, seq: int, payload: bytes, read: ChunkRead) -> list[bytes]:
        delta, finish_reason, logprobs = read.delta, read.finish_reason, read.logprobs
        if delta is None and finish_reason is None:
            return []  # the usage chunk, or one for another choice: told at the end
        delta = dict(delta or {})
        if self._role_sent:
            delta.pop("role", None)
        elif delta or finish_reason is None:
            delta = {"role": "assistant", **delta}
            self._role_sent = True
        for call in delta.get("tool_calls") or ():
            if isinstance(call, Mapping):
                self._add_tool_call(call)
        if read.reasoning is not None:
            self._reasoning.append(read.reasoning)
        if logprobs is not None and isinstance(logprobs.get("content"), list):
            self._logprobs += logprobs["content"]
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return [b"data: " + self._head + b',"choices":[' + compact_json(choice) + b"]}\n\n"]

    def continued(self, seq: int, record: ContinuationRecord) -> list[bytes]:
        return []

    def resume(self, text: str) -> None:
        # The log holds at least the first chunk, which carried the role.
        self._role_sent = True

    def _add_tool_call(self, call: Mapping[str, Any]) -> None:
        index = call.get("index", 0)
        if not isinstance(index, int):
            return
        known = self._tool_calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
        function = call.get("function")
        if isinstance(call.get("id"), str):
            known["id"] = call["id"]
        if isinstance(function, Mapping):
            if isinstance(function.get("name"), str):
                known["name"] += function["name"]
            if isinstance(function.get("arguments"), str):
                known["arguments"] += function["arguments"]

    def ending(self, seq: int, ending: Ending) -> list[bytes]:
        if ending.status == "done":
            events = []
            if self.include_usage:
                usage = {"choices": [], "usage": chat_usage(ending.usage)}
                events.append(b"data: " + self._head + b"," + compact_json(usage)[1:] + b"\n\n")
            return [*events, DONE_EVENT]
        return [b"data: " + compact_json(self._error(ending)) + b"\n\n"]

    def _error(self, ending: Ending) -> dict[str, Any]:
        if ending.status == "cancelled":
            return openai_error(f"cancelled: {ending.reason}", "cancelled", "cancelled")
        failure = ending.failure
        message = ending.error or "the stage failed"
        if failure is not None and failure.refused_request:
            kind, code = "invalid_request_error", failure.code or "invalid_value"
            return openai_error(message, kind, code, failure.field)
        return openai_error(message, "server_error", getattr(failure, "outcome", "error"))

    def answer(self, ending: Ending) -> tuple[dict[str, Any], int]:
        if ending.status == "cancelled":
            return self._error(ending), 409
        if ending.status == "error":
            failure = ending.failure
            status = (
                502 if failure is None else 400 if failure.refused_request else failure.http_status
            )
            return self._error(ending), status
        message: dict[str, Any] = {
            "role": "assistant",
            "content": ending.text or None,
            "refusal": None,
        }
        if self._reasoning:
            message["reasoning_content"] = "".join(self._reasoning)
        if self._tool_calls:
            message["tool_calls"] = [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": call["arguments"]},
                }
                for _, call in sorted(self._tool_calls.items())
            ]
        finish = ending.finish_reason or ("tool_calls" if self._tool_calls else "stop")
        logprobs = {"content": self._logprobs, "refusal": None} if self._logprobs else None
        return {
            "id": self.stage_id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}
            ],
            "usage": chat_usage(ending.usage),
        }, 200


def chat_usage(usage: Mapping[str, Any]) -> dict[str, Any]:
    """A stage's usage as Chat Completions reports it, with the upstream's details of its
    tokens (``reasoning_tokens``, ``cached_tokens``) where it gave them."""
    prompt = int(usage.get("prompt_tokens", 0))
    completion = int(usage.get("completion_tokens", 0))
    reported = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": int(usage.get("total_tokens", prompt + completion)),
    }
    for details in ("prompt_tokens_details", "completion_tokens_details"):
        if isinstance(usage.get(details), dict):
            reported[details] = usage[details]
    return reported


def openai_error(
    message: str, kind: str, code: str | None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
