"""How a fake upstream request asks for its behaviour: options in the model name.

A request chooses through its model name, ``"fake?mode=drop&after=3&chunks=10"`` (parsed
with :func:`urllib.parse.parse_qs`; per-request values win over the server-wide defaults):

``chunks`` (5), ``interval`` (0 s between content chunks), ``prefill`` (0 s before the first
chunk), ``headers_first`` (1), ``text`` (split into ``chunks`` nearly-equal pieces by
characters; default pieces are ``"tok0 "``, ``"tok1 "``, ...), ``mode`` (``normal``, ``status``
+ ``status=<code>`` and optionally ``retry_after=<seconds or HTTP date>``, sent as the
``Retry-After`` header), ``hang``, ``drop`` + ``after``/``reset``, ``malformed`` + ``after``,
``error_object`` + ``after``, ``stall`` + ``after`` (silent after that many content
chunks, the connection open)), ``continuation`` (``flag``, ``trailing``, ``prefix``,
``restart``: see ``openai.py``; it also decides what the render probes of ``probes.py``
show), ``continued_status`` (0: off; else a request that continues a partial answer gets
this HTTP status and an error body, as with ``mode=status``), ``after_done`` (``hang`` |
``reset``), wire shapes ``crlf``, ``split``, ``multiline``, ``comments``, ``gzip``, and
``created`` (a fixed timestamp). Unknown keys are kept in the record and otherwise ignored.

``after`` counts pieces of the scripted answer, not of one reply: a request that continues
a partial answer covering k whole pieces faults after ``after - k`` pieces of its reply,
and not at all when that is 0 or less. So a stream dropped after 20 of 60 chunks is
continued by a request that is not cut again.

``tool_calls`` (0): when 1 or more, the answer is that many function tool calls instead of
text, with ``finish_reason: "tool_calls"``. Call ``i`` is named after the request's
``tools[i]`` (the last one when there are fewer; ``tool<i>`` when it has none), has the
id ``call_fake_<request index>_<i>`` and the arguments ``tool_args`` (default
``{"city":"Paris","call":<i>}``). Streamed, each call is a first ``tool_calls`` delta with
``index``, ``id``, ``type: "function"`` and ``function: {name, arguments: ""}``, then its
arguments in ``chunks`` fragments (nearly equal, by characters). Each delta counts as a
chunk, for ``after``, ``chunks_sent`` and the usage's ``completion_tokens``; ``max_tokens``
cuts nothing. Not streamed, ``message.tool_calls`` holds them all.

``tool_calls_until_result`` (0): 1 makes the calls an agent's first turn only. A
conversation that already holds a ``tool`` message (a tool's result, sent back by the
client that ran the call) is answered with text, as a model answers once its tools have
run; so a client's whole loop (call, run the tool, send its result, read the answer)
runs against one model name.

``reasoning`` (0): a reasoning model's answer: that many reasoning chunks first (``think0 ``,
``think1 ``, ...), each a delta of ``reasoning_field`` (``reasoning_content``, as DeepSeek
and llama.cpp name it; ``reasoning``, as newer vLLM does), then the text. They count as
chunks and as completion tokens, and the usage says so
(``completion_tokens_details.reasoning_tokens``). Not streamed, the message holds them in
that field.

``vision`` (1): 0 makes a text-only model, which answers a request with an image part 400,
naming it in ``param`` (``messages[0].content[1]``), as llama-server without its
projector does.

A request with ``logprobs: true`` gets each content chunk's ``logprobs`` (``{"content":
[{token, logprob, bytes, top_logprobs}]}``, the logprob of piece ``i`` being
``-(i + 1) / 10``), with ``top_logprobs`` alternatives each (the piece, then ``alt1``,
``alt2``, ...); not streamed, ``choices[0].logprobs`` holds them all.

"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qs

__all__ = ["Options", "pieces", "resolve_options", "split_text"]

_MODES = frozenset({"normal", "status", "hang", "drop", "stall", "malformed", "error_object"})
#: How the fake takes a conversation that ends with the assistant's partial answer.
CONTINUATIONS = frozenset({"", "flag", "trailing", "prefix", "restart"})
_AFTER_DONE = frozenset({"", "none", "hang", "reset"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def _flag(value: str) -> bool:
    low = value.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"not a 0/1 flag: {value!r}")


def _seconds(value: str) -> float:
    result = float(value)
    if math.isnan(result) or result < 0:
        raise ValueError(f"not a duration: {value!r}")
    return result


def _header_value(value: str) -> str:
    if not value.isprintable():
        raise ValueError(f"not a header value: {value!r}")
    return value.strip()


def _count(value: str) -> int:
    result = int(value)
    if result < 0:
        raise ValueError(f"negative count: {value!r}")
    return result


@dataclass
class Options:
    chunks: int = 5
    interval: float = 0.0
    prefill: float = 0.0
    headers_first: bool = True
    text: str | None = None
    mode: str = "normal"
    status: int = 500
    retry_after: str = ""  # the Retry-After header of a status answer; empty: none
    after: int = 2
    reset: bool = False
    after_done: str = ""
    crlf: bool = False
    split: bool = False
    multiline: bool = False
    comments: bool = False
    gzip: bool = False
    created: int | None = None  # a fixed "created" stamp, so tests can compare exact bytes
    tool_calls: int = 0  # answer with this many function tool calls instead of text
    tool_args: str | None = None  # the calls' arguments; None: {"city":"Paris","call":<i>}
    tool_calls_until_result: bool = False  # text, not calls, once a tool's result is sent
    reasoning: int = 0  # reasoning chunks before the answer
    reasoning_field: str = "reasoning_content"
    vision: bool = True  # False: a request with an image part is refused (400)
    #: How a trailing assistant message is taken (``openai.py``): "" as a closed turn.
    continuation: str = ""
    continued_status: int = 0  # the HTTP status of a continuation; 0: answered as usual


_CONVERTERS: dict[str, Callable[[str], object]] = {
    "chunks": _count,
    "interval": _seconds,
    "prefill": _seconds,
    "headers_first": _flag,
    "text": str,
    "mode": lambda v: v.strip().lower() or "normal",
    "status": int,
    "retry_after": _header_value,
    "after": _count,
    "reset": _flag,
    "after_done": lambda v: v.strip().lower(),
    "crlf": _flag,
    "split": _flag,
    "multiline": _flag,
    "comments": _flag,
    "gzip": _flag,
    "created": int,
    "tool_calls": _count,
    "tool_args": str,
    "tool_calls_until_result": _flag,
    "continuation": lambda v: v.strip().lower(),
    "continued_status": int,
    "reasoning": _count,
    "reasoning_field": lambda v: v.strip(),
    "vision": _flag,
}


def resolve_options(
    defaults: Mapping[str, object], query: str
) -> tuple[Options, dict[str, object]]:
    """Merge server defaults and the model-name query; return typed options and the
    record of them. A bad value raises ValueError naming it."""
    raw = {str(key): str(value) for key, value in defaults.items()}
    for key, values in parse_qs(query, keep_blank_values=True).items():
        raw[key] = values[-1]
    opts = Options()
    extras: dict[str, object] = {}
    for key, value in raw.items():
        convert = _CONVERTERS.get(key)
        if convert is None:
            extras[key] = value
            continue
        try:
            setattr(opts, key, convert(value))
        except ValueError as exc:
            raise ValueError(f"bad option {key}={value!r}: {exc}") from None
    if opts.mode not in _MODES:
        raise ValueError(f"unknown mode {opts.mode!r}")
    if opts.continuation not in CONTINUATIONS:
        raise ValueError(f"unknown continuation {opts.continuation!r}")
    if opts.reasoning_field not in ("reasoning_content", "reasoning"):
        raise ValueError(f"unknown reasoning_field {opts.reasoning_field!r}")
    if opts.after_done not in _AFTER_DONE:
        raise ValueError(f"unknown after_done {opts.after_done!r}")
    if not 100 <= opts.status <= 599:
        raise ValueError(f"bad status {opts.status}")
    if opts.continued_status and not 100 <= opts.continued_status <= 599:
        raise ValueError(f"bad continued_status {opts.continued_status}")
    if math.isinf(opts.interval):
        raise ValueError("interval must be finite")
    record: dict[str, object] = {name: getattr(opts, name) for name in _CONVERTERS}
    record.update(extras)
    return opts, record


def pieces(opts: Options) -> list[str]:
    """The content of the answer, one piece per chunk (one token each)."""
    if opts.text is None:
        return [f"tok{i} " for i in range(opts.chunks)]
    return split_text(opts.text, opts.chunks)


def split_text(text: str, chunks: int) -> list[str]:
    """``text`` in ``chunks`` nearly-equal pieces by characters (fewer if it is shorter)."""
    count = min(chunks, len(text))
    if count == 0:
        return []
    size = len(text)
    return [text[i * size // count : (i + 1) * size // count] for i in range(count)]
