"""``/v1`` as LangChain's ``ChatOpenAI`` (``langchain-openai``, requirements-dev.txt) uses
it: Chat Completions (invoke, stream with usage, tools) and the Responses API, against
one gunicorn host in front of the fake upstream."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from testing.fake_upstream import FakeUpstream
from testing.servers import Gunicorn, gunicorn_server
from testing.sse import toks

SECRET = "lang-chain-key-0123456789"


@pytest.fixture(scope="module")
def server(fake: FakeUpstream) -> Iterator[Gunicorn]:
    env = {
        "STAGESERVER_UPSTREAM_URL": fake.url,
        "STAGESERVER_API_KEYS": json.dumps({"lang": {"key": SECRET}}),
    }
    with gunicorn_server(env) as server:
        yield server


@pytest.fixture
def url(server: Gunicorn, upstream: FakeUpstream) -> str:
    """The server's OpenAI base URL; the fake upstream's records cleared."""
    return f"{server.url}/v1"


def chat(url: str, model: str, **params: Any) -> ChatOpenAI:
    return ChatOpenAI(base_url=url, api_key=SECRET, model=model, max_retries=0, **params)  # type: ignore[arg-type]


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


def collect(chunks: Iterator[Any]) -> AIMessageChunk:
    """The streamed chunks added up, as LangChain merges them."""
    total: AIMessageChunk | None = None
    for chunk in chunks:
        assert isinstance(chunk, AIMessageChunk)
        total = chunk if total is None else total + chunk
    assert total is not None
    return total


def text_of(message: AIMessage | AIMessageChunk) -> str:
    return str(message.text)  # a str subclass in langchain-core 1.x


def test_invoke(url: str, upstream: FakeUpstream) -> None:
    message = chat(url, "fake?chunks=3", max_tokens=50).invoke("say hello now")
    assert isinstance(message, AIMessage)
    assert message.content == toks(3)
    assert message.usage_metadata is not None
    assert (message.usage_metadata["input_tokens"], message.usage_metadata["output_tokens"]) == (
        3,
        3,
    )
    assert message.response_metadata["finish_reason"] == "stop"
    body = upstream.requests[0].body
    assert body["messages"] == [{"role": "user", "content": "say hello now"}]
    # LangChain sends max_completion_tokens; the upstream gets max_tokens.
    assert body["max_tokens"] == 50 and "max_completion_tokens" not in body


def test_stream_with_usage(url: str, upstream: FakeUpstream) -> None:
    llm = chat(url, "fake?chunks=4", stream_usage=True)
    total = collect(llm.stream("say hello now"))
    assert total.content == toks(4)
    assert total.usage_metadata is not None
    assert total.usage_metadata["output_tokens"] == 4
    assert total.usage_metadata["total_tokens"] == 7
    assert upstream.requests[0].body["stream_options"] == {"include_usage": True}


def test_bind_tools_parses_tool_calls(url: str, upstream: FakeUpstream) -> None:
    llm = chat(url, "fake?tool_calls=2&chunks=3").bind_tools([get_weather])
    message = llm.invoke("weather in Paris?")
    assert isinstance(message, AIMessage)
    index = upstream.requests[0].index
    assert [(c["name"], c["args"], c["id"]) for c in message.tool_calls] == [
        ("get_weather", {"city": "Paris", "call": 0}, f"call_fake_{index}_0"),
        ("get_weather", {"city": "Paris", "call": 1}, f"call_fake_{index}_1"),
    ]
    assert message.invalid_tool_calls == []
    (sent,) = upstream.requests[0].body["tools"]
    assert sent["function"]["name"] == "get_weather"

    streamed = collect(llm.stream("weather in Paris?"))
    index = upstream.requests[1].index
    assert [(c["name"], c["args"], c["id"]) for c in streamed.tool_calls] == [
        ("get_weather", {"city": "Paris", "call": 0}, f"call_fake_{index}_0"),
        ("get_weather", {"city": "Paris", "call": 1}, f"call_fake_{index}_1"),
    ]


def test_responses_api_invoke_and_stream(url: str, upstream: FakeUpstream) -> None:
    llm = chat(url, "fake?chunks=3", use_responses_api=True)
    message = llm.invoke("say hello now")
    assert isinstance(message, AIMessage)
    assert text_of(message) == toks(3)
    assert message.id is not None and message.id.startswith("resp_")
    assert message.usage_metadata is not None
    assert message.usage_metadata["output_tokens"] == 3

    streamed = collect(llm.stream("say hello now"))
    assert text_of(streamed) == toks(3)
    assert streamed.usage_metadata is not None
    assert streamed.usage_metadata["output_tokens"] == 3
    assert [r.body["messages"][-1]["content"] for r in upstream.requests] == ["say hello now"] * 2


def test_responses_api_tool_calls(url: str, upstream: FakeUpstream) -> None:
    llm = chat(url, "fake?tool_calls=1&chunks=3", use_responses_api=True).bind_tools([get_weather])
    message = llm.invoke("weather in Paris?")
    assert isinstance(message, AIMessage)
    index = upstream.requests[0].index
    assert [(c["name"], c["args"], c["id"]) for c in message.tool_calls] == [
        ("get_weather", {"city": "Paris", "call": 0}, f"call_fake_{index}_0")
    ]
    streamed = collect(llm.stream("weather in Paris?"))
    index = upstream.requests[1].index
    assert [(c["name"], c["args"], c["id"]) for c in streamed.tool_calls] == [
        ("get_weather", {"city": "Paris", "call": 0}, f"call_fake_{index}_0")
    ]
