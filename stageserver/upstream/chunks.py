"""The OpenAI chat-completion chunk format: the one place in stageserver that reads it.

A chunk's JSON is relayed to clients as the upstream sent it; it is parsed once, here,
for what the stage records and its dialect renders (of choice 0: its text, finish
reason, delta, logprobs and reasoning; the usage), for whether the answer can still be
continued (not once it streamed tool calls or reasoning), and for what ends a stage (a
chunk that is not a JSON object, an error object).
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import UpstreamErrorObject, UpstreamProtocolError
from ..stages.chunk_read import ChunkRead

_scan_json = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[attr-defined]
_JSON_SPACE = " \t\n\r"


def read_chunk(payload: bytes, upstream: str) -> ChunkRead:
    """What the chunk ``payload`` says (``stages.stage.ChunkRead``).

    Raises UpstreamProtocolError for a payload that is not a JSON object, and
    UpstreamErrorObject for an error object; ``upstream`` names the upstream in both."""
    chunk = _parse(payload)
    if not isinstance(chunk, dict):
        raise UpstreamProtocolError(
            f"upstream {upstream!r} sent a chunk that is not a JSON object: "
            f"{payload[:120].decode(errors='replace')!r}"
        )
    if "error" in chunk:
        raise UpstreamErrorObject(
            f"upstream {upstream!r} reported an error mid-stream: {_error_message(chunk['error'])}"
        )
    content: str | None = None
    finish_reason: str | None = None
    delta: dict[str, Any] | None = None
    logprobs: dict[str, Any] | None = None
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, dict) or choice.get("index", 0) != 0:
            continue
        given = choice.get("delta")
        if isinstance(given, dict):
            delta = given if delta is None else {**delta, **given}
            text = given.get("content")
            if text and isinstance(text, str):
                content = text if content is None else content + text
        if choice.get("finish_reason"):
            finish_reason = choice["finish_reason"]
        if isinstance(choice.get("logprobs"), dict):
            logprobs = choice["logprobs"]
    usage = chunk.get("usage")
    # Taken only as an object: anything else an upstream sends there says nothing usable.
    if not (isinstance(usage, dict) and usage):
        usage = None
    if delta is None:
        return ChunkRead(content, finish_reason, usage, None, logprobs)
    # vLLM named it reasoning_content, then reasoning; DeepSeek and llama.cpp the former.
    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
    if not (reasoning and isinstance(reasoning, str)):
        reasoning = None
    continuable = not (reasoning or delta.get("tool_calls"))
    return ChunkRead(content, finish_reason, usage, delta, logprobs, reasoning, continuable)


def _parse(payload: bytes) -> Any:
    """``json.loads(payload)``, or None where that raises; once per chunk, so the usual
    payload, an object with nothing after it, goes straight to the C scanner."""
    try:
        if payload[:1] == b"{":
            text = payload.decode("utf-8", "surrogatepass")  # what json.loads does
            try:
                value, end = _scan_json(text, 0)
            except StopIteration:
                return None
            if end == len(text) or not text[end:].strip(_JSON_SPACE):
                return value
            return None
        return json.loads(payload)
    except ValueError:
        return None


def _error_message(error: Any) -> str:
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return json.dumps(error)[:300]
