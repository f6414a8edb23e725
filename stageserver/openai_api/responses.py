"""The Responses dialect: a stage as ``/v1/responses`` streams it, and its Response.

Every event is one SSE block named by its ``type`` (``event: response.output_text.delta``),
with no ``id:`` or ``retry:`` line. ``sequence_number`` is the event's place in the
stage's log: a resume with ``starting_after=N`` is an index into the log, on any host.
In OpenAI's order:

- ``response.created``, ``response.in_progress``;
- for a reasoning model's reasoning, first: ``output_item.added`` (a ``reasoning`` item),
  ``content_part.added`` (``reasoning_text``), ``reasoning_text.delta``..., and at its
  end ``reasoning_text.done``, ``content_part.done``, ``output_item.done``;
- for text: ``output_item.added`` (a message), ``content_part.added``,
  ``output_text.delta``... (each with the tokens' ``logprobs`` where the upstream sent
  them), and at its end ``output_text.done``, ``content_part.done``,
  ``output_item.done``;
- for each tool call: ``output_item.added`` (a ``function_call``),
  ``function_call_arguments.delta``..., ``function_call_arguments.done``,
  ``output_item.done``;
- then ``response.completed``, or ``response.incomplete`` (``incomplete_details.reason:
  "max_output_tokens"``) when the upstream stopped at the token limit.

A failure is an ``error`` event carrying the code both flat (``code``, ``message``,
``param``) and nested (``error: {...}``), since clients read one or the other, then
``response.failed``. A cancel ends the stream with ``response.cancelled``, carrying the
Response: an extension of stageserver's (OpenAI's SDKs have no such event; the Python SDK
keeps an unknown event's ``type``).

An answer continued after a failure is one answer: the same Response, item and content
part, its ``sequence_number`` going on by one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from ..sse import compact_json, encode_event
from ..stages.chunk_read import ChunkRead
from ..stages.dialect import Ending
from ..stages.records import ContinuationRecord
from .chat import openai_error

#: What a Response echoes of its request (``ResponseRequest``), besides its model.
ECHOED = (
    "instructions", "max_output_tokens", "metadata", "parallel_tool_calls",
    "previous_response_id", "store", "temperature", "text", "tool_choice", "tools",
    "top_p", "truncation", "user", "service_tier", "background", "prompt_cache_key",
    "safety_identifier", "reasoning", "top_logprobs", "max_tool_calls",
)  # fmt: skip

_DEFAULTS: dict[str, Any] = {
    "instructions": None,
    "max_output_tokens": None,
    "metadata": {},
    "parallel_tool_calls": True,
    "previous_response_id": None,
    "store": True,
    "temperature": 1.0,
    "text": {"format": {"type": "text"}},
    "tool_choice": "auto",
    "tools": [],
    "top_p": 1.0,
    "truncation": "disabled",
    "user": None,
    "service_tier": "auto",
    "background": False,
    "prompt_cache_key": None,
    "safety_identifier": None,
    "reasoning": None,
    "top_logprobs": None,
    "max_tool_calls": None,
}


class ResponsesDialect:
    name = "responses"

    def __init__(
        self,
        stage_id: str,
        model: str,
        echo: Mapping[str, Any],
        *,
        replayable: bool = False,
        created_at: float | None = None,
        message_params: Sequence[str] = (),
    ) -> None:
        """``echo``: the request's fields; ``replayable``: it may be streamed again (it
        was created with ``background`` and ``stream``); ``message_params``: where each
        message sent upstream comes from in the request (``input[2]``), for an upstream's
        error that names one."""
        self.stage_id = stage_id
        self.model = model
        self.replayable = replayable
        #: The request's fields the Response echoes; the defaults for those it left out.
        self.echo = {
            name: _DEFAULTS[name] if echo.get(name) is None else echo[name] for name in ECHOED
        }
        self.created_at = int(time.time()) if created_at is None else created_at
        self.message_params = tuple(message_params)
        #: The output items so far, in order; the message's text and the calls' arguments
        #: grow as deltas come.
        self.output: list[dict[str, Any]] = []
        self._reasoning_item: dict[str, Any] | None = None  # the reasoning being written
        self._text_item: dict[str, Any] | None = None  # the message being written
        self._calls: dict[int, dict[str, Any]] = {}  # the tool calls being written, by index

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "stage_id": self.stage_id,
            "model": self.model,
            "echo": self.echo,
            "replayable": self.replayable,
            "created_at": self.created_at,
            "message_params": list(self.message_params),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ResponsesDialect:
        return cls(
            str(record["stage_id"]),
            str(record["model"]),
            record["echo"],
            replayable=bool(record["replayable"]),
            created_at=record["created_at"],
            message_params=record.get("message_params", ()),
        )

    # -- the Response ---------------------------------------------------------------------

    def response(
        self,
        status: str,
        *,
        usage: Mapping[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        incomplete: str | None = None,
    ) -> dict[str, Any]:
        """The Response as it stands, with ``status``."""
        return {
            "id": self.stage_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": error,
            "incomplete_details": None if incomplete is None else {"reason": incomplete},
            "model": self.model,
            "output": [dict(item) for item in self.output],
            "usage": None if usage is None else response_usage(usage),
            **self.echo,
        }

    def in_progress(self, text: str) -> dict[str, Any]:
        """The Response of a stage that runs elsewhere, from the text it has delivered."""
        response = self.response("in_progress")
        if text:
            response["output"] = [self._message(0, _output_text(text))]
        return response

    def _message(self, index: int, *content: dict[str, Any]) -> dict[str, Any]:
        """The assistant's message at ``index`` of the output, being written."""
        return {
            "id": f"msg_{self.stage_id}_{index}",
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": list(content),
        }

    # -- events ---------------------------------------------------------------------------

    def _event(self, seq: int, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": seq, **fields}
        return encode_event(kind, compact_json(data))

    def opening(self, seq: int) -> list[bytes]:
        response = self.response("in_progress")
        return [
            self._event(seq, "response.created", response=response),
            self._event(seq + 1, "response.in_progress", response=response),
        ]

    def chunk(self, seq: int, payload: bytes, read: ChunkRead) -> list[bytes]:
        events: list[bytes] = []
        if read.reasoning:
            events += self._reasoning_delta(seq, read.reasoning)
        if read.content:
            events += self._text_delta(seq + len(events), read.content, read.logprobs)
        calls = read.delta.get("tool_calls") if read.delta else None
        if isinstance(calls, list):
            for call in calls:
                if isinstance(call, Mapping):
                    events += self._call_delta(seq + len(events), call)
        return events

    def continued(self, seq: int, record: ContinuationRecord) -> list[bytes]:
        return []

    def resume(self, text: str) -> None:
        """Continuations are made for text answers only: what the log holds is the
        opening, then one message, open, with ``text``."""
        if not text:
            return
        self._text_item = self._message(0, _output_text(text))
        self.output = [self._text_item]

    def _reasoning_delta(self, seq: int, text: str) -> list[bytes]:
        events = []
        item = self._reasoning_item
        if item is None:
            events += self._close_open(seq, but="reasoning")
            item = {
                "id": f"rs_{self.stage_id}_{len(self.output)}",
                "type": "reasoning",
                "summary": [],
                "content": [],
                "status": "in_progress",
            }
            self._reasoning_item = item
            events += self._open(seq + len(events), item, {"type": "reasoning_text", "text": ""})
        events.append(
            self._part_delta(seq + len(events), item, "response.reasoning_text.delta", text)
        )
        return events

    def _part_delta(
        self, seq: int, item: dict[str, Any], kind: str, text: str, **fields: Any
    ) -> bytes:
        """``text`` added to the one part of ``item`` (opened by ``_open``): its delta
        event, ``kind``, with ``fields``."""
        item["content"][0]["text"] += text
        index = self.output.index(item)
        return self._event(
            seq, kind, item_id=item["id"], output_index=index, content_index=0, delta=text, **fields
        )

    def _close_open(self, seq: int, *, but: str | None = None) -> list[bytes]:
        """Every item still open closed, in the order reasoning, text, calls, but those
        of the kind ``but``: an item of one kind that starts ends the others."""
        closes = {
            "reasoning": self._close_reasoning,
            "text": self._close_text,
            "calls": self._close_calls,
        }
        events: list[bytes] = []
        for kind, close in closes.items():
            if kind != but:
                events += close(seq + len(events))
        return events

    def _open(self, seq: int, item: dict[str, Any], part: dict[str, Any]) -> list[bytes]:
        """``item`` (a reasoning item or a message, with no content yet) added to the
        output, and ``part``, its one content part, to it: the two events that say so."""
        index = len(self.output)
        self.output.append(item)
        added = self._item_event(seq, "response.output_item.added", item)
        item["content"].append(part)
        common = {"item_id": item["id"], "output_index": index, "content_index": 0}
        return [
            added,
            self._event(seq + 1, "response.content_part.added", **common, part=dict(part)),
        ]

    def _item_event(self, seq: int, kind: str, item: dict[str, Any]) -> bytes:
        """``response.output_item.added`` or ``.done``: ``item``, of the output, as it
        stands."""
        return self._event(seq, kind, output_index=self.output.index(item), item=_copy(item))

    def _close(self, seq: int, item: dict[str, Any], done: str, **fields: Any) -> list[bytes]:
        """``item`` (opened by ``_open``) completed: the event ``done`` (its part's
        ``.done``, with ``fields``), then its part's and its own."""
        index = self.output.index(item)
        item["status"] = "completed"
        common = {"item_id": item["id"], "output_index": index, "content_index": 0}
        part = dict(item["content"][0])
        return [
            self._event(seq, done, **common, **fields),
            self._event(seq + 1, "response.content_part.done", **common, part=part),
            self._item_event(seq + 2, "response.output_item.done", item),
        ]

    def _close_reasoning(self, seq: int) -> list[bytes]:
        item, self._reasoning_item = self._reasoning_item, None
        if item is None:
            return []
        text = item["content"][0]["text"]
        return self._close(seq, item, "response.reasoning_text.done", text=text)

    def _text_delta(self, seq: int, text: str, logprobs: Mapping[str, Any] | None) -> list[bytes]:
        events = []
        item = self._text_item
        if item is None:
            events += self._close_open(seq, but="text")
            item = self._message(len(self.output))
            self._text_item = item
            events += self._open(seq + len(events), item, _output_text(""))
        tokens = logprobs.get("content") if logprobs is not None else None
        if not isinstance(tokens, list):
            tokens = []
        item["content"][0]["logprobs"] += [_part_logprob(token) for token in tokens]
        delta_logprobs = [_delta_logprob(token) for token in tokens]
        kind = "response.output_text.delta"
        events.append(
            self._part_delta(seq + len(events), item, kind, text, logprobs=delta_logprobs)
        )
        return events

    def _call_delta(self, seq: int, call: Mapping[str, Any]) -> list[bytes]:
        index = call.get("index", 0)
        if not isinstance(index, int):
            return []
        function = call.get("function") if isinstance(call.get("function"), Mapping) else {}
        assert isinstance(function, Mapping)
        events = []
        item = self._calls.get(index)
        if item is None:
            events += self._close_open(seq, but="calls")
            output_index = len(self.output)
            call_id = call.get("id") if isinstance(call.get("id"), str) else f"call_{index}"
            item = {
                "id": f"fc_{self.stage_id}_{output_index}",
                "type": "function_call",
                "status": "in_progress",
                "call_id": call_id,
                "name": function.get("name") or "",
                "arguments": "",
            }
            self.output.append(item)
            self._calls[index] = item
            events.append(self._item_event(seq + len(events), "response.output_item.added", item))
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            item["arguments"] += arguments
            events.append(
                self._event(
                    seq + len(events),
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=self.output.index(item),
                    delta=arguments,
                )
            )
        return events

    def _close_text(self, seq: int) -> list[bytes]:
        item, self._text_item = self._text_item, None
        if item is None:
            return []
        part = item["content"][0]
        logprobs = [_delta_logprob(token) for token in part["logprobs"]]
        return self._close(
            seq, item, "response.output_text.done", text=part["text"], logprobs=logprobs
        )

    def _close_calls(self, seq: int) -> list[bytes]:
        events: list[bytes] = []
        for item in self._calls.values():
            if item["status"] != "in_progress":
                continue
            index = self.output.index(item)
            item["status"] = "completed"
            events.append(
                self._event(
                    seq + len(events),
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
            events.append(self._item_event(seq + len(events), "response.output_item.done", item))
        return events

    def ending(self, seq: int, ending: Ending) -> list[bytes]:
        if ending.status == "cancelled":
            response = self.final(ending)
            return [self._event(seq, "response.cancelled", response=response)]
        if ending.status == "error":
            error = self.error(ending)
            flat = {"code": error["code"], "message": error["message"], "param": error.get("param")}
            response = self.final(ending)
            return [
                self._event(seq, "error", **flat, error={"type": "server_error", **flat}),
                self._event(seq + 1, "response.failed", response=response),
            ]
        events = self._close_open(seq)
        response = self.final(ending)
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        return [*events, self._event(seq + len(events), kind, response=response)]

    def final(self, ending: Ending) -> dict[str, Any]:
        """The Response of a stage that ended so."""
        if ending.status == "cancelled":
            return self.response("cancelled", usage=ending.usage)
        if ending.status == "error":
            return self.response("failed", usage=ending.usage, error=self.error(ending))
        if ending.finish_reason == "length":
            return self.response("incomplete", usage=ending.usage, incomplete="max_output_tokens")
        return self.response("completed", usage=ending.usage)

    def answer(self, ending: Ending) -> tuple[dict[str, Any], int]:
        return self.final(ending), 200

    def error(self, ending: Ending) -> dict[str, Any]:
        """The Response's ``error``, the ``error`` event's code with it. Its ``code`` is
        one of OpenAI's (the SDK's ``ResponseError.code`` is a closed list: a code of ours,
        such as the outcome ``reset``, fails its validation); the message says what
        happened. A request the upstream refused as malformed is ``invalid_prompt``,
        naming the request's own ``param`` (the upstream names its messages)."""
        failure = ending.failure
        message = ending.error or "the response failed"
        if failure is not None and failure.refused_request:
            return {
                "code": "invalid_prompt",
                "message": message,
                "param": self._param(failure.field),
            }
        outcome = getattr(failure, "outcome", "error")
        code = "rate_limit_exceeded" if outcome == "http_429" else "server_error"
        return {"code": code, "message": message}

    def _param(self, upstream_param: str | None) -> str | None:
        """The request's parameter that the upstream's ``messages[i]...`` stands for."""
        if upstream_param is None or not upstream_param.startswith("messages["):
            return upstream_param
        index, _, rest = upstream_param.removeprefix("messages[").partition("]")
        if not (index.isascii() and index.isdigit()) or int(index) >= len(self.message_params):
            return None
        return self.message_params[int(index)] + rest


def _output_text(text: str) -> dict[str, Any]:
    """A message's text part, its logprobs to come."""
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    """``item`` as it stands: its content parts, where it has them, copied too."""
    copy = dict(item)
    if "content" in item:
        copy["content"] = [dict(part) for part in item["content"]]
    return copy


def refused_request(response: Mapping[str, Any]) -> dict[str, Any] | None:
    """OpenAI's error body for a Response whose request the upstream refused as malformed
    (``ResponsesDialect.error``), which a plain create answers with a 400; None for any
    other."""
    error = response.get("error")
    if response.get("status") != "failed" or not isinstance(error, dict):
        return None
    if error.get("code") != "invalid_prompt":
        return None
    return openai_error(
        error["message"], "invalid_request_error", "invalid_value", error.get("param")
    )


def response_usage(usage: Mapping[str, Any]) -> dict[str, Any]:
    """A stage's usage as a Response reports it: the upstream's ``cached_tokens`` and
    ``reasoning_tokens`` where it gave them, else 0."""
    prompt = int(usage.get("prompt_tokens", 0))
    completion = int(usage.get("completion_tokens", 0))
    return {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": _detail(usage, "prompt_tokens_details", "cached_tokens"),
            "cache_write_tokens": 0,
        },
        "output_tokens": completion,
        "output_tokens_details": {
            "reasoning_tokens": _detail(usage, "completion_tokens_details", "reasoning_tokens")
        },
        "total_tokens": int(usage.get("total_tokens", prompt + completion)),
    }


def _detail(usage: Mapping[str, Any], details: str, name: str) -> int:
    found = usage.get(details)
    value = found.get(name) if isinstance(found, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _delta_logprob(token: Any) -> dict[str, Any]:
    """A token's logprob (Chat Completions' shape) as an ``output_text.delta`` has it."""
    if not isinstance(token, dict):
        return {"token": "", "logprob": 0.0, "top_logprobs": []}
    top = token.get("top_logprobs")
    return {
        "token": token.get("token", ""),
        "logprob": token.get("logprob", 0.0),
        "top_logprobs": [
            {"token": t.get("token"), "logprob": t.get("logprob")}
            for t in (top if isinstance(top, list) else ())
            if isinstance(t, dict)
        ],
    }


def _part_logprob(token: Any) -> dict[str, Any]:
    """A token's logprob as an output text part has it: with its bytes."""
    if not isinstance(token, dict):
        return {"token": "", "bytes": [], "logprob": 0.0, "top_logprobs": []}
    top = token.get("top_logprobs")
    return {
        "token": token.get("token", ""),
        "bytes": _bytes_of(token),
        "logprob": token.get("logprob", 0.0),
        "top_logprobs": [
            {"token": t.get("token", ""), "bytes": _bytes_of(t), "logprob": t.get("logprob", 0.0)}
            for t in (top if isinstance(top, list) else ())
            if isinstance(t, dict)
        ],
    }


def _bytes_of(token: Mapping[str, Any]) -> list[int]:
    """A token's bytes: as the upstream gave them, else its text's in UTF-8."""
    given = token.get("bytes")
    if isinstance(given, list):
        return given
    text = token.get("token")
    return list(text.encode()) if isinstance(text, str) else []
