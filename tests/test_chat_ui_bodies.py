"""The request bodies of two chat UIs, replayed on ``/v1/chat/completions``: Open WebUI's
and LibreChat's, as each sends them to an OpenAI-compatible server by default, and with
every sampling field its users can set. A UI sends whatever its users set, and a
gateway that refuses one of those fields breaks the UI for that user.

The bodies are taken from their source, as the search index holds it (read 2026-12; the
index mixes the projects' history with some forks' files, so each part below is one that
every copy found agrees on, and the commit is the one read):

- **Open WebUI** (open-webui/open-webui). The browser posts ``stream: true``, ``model``,
  ``messages``, ``params`` and Open WebUI's own fields (``chat_id``, ``session_id``,
  ``features``, ...), and ``stream_options: {include_usage: true}`` when the model's
  *usage* capability is on (``src/lib/components/chat/Chat.svelte``, the object passed to
  ``generateOpenAIChatCompletion``).
  The backend moves its own fields into ``metadata``, moves the chat's parameters into the
  body (``backend/open_webui/utils/payload.py``, ``apply_model_params_to_body_openai``,
  at 227ce3f: ``temperature``, ``top_p``, ``min_p``, ``max_tokens``,
  ``frequency_penalty``, ``presence_penalty``, ``reasoning_effort``, ``seed``, ``stop``,
  ``logit_bias``, ``response_format``, and any *custom parameter* as given), then drops
  ``metadata`` and sends the rest, with ``max_completion_tokens`` renamed ``max_tokens``
  for any server but api.openai.com (``backend/open_webui/routers/openai.py``,
  ``generate_chat_completion``, at 671f577). The user's name and id go in
  ``X-OpenWebUI-User-*`` headers when the admin enables them, never in the body.
- **LibreChat** (danny-avila/LibreChat). Its OpenAI and custom endpoints hand LangChain's
  ``ChatOpenAI`` the conversation's parameters, the model and ``user: req.user.id``
  (``packages/api/src/endpoints/openai/initialize.ts``, at ada197f), with ``streaming:
  true`` and ``max_tokens`` as ``maxTokens`` (``packages/api/src/endpoints/openai/llm.ts``,
  ``getOpenAIConfig``, at f31d896); LangChain adds ``stream_options: {include_usage:
  true}`` to a stream. So the body is the model, the messages, ``stream``,
  ``stream_options``, ``user``, and the parameters the user set: ``temperature``,
  ``top_p``, ``frequency_penalty``, ``presence_penalty``, ``max_tokens``, ``stop``,
  ``reasoning_effort``.

Each replay is checked as a client reads it (a 200, a whole stream ending ``[DONE]``,
the text, the usage chunk only when asked for) and as the upstream got it (the
conversation, each sampling field as given, and ``user`` not passed on).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from testing.fake_upstream import FakeUpstream
from testing.servers import Gunicorn, gunicorn_server

SECRET = "chat-ui-key-0123456789"
ANSWER = "Paris is the capital of France."
MODEL = "fake?chunks=4&text=Paris%20is%20the%20capital%20of%20France."
#: A model served by an upstream of kind ``llamacpp``, which takes llama.cpp's own
#: sampling fields (``min_p``, ``top_k``): Open WebUI's *custom parameters* go there.
LLAMA_MODEL = MODEL + "&served_by=llamacpp"
ASKED = [{"role": "user", "content": "What is the capital of France?"}]
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}

#: Open WebUI, a new chat, nothing set: the browser's body after the backend's changes.
OPEN_WEBUI_DEFAULT: dict[str, Any] = {"stream": True, "model": MODEL, "messages": ASKED}
#: ... with the model's *usage* capability on, and every field of its chat controls set
#: (Advanced Params: the values as Open WebUI casts them; logit_bias as it converts
#: "1734:-100"); a system prompt first.
OPEN_WEBUI_SET: dict[str, Any] = {
    "stream": True,
    "model": MODEL,
    "messages": [SYSTEM, *ASKED],
    "stream_options": {"include_usage": True},
    "temperature": 0.7,
    "top_p": 0.9,
    "max_tokens": 256,
    "frequency_penalty": 0.5,
    "presence_penalty": 0.25,
    "reasoning_effort": "low",
    "seed": 42,
    "stop": ["\n\nUser:"],
    "logit_bias": {"1734": -100},
}
#: ... and its min_p, with a custom parameter (top_k), to a llama.cpp upstream.
OPEN_WEBUI_CUSTOM: dict[str, Any] = {
    **OPEN_WEBUI_DEFAULT,
    "model": LLAMA_MODEL,
    "min_p": 0.05,
    "top_k": 40,
}
#: LibreChat, a new conversation, nothing set (its user id is a MongoDB ObjectId).
LIBRECHAT_DEFAULT: dict[str, Any] = {
    "model": MODEL,
    "user": "6751f0c2a9e4b0a1b2c3d4e5",
    "stream": True,
    "stream_options": {"include_usage": True},
    "messages": ASKED,
}
#: ... with a system prompt (its "custom instructions") and every parameter of its panel.
LIBRECHAT_SET: dict[str, Any] = {
    **LIBRECHAT_DEFAULT,
    "messages": [SYSTEM, *ASKED],
    "temperature": 0.8,
    "top_p": 0.95,
    "frequency_penalty": 0.1,
    "presence_penalty": 0.2,
    "max_tokens": 1024,
    "stop": ["<|im_end|>"],
    "reasoning_effort": "medium",
}
#: The fields a replay sends that stageserver builds or ignores (the rest go on as
#: given): what the upstream gets instead is checked by name.
NOT_PASSED = {"model", "messages", "stream", "stream_options", "max_tokens", "user"}

BODIES = {
    "open-webui-default": OPEN_WEBUI_DEFAULT,
    "open-webui-user-set": OPEN_WEBUI_SET,
    "open-webui-custom-params": OPEN_WEBUI_CUSTOM,
    "librechat-default": LIBRECHAT_DEFAULT,
    "librechat-user-set": LIBRECHAT_SET,
}


@pytest.fixture(scope="module")
def server(fake: FakeUpstream) -> Iterator[Gunicorn]:
    upstreams = {
        "default": {"url": fake.url, "kind": "openai"},
        "llama": {"url": fake.url, "kind": "llamacpp", "models": [LLAMA_MODEL]},
    }
    env = {
        "STAGESERVER_UPSTREAMS": json.dumps(upstreams),
        "STAGESERVER_API_KEYS": json.dumps({"ui": {"key": SECRET}}),
    }
    with gunicorn_server(env) as server:
        yield server


@pytest.fixture
def url(server: Gunicorn, upstream: FakeUpstream) -> str:
    """The server's Chat Completions URL; the fake upstream's records cleared."""
    return f"{server.url}/v1/chat/completions"


def replay(url: str, body: dict[str, Any]) -> list[Any]:
    """``body`` posted as the UI posts it; the stream's data, each parsed, to ``[DONE]``."""
    headers = {"Authorization": f"Bearer {SECRET}", "Accept": "text/event-stream"}
    answer = requests.post(url, json=body, headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith("text/event-stream")
    data = [line[6:] for line in answer.text.split("\n") if line.startswith("data: ")]
    assert data[-1] == "[DONE]", answer.text  # whole: no error, no cut
    return [json.loads(item) for item in data[:-1]]


@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES.keys())
def test_a_chat_uis_body_is_taken_and_streamed_whole(
    url: str, upstream: FakeUpstream, body: dict[str, Any]
) -> None:
    chunks = replay(url, body)
    answered = [c for c in chunks if c["choices"]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in answered) == ANSWER
    assert answered[-1]["choices"][0]["finish_reason"] == "stop"
    usage = [c for c in chunks if not c["choices"]]
    if body.get("stream_options") == {"include_usage": True}:
        (last,) = usage
        assert last is chunks[-1] and last["usage"]["completion_tokens"] == 4
    else:
        assert usage == []

    chats = [r for r in upstream.requests if r.path == "/v1/chat/completions"]
    (sent,) = [r.body for r in chats]
    assert sent["messages"] == body["messages"]
    assert sent["stream"] is True
    assert {name: sent.get(name) for name in body.keys() - NOT_PASSED} == {
        name: body[name] for name in body.keys() - NOT_PASSED
    }
    assert sent["max_tokens"] == body.get("max_tokens", sent["max_tokens"])
    assert "user" not in sent  # who calls is stageserver's key, not passed on


def test_a_custom_parameter_goes_only_to_an_upstream_that_takes_it(
    url: str, upstream: FakeUpstream
) -> None:
    # Open WebUI's min_p to the default (OpenAI-kind) upstream: refused, naming it, as
    # OpenAI refuses it; the llama.cpp upstream took it above.
    body = {**OPEN_WEBUI_DEFAULT, "min_p": 0.05}
    headers = {"Authorization": f"Bearer {SECRET}"}
    answer = requests.post(url, json=body, headers=headers, timeout=30)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["param"], error["code"]) == ("min_p", "unsupported_parameter")
    assert [r for r in upstream.requests if r.path == "/v1/chat/completions"] == []
