"""Counting a conversation's prompt tokens with the upstream's own tokenizer, where it has
one that takes a conversation:

- ``vllm``: ``POST /tokenize`` (at the server's root) with the model, the messages, the
  tools and ``add_generation_prompt: true``; its ``count``;
- ``llamacpp``: ``POST /apply-template`` with the messages and tools (the prompt its
  chat template renders), then ``POST /tokenize`` with that prompt as ``content``; the
  number of its ``tokens``.

Other kinds (``openai``, ``ollama``) have none. The first replica of the upstream is
asked, once, within ``timeout`` seconds; any failure (it is down, it has no such
endpoint, as llama-cpp-python has not, its answer is of another shape) gives None, and
the caller estimates (``stages/usage.py``). A failure is logged once per upstream and
kind of failure (logger ``stageserver.tokenize``), with no body and no secret.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import httpx2
import openai

from ..stages.conversation import Conversation
from .clients import ReplicaClient

log = logging.getLogger("stageserver.tokenize")

#: The upstream kinds whose servers tokenize a conversation.
KINDS = ("vllm", "llamacpp")

_failed: set[tuple[str, str]] = set()
_lock = threading.Lock()


def count_prompt_tokens(
    upstream: ReplicaClient, conversation: Conversation, timeout: float
) -> int | None:
    """The prompt tokens of ``conversation`` (its messages and ``passed`` tools), counted
    by ``upstream``'s tokenizer; None where it has none, or it did not answer."""
    kind = upstream.config.kind
    if kind not in KINDS:
        return None
    tools = conversation.passed.get("tools")
    try:
        if kind == "vllm":
            return _vllm(upstream, conversation, tools, timeout)
        return _llamacpp(upstream, conversation.messages, tools, timeout)
    except (openai.OpenAIError, httpx2.HTTPError, ValueError, KeyError, TypeError) as exc:
        _log_once(upstream, exc)
        return None


def _vllm(
    upstream: ReplicaClient, conversation: Conversation, tools: Any, timeout: float
) -> int | None:
    body: dict[str, Any] = {
        "model": upstream.config.model_for(conversation.model),
        "messages": list(conversation.messages),
        "add_generation_prompt": True,
    }
    if tools:
        body["tools"] = tools
    count = _post(upstream, "/tokenize", body, timeout)["count"]
    return _whole(count)


def _llamacpp(
    upstream: ReplicaClient, messages: Sequence[Mapping[str, Any]], tools: Any, timeout: float
) -> int | None:
    body: dict[str, Any] = {"messages": list(messages)}
    if tools:
        body["tools"] = tools
    prompt = _post(upstream, "/apply-template", body, timeout)["prompt"]
    if not isinstance(prompt, str):
        raise TypeError("/apply-template gave no prompt")
    tokens = _post(upstream, "/tokenize", {"content": prompt, "add_special": True}, timeout)
    found = tokens["tokens"]
    if not isinstance(found, list):
        raise TypeError("/tokenize gave no tokens")
    return len(found)


def _whole(count: Any) -> int:
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise TypeError("/tokenize gave no count")
    return count


def _post(upstream: ReplicaClient, path: str, body: Mapping[str, Any], timeout: float) -> Any:
    """``path`` under the server's root (its tokenizer is not under ``/v1``)."""
    url = upstream.config.url.rstrip("/")
    root = url[: -len("/v1")] if url.endswith("/v1") else url
    response = upstream.client.post(
        f"{root}{path}",
        body=body,
        cast_to=httpx2.Response,
        options={"timeout": timeout, "max_retries": 0},
    )
    answer = response.json()
    if not isinstance(answer, dict):
        raise TypeError(f"{path} did not answer a JSON object")
    return answer


def _log_once(upstream: ReplicaClient, exc: BaseException) -> None:
    kind = type(exc).__name__
    with _lock:
        if (upstream.name, kind) in _failed:
            return
        _failed.add((upstream.name, kind))
    detail = f"HTTP {exc.status_code}" if isinstance(exc, openai.APIStatusError) else kind
    log.warning(
        "upstream %r did not count tokens (%s): count_tokens estimates them", upstream.name, detail
    )
