"""Continuing a partial answer: how each upstream takes one, and the request that asks.

An answer cut short (its upstream failed after the first token, its worker died, its
worker was deployed away) is finished by asking the same upstream to continue the text
delivered so far. Servers do it in one of four ways (``../docs/surviving-failures.md``
has the table), and a server that cannot do it does not say so: llama-cpp-python answers
200 to every shape and starts a new answer, which the client would read twice. So each
upstream has a mode, ``continuation`` in its config:

- ``flag``: a trailing assistant message, ``continue_final_message: true`` and
  ``add_generation_prompt: false`` (vLLM, SGLang, TGI);
- ``trailing``: a trailing assistant message, no field (llama-server, Ollama);
- ``prefix``: the assistant message with ``prefix: true``; the reply repeats the prefix
  first, which is stripped (Mistral, DeepSeek);
- ``raw``: ``/completions`` with the prompt the model's chat template renders, then the
  text (any llama.cpp model, llama-cpp-python included); the template is the upstream's
  ``chat_template`` file, else what the upstream renders (llama-server's
  ``/apply-template``);
- ``none``: never continued;
- ``auto``: by the upstream's kind, confirmed by a probe in each process, once. ``vllm``
  renders a continued conversation through ``/tokenize`` and ``/detokenize``,
  ``llamacpp`` through ``/apply-template``, ``ollama`` with its render-only option: the
  mode holds only if the rendered prompt ends in the partial answer. ``openai``, and a
  probe that fails, give ``none``. A probe that could not reach its upstream is asked
  again the next time; any other answer is kept, and logged once.

The request (``continuation_request``): the prefix is the text delivered with its
trailing whitespace held back (a template may trim it, and a prompt that ends in a space
is one the model has rarely seen); the held-back whitespace is dropped from the reply if
the reply starts with it. The budget is what the original ``max_tokens`` has left. The
temperature and the other sampling fields are the stage's; nothing asks for an echo.

``ContinuedReply`` reads the reply as the stage takes it: a ``/completions`` chunk becomes
a chat chunk, and what the reply repeats is stripped. Only its first chunks are touched;
the rest pass through as the upstream sent them.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx2
import openai

from ..errors import ConfigError, StageFailure
from ..sse import compact_json
from ..stages.chunk_read import ChunkRead
from .clients import ReplicaClient, UpstreamRegistry

if TYPE_CHECKING:
    from .template import ChatTemplate

log = logging.getLogger("stageserver.continuation")

#: A mode that continues an answer; ``none`` does not.
CONTINUING = ("flag", "trailing", "prefix", "raw")
#: The sampling fields a ``/completions`` request takes as a chat request does.
_COMPLETION_FIELDS = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")
_PROBE_ANSWER = "The quick brown fox jumps"
_PROBE_MESSAGES = (
    {"role": "user", "content": "Finish this sentence."},
    {"role": "assistant", "content": _PROBE_ANSWER},
)


@dataclass(frozen=True)
class ContinuationMode:
    """An upstream's mode, and how it was decided: ``given`` (configured), ``probed``
    or ``default`` (by its kind, with no probe); ``detail`` says why, in words."""

    mode: str
    source: str
    detail: str = ""

    @property
    def continues(self) -> bool:
        return self.mode in CONTINUING

    def report(self) -> dict[str, str]:
        return {"mode": self.mode, "source": self.source, "detail": self.detail}


class ContinuationUnavailable(StageFailure):
    """The continuation could not even be asked for (no template to render, say)."""


class ContinuationModes:
    """Each upstream's mode in this process, decided once (see the module docstring), and
    the chat templates of those in ``raw`` mode."""

    def __init__(self, registry: UpstreamRegistry, probe_timeout: float) -> None:
        self._registry = registry
        self._timeout = probe_timeout
        self._modes: dict[str, ContinuationMode] = {}
        self._templates: dict[str, ChatTemplate] = {}
        self._lock = threading.Lock()

    def of(self, name: str) -> ContinuationMode:
        known = self._modes.get(name)
        if known is not None:
            return known
        with self._lock:
            known = self._modes.get(name)
            if known is not None:
                return known
            mode, keep = self._decide(name)
            if keep:
                self._modes[name] = mode
                log.info(
                    "upstream %r continues a partial answer in mode %s (%s%s)",
                    name, mode.mode, mode.source, f": {mode.detail}" if mode.detail else "",
                )  # fmt: skip
            return mode

    def report(self) -> dict[str, dict[str, str]]:
        """Every upstream's mode, as ``/health`` and ``stageserver check`` show it."""
        return {name: self.of(name).report() for name in self._registry.names()}

    def raw_prompt(
        self, name: str, replica: ReplicaClient, messages: Sequence[Mapping[str, Any]]
    ) -> tuple[str, tuple[str, ...]]:
        """For ``raw``: the prompt of ``messages`` with the generation prompt after them,
        and the end-of-turn to stop at. Raises ContinuationUnavailable."""
        template = self.template(name)
        if template is None:
            return render_upstream_template(replica, messages, self._timeout), ()
        try:
            return template.render(messages), tuple(template.stop)
        except ValueError as exc:
            raise ContinuationUnavailable(f"upstream {name!r}: {exc}") from None

    def template(self, name: str) -> ChatTemplate | None:
        """The chat template configured for the ``raw`` upstream ``name``, if any."""
        path = self._registry.config(name).chat_template
        if not path:
            return None
        template = self._templates.get(name)
        if template is None:
            template = self._templates[name] = load_template(path, name)
        return template

    def _decide(self, name: str) -> tuple[ContinuationMode, bool]:
        """The mode, and whether to keep it (not when the probe could not connect)."""
        config = self._registry.config(name)
        if config.continuation != "auto":
            if config.continuation == "raw":
                self.template(name)  # a bad template file is said at once, not mid-answer
            return ContinuationMode(config.continuation, "given"), True
        if config.kind == "openai":
            return ContinuationMode("none", "default", "OpenAI's API continues no answer"), True
        replica = self._registry.replicas(name)[0]
        try:
            rendered = _render_probe(replica, config.kind, self._timeout)
        except (openai.APIConnectionError, httpx2.TransportError) as exc:
            why = f"the probe could not reach {config.url} ({type(exc).__name__}); asked again"
            return ContinuationMode("none", "probed", why), False
        except (openai.APIStatusError, ValueError, KeyError, TypeError) as exc:
            return ContinuationMode("none", "probed", f"the probe failed: {_short(exc)}"), True
        if rendered.endswith(_PROBE_ANSWER):
            mode = "flag" if config.kind == "vllm" else "trailing"
            return ContinuationMode(mode, "probed", "a trailing answer is left open"), True
        why = "the server closes a trailing assistant message: it would start a new answer"
        return ContinuationMode("none", "probed", why), True


def load_template(path: str, upstream: str) -> ChatTemplate:
    """The chat template in ``path``: a GGUF file's own, or a Jinja file. (Imported here:
    only ``raw`` upstreams need Jinja.)"""
    from .template import ChatTemplate

    try:
        if path.endswith(".gguf"):
            return ChatTemplate.from_gguf(Path(path))
        return ChatTemplate.from_file(Path(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"upstream {upstream!r}: chat_template {path!r}: {exc}") from None


def _root(upstream: ReplicaClient) -> str:
    """The server's own root: the probes' endpoints are not under ``/v1``."""
    url = upstream.config.url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _post(upstream: ReplicaClient, url: str, body: Mapping[str, Any], timeout: float) -> Any:
    response = upstream.client.post(
        url, body=body, cast_to=httpx2.Response, options={"timeout": timeout, "max_retries": 0}
    )
    return response.json()


def _render_probe(upstream: ReplicaClient, kind: str, timeout: float) -> str:
    """The prompt the upstream renders for a conversation ending in a partial answer,
    asked to leave it open in its kind's way (with the first model it lists: Ollama
    renders nothing for no model)."""
    root, messages = _root(upstream), list(_PROBE_MESSAGES)
    model = upstream.config.models[0] if upstream.config.models else ""
    if kind == "vllm":
        tokens = _post(
            upstream,
            f"{root}/tokenize",
            {"model": model, "messages": messages, "add_generation_prompt": False,
             "continue_final_message": True},
            timeout,
        )["tokens"]  # fmt: skip
        return str(_post(upstream, f"{root}/detokenize", {"model": model, "tokens": tokens},
                         timeout)["prompt"])  # fmt: skip
    if kind == "ollama":
        if not model:
            raise ValueError("Ollama renders a prompt only for a model: list it in `models`")
        answer = _post(
            upstream,
            f"{root}/api/chat",
            {"model": model, "messages": messages, "stream": False, "_debug_render_only": True},
            timeout,
        )
        return str(answer["_debug_info"]["rendered_template"])
    return str(_post(upstream, f"{root}/apply-template", {"messages": messages}, timeout)["prompt"])


def _short(exc: BaseException) -> str:
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}"
    return f"{type(exc).__name__}: {exc}"[:200]


def render_upstream_template(upstream: ReplicaClient, messages: Sequence[Mapping[str, Any]],
                             timeout: float) -> str:  # fmt: skip
    """The prompt llama-server renders for ``messages``, the generation prompt after them."""
    try:
        prompt = _post(upstream, f"{_root(upstream)}/apply-template",
                       {"messages": list(messages)}, timeout)["prompt"]  # fmt: skip
    except (openai.OpenAIError, httpx2.HTTPError, ValueError, KeyError, TypeError) as exc:
        raise ContinuationUnavailable(
            f"upstream {upstream.name!r} has no chat_template and did not render one "
            f"(/apply-template: {_short(exc)})"
        ) from None
    return str(prompt)


# -- the request ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ContinuationRequest:
    """What asks an upstream to continue: where, the body, and what the reply may repeat
    first (``echo``, then ``held_back``), which is dropped from it."""

    path: str
    body: dict[str, Any]
    echo: str = ""
    held_back: str = ""
    completions: bool = False


def split_prefix(delivered: str) -> tuple[str, str]:
    """The prefix sent, and the trailing whitespace held back."""
    prefix = delivered.rstrip()
    return prefix, delivered[len(prefix) :]


def continuation_request(
    mode: str,
    chat_body: Mapping[str, Any],
    delivered: str,
    budget: int,
    prompt: str | None = None,
    stop: Sequence[str] = (),
) -> ContinuationRequest:
    """The request continuing ``delivered`` in ``mode``, from the stage's chat request
    ``chat_body`` as the replica would get it, with ``budget`` tokens at most. ``raw``:
    ``prompt`` is the rendered conversation with its generation prompt, ``stop`` the
    template's end of turn."""
    prefix, held_back = split_prefix(delivered)
    if mode == "raw":
        assert prompt is not None
        given_stop = chat_body.get("stop")
        stops = [*stop, *([given_stop] if isinstance(given_stop, str) else given_stop or [])]
        body: dict[str, Any] = {
            "model": chat_body["model"],
            "prompt": prompt + prefix,
            "max_tokens": budget,
            "stream": True,
            "stream_options": {"include_usage": True},
            **{k: chat_body[k] for k in _COMPLETION_FIELDS if k in chat_body},
        }
        if stops:
            body["stop"] = stops
        return ContinuationRequest("/completions", body, held_back=held_back, completions=True)
    message: dict[str, Any] = {"role": "assistant", "content": prefix}
    body = {**chat_body, "messages": [*chat_body["messages"], message], "max_tokens": budget}
    if "options" in body:  # Ollama's own token limit
        body["options"] = {**body["options"], "num_predict": budget}
    if mode == "flag":
        body.update(continue_final_message=True, add_generation_prompt=False)
    echo = ""
    if mode == "prefix":
        message["prefix"] = True
        echo = prefix
    return ContinuationRequest("/chat/completions", body, echo=echo, held_back=held_back)


# -- the reply -----------------------------------------------------------------------------


class _Repeat:
    """Drops ``expected`` from the start of a text that comes in pieces, if the text
    starts with it; holds the pieces back until it can tell."""

    __slots__ = ("expected", "held", "settled")

    def __init__(self, expected: str) -> None:
        self.expected = expected
        self.held = ""
        self.settled = not expected

    def take(self, text: str, *, last: bool = False) -> str:
        if self.settled:
            return text
        held = self.held = self.held + text
        expected = self.expected
        if len(held) < len(expected) and expected.startswith(held) and not last:
            return ""
        self.settled = True
        self.held = ""
        return held[len(expected) :] if held.startswith(expected) else held


class ContinuedReply:
    """A continuation's reply, chunk by chunk, as the stage takes it (``shape``)."""

    def __init__(self, request: ContinuationRequest) -> None:
        self._completions = request.completions
        self._repeats = (_Repeat(request.echo), _Repeat(request.held_back))

    def shape(self, payload: bytes, read: ChunkRead) -> list[tuple[bytes, ChunkRead]]:
        """The chunks the stage appends for one chunk of the reply (none while what it
        repeats is still in doubt)."""
        echo, held_back = self._repeats
        if not self._completions and echo.settled and held_back.settled:
            return [(payload, read)]
        chunk = json.loads(payload)
        choice = (chunk.get("choices") or [{}])[0]
        if self._completions:
            content = choice.get("text") or ""
            delta: dict[str, Any] = {}
        else:
            delta = dict(choice.get("delta") or {})
            content = delta.get("content") or ""
        finish, usage = read.finish_reason, read.usage
        ending = finish is not None or usage is not None
        if content or ending:
            content = held_back.take(echo.take(content, last=ending), last=ending)
        if content:
            delta["content"] = content
        else:
            delta.pop("content", None)
            if not ending:
                return []  # all of it held back, for now
        shaped = {
            "id": chunk.get("id"),
            "object": "chat.completion.chunk",
            "created": chunk.get("created"),
            "model": chunk.get("model"),
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
            if chunk.get("choices")
            else [],
        }
        if usage is not None:
            shaped["usage"] = usage
        # No logprobs: those of a reply's first chunks cover the text dropped from them.
        return [(compact_json(shaped), ChunkRead(content or None, finish, usage, delta or None))]
