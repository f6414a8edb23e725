"""The OpenAI behaviour of the fake upstream: the handler that the HTTP server calls.

Endpoints:

* ``POST /v1/chat/completions`` (also ``/chat/completions``): streaming (SSE, one event per
  HTTP chunk) or non-streaming chat completions, shaped by the options in the model name
  (``options.py``): faults (an HTTP error status, a hang, a dropped connection, a malformed
  chunk, an error object mid-stream, misbehaviour after ``[DONE]``) and wire shapes (CRLF,
  events split at awkward places, multi-line data, comments, gzip).
* ``POST /v1/completions`` (also ``/completions``): a raw completion of a ChatML prompt
  that ends in an open assistant turn (``<|im_start|>assistant\n`` and the partial
  answer): the rest of the answer, as ``text_completion`` chunks. A prompt of any other
  shape is a 400.
* ``GET /v1/models`` (also ``/models``): one model, ``"fake"``.
* ``GET /health``: ``{"status":"ok"}``.
* The render probes (``probes.py``): llama-server's ``POST /apply-template``, vLLM's
  ``POST /tokenize`` and ``POST /detokenize``, and Ollama's ``POST /api/chat`` with
  ``"_debug_render_only": true``. Each shows the ChatML prompt (``chatml.py``) that its
  server would complete, the final assistant message's turn open or closed per the
  option ``continuation``.

With the option ``tool_calls=N``, the answer is N function tool calls (``tool_calls``
deltas, then finish_reason ``"tool_calls"``) instead of text; with
``tool_calls_until_result=1``, only until the conversation holds a tool's result (an
agent's loop). With ``reasoning=N``, N reasoning chunks come before the text. A request
with ``logprobs: true`` gets the tokens' logprobs. The image parts of a request are noted
(``UpstreamRequest.images``); with ``vision=0`` they are refused (``options.py``).

A conversation that ends with an assistant message P (a partial answer) is taken as the
option ``continuation`` says, as the servers do (``../shared/notes/continuation.md``):

* ``flag`` (vLLM): continued only with ``continue_final_message: true`` and
  ``add_generation_prompt: false``; else a closed turn;
* ``trailing`` (llama-server, Ollama): continued;
* ``prefix`` (Mistral, DeepSeek): continued when the message has ``prefix: true``, and
  the reply echoes P first;
* ``restart`` (llama-cpp-python), or none: a closed turn, the answer from the start.

Continued, the reply is what follows P in the scripted answer (``text``), cut at the
answer's own chunk boundaries; a P that does not begin the answer gets it from the
start. A fault's ``after`` counts from the start of the scripted answer, so a
continuation of a dropped stream is not dropped again at the same offset of its own
reply (``options.py``); with ``continued_status=<code>``, a continuation (chat, or raw)
is refused with that status instead.

``max_tokens``/``max_completion_tokens`` in the body cap the number of pieces (one token
each; finish_reason ``"length"``). A ``stop`` sequence (a string, or a list) that the
answer holds cuts it there, the sequence left out, and the last chunk's choice names it
in ``stop_reason``, as vLLM's does (finish_reason ``"stop"``). ``prompt_tokens`` is the
number of whitespace-separated words in the messages' text; the usage chunk is sent when
``stream_options.include_usage`` is true.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from collections.abc import Mapping
from typing import Any

from . import chatml, probes
from .connection import (
    ResponseWriter,
    UpstreamRequest,
    compact_json,
    error_body,
    response_head,
)
from .options import Options, pieces, resolve_options, split_text

__all__ = ["respond"]

_CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
_COMPLETION_PATHS = frozenset({"/v1/completions", "/completions"})
_PROBES = {
    "/apply-template": probes.apply_template,
    "/tokenize": probes.tokenize,
    "/detokenize": probes.detokenize,
    "/api/chat": probes.ollama_chat,
}
_FAULTS = frozenset({"drop", "stall", "malformed", "error_object"})
_MODEL_PATHS = frozenset({"/v1/models", "/models"})
_MODELS = {
    "object": "list",
    "data": [{"id": "fake", "object": "model", "created": 0, "owned_by": "fake"}],
}
_MALFORMED = '{"id": not json'
_ERROR_OBJECT = '{"error":{"message":"fake upstream error object","type":"server_error"}}'
_END = b"0\r\n\r\n"

_STREAM_HEADS: dict[tuple[bool, bool], bytes] = {
    (gz, keep): response_head(
        200,
        [
            ("Content-Type", "text/event-stream"),
            ("Cache-Control", "no-cache"),
            ("Transfer-Encoding", "chunked"),
            *([("Content-Encoding", "gzip")] if gz else []),
        ],
        keep,
    )
    for gz in (False, True)
    for keep in (False, True)
}


async def respond(
    request: UpstreamRequest, response: ResponseWriter, defaults: Mapping[str, object]
) -> bool:
    """Answer one request, as the HTTP server's handler."""
    method, path = request.method, request.path.split("?", 1)[0]
    if path in _CHAT_PATHS and method == "POST":
        return await _chat(request, response, defaults)
    if path in _COMPLETION_PATHS and method == "POST":
        return await _chat(request, response, defaults, raw=True)
    if path in _PROBES and method == "POST":
        return await _PROBES[path](request, response, defaults)
    if path in _MODEL_PATHS and method == "GET":
        return await response.send_json(200, _MODELS)
    if path == "/health" and method == "GET":
        return await response.send_json(200, {"status": "ok"})
    err = error_body(f"no route for {method} {path}", 404, "invalid_request_error")
    return await response.send_json(404, err)


def _prompt_tokens(body: Mapping[str, Any]) -> int:
    total = 0
    messages = body.get("messages")
    if not isinstance(messages, list):
        return 0
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            total += len(content.split())
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += len(part["text"].split())
    return total


async def _chat(
    rec: UpstreamRequest,
    response: ResponseWriter,
    defaults: Mapping[str, object],
    *,
    raw: bool = False,
) -> bool:
    body = rec.body
    if not isinstance(body, dict):
        err = error_body("request body must be a JSON object", 400, "invalid_request_error")
        return await response.send_json(400, err)
    model_name = body.get("model")
    base, _, query = (model_name if isinstance(model_name, str) else "fake").partition("?")
    model = base or "fake"
    rec.model = model
    rec.stream = body.get("stream") is True
    try:
        opts, rec.options = resolve_options(defaults, query)
    except ValueError as exc:
        return await response.send_json(400, error_body(str(exc), 400, "invalid_request_error"))

    if opts.mode == "hang":
        await response.pause(math.inf)
        return False
    if opts.mode == "status":
        return await _fail(response, opts, opts.status)
    rec.images, image_at = _images(body)
    if rec.images and not opts.vision:
        refusal = "image input is not supported by this model"
        err = error_body(refusal, 400, "invalid_request_error", param=image_at)
        return await response.send_json(400, err)

    partial: str | None = None
    if raw:
        partial = chatml.open_turn(body.get("prompt"))
        if partial is None:
            err = error_body(
                "prompt must be a ChatML conversation ending in an open assistant turn",
                400,
                "invalid_request_error",
            )
            return await response.send_json(400, err)
    calls = [] if raw else _tool_calls(body, opts, rec.index)
    if not raw and not calls:
        partial = _partial_answer(body, opts)
    if partial is not None and opts.continued_status:
        return await _fail(response, opts, opts.continued_status)
    covered = 0  # pieces of the scripted answer that the partial answer holds whole
    remainder = False  # the reply starts with the rest of a covered piece
    thoughts: list[str] = []
    choice_logprobs: dict[str, Any] | None = None
    suffixes: list[str] | None = None  # what each chunk's choice has after its delta
    stopped_at: str | None = None  # the stop sequence that ended the answer, if one did
    if calls:
        texts: list[str] = []
        deltas = _tool_call_deltas(calls, opts.chunks)
        finish = "tool_calls"
        message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": calls}
    else:
        texts = pieces(opts)
        if partial is not None:
            covered = _covered(texts, partial)
            remainder = len("".join(texts[:covered])) > len(partial)
            texts = _rest(texts, partial, echo=opts.continuation == "prefix" and not raw)
        finish = "stop"
        texts, stopped_at = _cut_at_stop(texts, body.get("stop"))
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        if isinstance(limit, int) and not isinstance(limit, bool) and 0 <= limit < len(texts):
            texts = texts[:limit]
            finish = "length"
        thoughts = [] if raw or partial is not None else _thoughts(opts.reasoning)
        deltas = [compact_json(text) for text in texts] if raw else _text_deltas(texts)
        message = {"role": "assistant", "content": "".join(texts)}
        if thoughts:
            deltas = [_reasoning_delta(opts.reasoning_field, t) for t in thoughts] + deltas
            message[opts.reasoning_field] = "".join(thoughts)
        if not raw and body.get("logprobs") is True:
            top = body.get("top_logprobs")
            logprobs = _logprobs(texts, top if isinstance(top, int) else 0)
            choice_logprobs = {"content": logprobs}
            suffixes = [""] * len(thoughts) + [
                ',"logprobs":{"content":[' + compact_json(token) + "]}" for token in logprobs
            ]
    # ``after`` is a position in the scripted answer: a continuation's reply starts
    # ``covered`` pieces in (its first piece may be the rest of the last of them, held
    # back whitespace), and one that starts at or past the fault is not cut again.
    fault_at: int | None = opts.after if opts.mode in _FAULTS else None
    if fault_at is not None and partial is not None:
        fault_at = fault_at - covered + remainder if fault_at > covered else None
    prompt = _prompt_tokens(body)
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": len(deltas),
        "total_tokens": prompt + len(deltas),
    }
    if thoughts:
        usage["completion_tokens_details"] = {"reasoning_tokens": len(thoughts)}
    ident = f"{'cmpl' if raw else 'chatcmpl'}-fake-{rec.index}"
    created = int(time.time()) if opts.created is None else opts.created
    if not rec.stream:
        delay = opts.prefill + opts.interval * max(len(deltas) - 1, 0)
        if not await response.pause(delay):
            return False
        completion = {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": choice_logprobs,
                    "finish_reason": finish,
                    **({} if stopped_at is None else {"stop_reason": stopped_at}),
                }
            ],
            "usage": usage,
        }
        drop = opts.reset if opts.mode == "drop" and fault_at is not None else None
        keep_alive = await response.send_json(200, completion, gzip=opts.gzip, drop=drop)
        if keep_alive:
            rec.chunks_sent = len(deltas)
        return keep_alive

    stream_options = body.get("stream_options")
    include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
    kind = "text_completion" if raw else "chat.completion.chunk"
    prefix = (
        f'{{"id":{compact_json(ident)},"object":"{kind}","created":{created},'
        f'"model":{compact_json(model)},"choices":'
    )
    stream = _ChatStream(rec, response, opts, prefix, "text" if raw else "delta")
    last = '""' if raw else '{"role":"assistant"}' if not deltas else "{}"
    return await stream.run(
        deltas, last, finish, usage if include_usage else None, fault_at, suffixes, stopped_at
    )


async def _fail(response: ResponseWriter, opts: Options, code: int) -> bool:
    """An HTTP error ``code`` with an OpenAI error body, after the ``prefill`` delay, with
    ``Retry-After`` when the options give one."""
    if not await response.pause(opts.prefill):
        return False
    failure = error_body("fake upstream failure", code)
    extra = [("Retry-After", opts.retry_after)] if opts.retry_after else []
    return await response.send_json(code, failure, headers=extra)


def _partial_answer(body: Mapping[str, Any], opts: Options) -> str | None:
    """The partial answer a conversation ends with, if this fake continues it."""
    messages = body.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else None
    if not isinstance(last, dict) or last.get("role") != "assistant":
        return None
    content = last.get("content")
    if not isinstance(content, str):
        return None
    mode = opts.continuation
    if mode == "trailing":
        return content
    if mode == "flag" and body.get("continue_final_message") is True:
        return content if body.get("add_generation_prompt") is False else None
    if mode == "prefix" and last.get("prefix") is True:
        return content
    return None


def _covered(texts: list[str], partial: str) -> int:
    """How many pieces of the answer ``texts`` the partial answer holds, but for the
    whitespace after it (which a continuing client holds back, whole pieces of it
    included): none when ``partial`` does not begin the answer (the reply is then the
    answer from the start)."""
    answer = "".join(texts)
    if not answer.startswith(partial):
        return 0
    count, end = 0, 0
    for text in texts:
        end += len(text)
        if end > len(partial) and answer[len(partial) : end].strip():
            break
        count += 1
    return count


def _rest(texts: list[str], partial: str, *, echo: bool) -> list[str]:
    """What follows ``partial`` in the answer ``texts``, cut at the answer's own chunk
    boundaries (the first piece may be the rest of one); ``echo``: ``partial`` first, as
    Mistral's reply repeats its prefix. A ``partial`` that does not begin the answer gets
    the answer from the start, as a server that took the turn as closed would send."""
    answer = "".join(texts)
    if not answer.startswith(partial):
        return texts
    rest, end = [], 0
    for text in texts:
        start, end = end, end + len(text)
        if end > len(partial):
            rest.append(text[max(len(partial) - start, 0) :])
    if echo:
        rest[:1] = [partial + (rest[0] if rest else "")]
    return rest


def _images(body: Mapping[str, Any]) -> tuple[list[str], str]:
    """The URLs of the messages' image parts, and where the first is (``param``)."""
    urls: list[str] = []
    first = ""
    messages = body.get("messages")
    for m, message in enumerate(messages if isinstance(messages, list) else ()):
        content = message.get("content") if isinstance(message, dict) else None
        for p, part in enumerate(content if isinstance(content, list) else ()):
            image = part.get("image_url") if isinstance(part, dict) else None
            if part.get("type") == "image_url" and isinstance(image, dict):
                urls.append(str(image.get("url")))
                first = first or f"messages[{m}].content[{p}]"
    return urls, first


def _cut_at_stop(texts: list[str], stop: Any) -> tuple[list[str], str | None]:
    """The answer ``texts`` up to the first of the request's ``stop`` sequences it holds
    (left out, as the servers leave it out), cut at its own chunk boundaries; and that
    sequence (None: no cut)."""
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    answer = "".join(texts)
    found = [(answer.find(s), s) for s in stops if isinstance(s, str) and s and s in answer]
    if not found:
        return texts, None
    cut, sequence = min(found)
    kept, end = [], 0
    for text in texts:
        start, end = end, end + len(text)
        if start >= cut:
            break
        kept.append(text[: cut - start])
    return kept, sequence


def _thoughts(count: int) -> list[str]:
    """A reasoning model's reasoning, one piece per chunk."""
    return [f"think{i} " for i in range(count)]


def _reasoning_delta(name: str, text: str) -> str:
    return "{" + compact_json(name) + ":" + compact_json(text) + "}"


def _logprobs(texts: list[str], top: int) -> list[dict[str, Any]]:
    """Each piece's logprob, as Chat Completions gives a token's, with ``top``
    alternatives (the piece itself first)."""
    tokens = []
    for i, text in enumerate(texts):
        logprob = -(i + 1) / 10
        names = [text if j == 0 else f"alt{j}" for j in range(top)]
        alternatives = [
            {"token": name, "logprob": logprob - j, "bytes": list(name.encode())}
            for j, name in enumerate(names)
        ]
        tokens.append(
            {
                "token": text,
                "logprob": logprob,
                "bytes": list(text.encode()),
                "top_logprobs": alternatives,
            }
        )
    return tokens


def _text_deltas(texts: list[str]) -> list[str]:
    """The ``delta`` of each content chunk: the role in the first one only."""
    return [
        ('{"role":"assistant","content":' if i == 0 else '{"content":') + compact_json(text) + "}"
        for i, text in enumerate(texts)
    ]


def _tool_calls(body: Mapping[str, Any], opts: Options, index: int) -> list[dict[str, Any]]:
    """The ``tool_calls`` option's calls, as a whole message holds them: each named after
    the request's tool of its index (or its last tool), so a client's tools are called."""
    if opts.tool_calls_until_result and _holds_a_tool_result(body):
        return []
    names: list[str] = []
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            names.append(function["name"])
    calls = []
    for i in range(opts.tool_calls):
        name = names[min(i, len(names) - 1)] if names else f"tool{i}"
        arguments = opts.tool_args
        if arguments is None:
            arguments = compact_json({"city": "Paris", "call": i})
        calls.append(
            {
                "id": f"call_fake_{index}_{i}",
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
        )
    return calls


def _holds_a_tool_result(body: Mapping[str, Any]) -> bool:
    """Whether the conversation has a ``tool`` message: a tool's result, sent back."""
    messages = body.get("messages")
    return any(
        isinstance(message, dict) and message.get("role") == "tool"
        for message in (messages if isinstance(messages, list) else ())
    )


def _tool_call_deltas(calls: list[dict[str, Any]], chunks: int) -> list[str]:
    """The ``delta`` of each chunk that streams ``calls``: per call, one with its index,
    id, type and name (and ``arguments: ""``), then its arguments in ``chunks`` fragments."""
    deltas = []
    for i, call in enumerate(calls):
        head = {
            "index": i,
            "id": call["id"],
            "type": "function",
            "function": {"name": call["function"]["name"], "arguments": ""},
        }
        role = '"role":"assistant","content":null,' if i == 0 else ""
        deltas.append("{" + role + '"tool_calls":[' + compact_json(head) + "]}")
        for fragment in split_text(call["function"]["arguments"], chunks):
            part = {"index": i, "function": {"arguments": fragment}}
            deltas.append('{"tool_calls":[' + compact_json(part) + "]}")
    return deltas


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _awkward_parts(data: bytes) -> list[bytes]:
    """Split an SSE event at awkward places: after ``data:``, between CR and LF, inside a
    multi-byte UTF-8 character, in the middle, and before the final byte."""
    cuts = {5, len(data) // 2, len(data) - 1}
    first_crlf = data.find(b"\r\n")
    if first_crlf >= 0:
        cuts.add(first_crlf + 1)
        cuts.add(data.rfind(b"\r\n") + 1)
    for pos, byte in enumerate(data):
        if byte >= 0xC0:
            cuts.add(pos + 1)
            break
    edges = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False) if b > a]


class _Wire:
    """Per-response SSE encoder: line endings, comments, multiline data, gzip, chunk framing."""

    __slots__ = ("eol", "comment", "multiline", "split", "comp", "pending", "simple")

    def __init__(self, opts: Options, head: bytes) -> None:
        self.eol = "\r\n" if opts.crlf else "\n"
        self.comment = ": keep-alive" + self.eol if opts.comments else ""
        self.multiline = opts.multiline
        self.split = opts.split
        self.comp = zlib.compressobj(6, zlib.DEFLATED, 31) if opts.gzip else None
        self.pending = head  # response head not yet written (headers_first=0)
        self.simple = not (opts.split or opts.gzip)  # one write per event, no transformation

    def event(self, payload: str, *, pretty: bool = True) -> bytes:
        eol = self.eol
        if self.multiline and pretty:
            lines = json.dumps(json.loads(payload), indent=1, ensure_ascii=False).split("\n")
            data = "".join(f"data: {line}{eol}" for line in lines)
        else:
            data = f"data: {payload}{eol}"
        return (self.comment + data + eol).encode()

    def frames(self, sse: bytes) -> list[bytes]:
        if self.comp is not None:
            body = self.comp.compress(sse) + self.comp.flush(zlib.Z_SYNC_FLUSH)
            if not self.split:
                return [_chunk(body)]
            half = len(body) // 2
            return [_chunk(part) for part in (body[:half], body[half:]) if part]
        if not self.split:
            return [_chunk(sse)]
        return [_chunk(part) for part in _awkward_parts(sse)]

    def end(self) -> bytes:
        if self.comp is None:
            return _END
        tail = self.comp.flush()
        return (_chunk(tail) if tail else b"") + _END


class _ChatStream:
    """One streamed completion: its chunks, its fault if any, ``[DONE]`` and the end."""

    def __init__(
        self,
        rec: UpstreamRequest,
        response: ResponseWriter,
        opts: Options,
        prefix: str,
        field: str = "delta",
    ) -> None:
        self.rec = rec
        self.response = response
        self.opts = opts
        self.prefix = prefix  # every chunk's JSON up to its choices
        self.field = field  # what a choice holds: a chat chunk's delta, a completion's text
        self.head = _STREAM_HEADS[(opts.gzip, response.keep_alive)]
        self.wire = _Wire(opts, b"" if opts.headers_first else self.head)

    async def run(
        self,
        deltas: list[str],
        last: str,
        finish: str,
        usage: dict[str, Any] | None,
        fault_at: int | None,
        suffixes: list[str] | None = None,
        stopped_at: str | None = None,
    ) -> bool:
        """Stream a chunk per delta (JSON), then ``last`` with ``finish``, and the usage;
        the mode's fault after ``fault_at`` of the deltas (None: no fault). ``suffixes``:
        what each delta's choice holds after it (its logprobs); ``stopped_at``: the stop
        sequence that ended the answer, which the last chunk names (vLLM's
        ``stop_reason``)."""
        rec, response, opts, wire, prefix = (
            self.rec, self.response, self.opts, self.wire, self.prefix
        )  # fmt: skip
        rec.status = 200
        if opts.headers_first:
            if not await response.send(self.head):
                return False
            rec.headers_sent_at = time.monotonic()
        if not await response.pause(opts.prefill):
            return False

        delta_prefix = prefix + f'[{{"index":0,"{self.field}":'
        suffix = ',"finish_reason":null}]}'
        cut = -1 if fault_at is None else min(fault_at, len(deltas))

        for i in range(len(deltas) + 1):
            if i == cut:
                if opts.mode == "drop":
                    if wire.pending and await response.send(wire.pending):
                        rec.headers_sent_at = time.monotonic()
                    await response.drop(opts.reset)
                    return False
                if opts.mode == "stall":  # silent, the connection open, until the client leaves
                    await response.pause(math.inf)
                    return False
                if opts.mode == "malformed":
                    if not await self.emit(wire.event(_MALFORMED, pretty=False)):
                        return False
                else:  # error_object: the error event, then [DONE] and a clean end
                    if not await self.emit(wire.event(_ERROR_OBJECT)):
                        return False
                    return await self.finish()
            if i == len(deltas):
                break
            if i and not await response.pause(opts.interval):
                return False
            after = suffix if suffixes is None else suffixes[i] + suffix
            if not await self.emit(wire.event(delta_prefix + deltas[i] + after)):
                return False
            rec.chunks_sent += 1

        stop_reason = "" if stopped_at is None else f',"stop_reason":{compact_json(stopped_at)}'
        final = (
            prefix
            + f'[{{"index":0,"{self.field}":{last},"finish_reason":{compact_json(finish)}'
            + stop_reason
            + "}]}"
        )
        if not await self.emit(wire.event(final)):
            return False
        if usage is not None:
            usage_event = prefix + f'[],"usage":{compact_json(usage)}}}'
            if not await self.emit(wire.event(usage_event)):
                return False
        return await self.finish()

    async def emit(self, sse: bytes) -> bool:
        """Write one event, in frames as the wire shape wants, the head first if not sent."""
        response, wire = self.response, self.wire
        if wire.simple and not wire.pending:
            return await response.send(b"%x\r\n%s\r\n" % (len(sse), sse))
        for number, frame in enumerate(wire.frames(sse)):
            if number and not await response.pause(0.001):
                return False
            head = wire.pending
            if head:
                wire.pending = b""
                if not await response.send(head + frame):
                    return False
                self.rec.headers_sent_at = time.monotonic()
            elif not await response.send(frame):
                return False
        return True

    async def finish(self) -> bool:
        """Send ``data: [DONE]`` and the terminating chunk (or misbehave per ``after_done``)."""
        response, opts = self.response, self.opts
        if not await self.emit(self.wire.event("[DONE]", pretty=False)):
            return False
        self.rec.done_sent = True
        if opts.after_done == "hang":
            await response.pause(math.inf)
            return False
        if opts.after_done == "reset":
            await response.drop(True)
            return False
        return await response.send(self.wire.end()) and response.keep_alive
