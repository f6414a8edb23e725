"""The endpoints that show a server's rendered prompt, as stageserver's startup probe asks
them whether a partial answer would be continued (``../shared/notes/continuation.md`` D1).

Each answers as its server does, with the fake's ChatML (``chatml.py``); whether a final
assistant message is left open follows the option ``continuation``, read from the model
name's query over the server-wide defaults (``options.py``), so one fake can play a
server that prefills and one that does not:

* llama-server's ``POST /apply-template``: ``{"messages"}`` → ``{"prompt"}``. Open when
  ``continuation=trailing`` (llama-server's default prefill), else closed plus the
  generation prompt. The real body names no model, so the defaults decide; a ``model``
  with a query is honoured all the same.
* vLLM's ``POST /tokenize`` (at the root, as vLLM serves it): ``{"model", "messages",
  "add_generation_prompt": true, "continue_final_message": false}`` → ``{"count",
  "max_model_len": 8192, "tokens"}``, a token per character (its code point); or
  ``{"model", "prompt"}`` for a plain prompt. Both flags true is vLLM's 400. Open only
  with ``continuation=flag``, ``continue_final_message: true`` and
  ``add_generation_prompt: false``. ``POST /detokenize``: ``{"model", "tokens"}`` →
  ``{"prompt"}``. llama-server's ``POST /tokenize``, ``{"content"}`` → ``{"tokens"}``
  (one per character too), is answered at the same path.
* Ollama's ``POST /api/chat`` with ``"_debug_render_only": true``: Ollama's own answer,
  the prompt in ``_debug_info.rendered_template`` beside an empty message and
  ``done: false``. Open when ``continuation=trailing`` (library templates leave the last
  assistant message open). Anything else on ``/api/chat`` is a 400: the fake generates
  only through the OpenAI endpoints.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from . import chatml
from .connection import ResponseWriter, UpstreamRequest, error_body
from .options import Options, resolve_options

__all__ = ["apply_template", "detokenize", "ollama_chat", "tokenize"]

MAX_MODEL_LEN = 8192
BOTH_FLAGS = "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
RENDER_ONLY = "only render-only requests are served here"
_UNICODE = range(0x110000)
_SURROGATES = range(0xD800, 0xE000)


async def apply_template(
    rec: UpstreamRequest, response: ResponseWriter, defaults: Mapping[str, object]
) -> bool:
    """llama-server's ``POST /apply-template``."""
    try:
        body, opts = _request(rec, defaults)
        messages = body.get("messages")
        prefill = opts.continuation == "trailing" and chatml.ends_with_assistant(messages)
        prompt = chatml.render(messages, open_final=prefill)
    except ValueError as exc:
        return await response.send_json(400, error_body(str(exc), 400, "invalid_request_error"))
    return await response.send_json(200, {"prompt": prompt})


async def tokenize(
    rec: UpstreamRequest, response: ResponseWriter, defaults: Mapping[str, object]
) -> bool:
    """vLLM's ``POST /tokenize``: a chat's render, or a prompt, one token per character;
    or llama-server's, for a body with ``content``: ``{"tokens"}``."""
    try:
        body, opts = _request(rec, defaults)
        if "content" in body:
            content = body["content"]
            if not isinstance(content, str):
                raise ValueError("'content' must be a string")
            return await response.send_json(200, {"tokens": [ord(char) for char in content]})
        prompt = _tokenized_text(body, opts)
    except ValueError as exc:
        return await response.send_json(400, error_body(str(exc), 400, "BadRequestError"))
    tokens = [ord(char) for char in prompt]
    answer = {"count": len(tokens), "max_model_len": MAX_MODEL_LEN, "tokens": tokens}
    return await response.send_json(200, answer)


async def detokenize(
    rec: UpstreamRequest, response: ResponseWriter, defaults: Mapping[str, object]
) -> bool:
    """vLLM's ``POST /detokenize``: the text of ``/tokenize``'s tokens."""
    try:
        body, _ = _request(rec, defaults)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(_is_token(token) for token in tokens):
            raise ValueError("'tokens' must be a list of token ids")
    except ValueError as exc:
        return await response.send_json(400, error_body(str(exc), 400, "BadRequestError"))
    return await response.send_json(200, {"prompt": "".join(map(chr, tokens))})


async def ollama_chat(
    rec: UpstreamRequest, response: ResponseWriter, defaults: Mapping[str, object]
) -> bool:
    """Ollama's ``POST /api/chat``, render-only."""
    try:
        body, opts = _request(rec, defaults)
        if body.get("_debug_render_only") is not True:
            raise ValueError(RENDER_ONLY)
        messages = body.get("messages")
        prefill = opts.continuation == "trailing" and chatml.ends_with_assistant(messages)
        prompt = chatml.render(messages, open_final=prefill)
    except ValueError as exc:
        return await response.send_json(400, {"error": str(exc)})  # Ollama's error shape
    answer = {
        "model": body.get("model", ""),
        "created_at": _go_time(time.time_ns()),
        "message": {"role": "", "content": ""},  # Go's zero Message: Ollama sets none
        "done": False,
        "_debug_info": {"rendered_template": prompt},  # image_count: omitted when 0
    }
    return await response.send_json(200, answer)


def _request(
    rec: UpstreamRequest, defaults: Mapping[str, object]
) -> tuple[dict[str, Any], Options]:
    """The JSON body and the options its model name's query gives over the defaults
    (noted on the record as for a completion); ValueError when either is bad."""
    body = rec.body
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    model = body.get("model")
    base, _, query = model.partition("?") if isinstance(model, str) else ("", "", "")
    rec.model = base or "fake"
    opts, rec.options = resolve_options(defaults, query)
    return body, opts


def _tokenized_text(body: Mapping[str, Any], opts: Options) -> str:
    """What ``/tokenize`` counts: a plain ``prompt``, or the chat as the flags render it."""
    if "messages" not in body:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise ValueError("either 'messages' or a string 'prompt' is required")
        return prompt
    generation = body.get("add_generation_prompt", True) is True
    continue_final = body.get("continue_final_message", False) is True
    if generation and continue_final:
        raise ValueError(BOTH_FLAGS)
    messages = body["messages"]
    prefill = (
        opts.continuation == "flag" and continue_final and chatml.ends_with_assistant(messages)
    )
    return chatml.render(messages, open_final=prefill, generation_prompt=generation)


def _is_token(token: object) -> bool:
    """A character's code point: what ``/tokenize`` hands out, and JSON can carry back."""
    return (
        isinstance(token, int)
        and not isinstance(token, bool)
        and token in _UNICODE
        and token not in _SURROGATES
    )


def _go_time(ns: int) -> str:
    """``ns`` since the epoch as Go marshals a UTC ``time.Time`` (RFC 3339, nanoseconds
    without trailing zeros), as Ollama's ``created_at``."""
    seconds, fraction = divmod(ns, 1_000_000_000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    digits = f"{fraction:09d}".rstrip("0")
    return f"{stamp}.{digits}Z" if digits else f"{stamp}Z"
