"""``/v1`` as OpenAI's official Python SDK (the ``openai`` package requirements.txt pins)
sees it: its sync and async clients, with strict response validation, against two
gunicorn hosts sharing one redis-server, in front of the fake upstream.

Each client is built with ``_strict_response_validation=True`` (a field the SDK's models
require and we leave out fails there) and ``max_retries=0`` (a refusal is seen as it is).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any, Literal

import openai
import pytest
import requests
from openai import AsyncOpenAI, OpenAI
from openai.types.chat import (
    ChatCompletionChunk,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageParam,
)
from openai.types.responses import FunctionToolParam, Response, ResponseStreamEvent

from testing.fake_upstream import FakeUpstream
from testing.servers import Gunicorn, RedisServer, gunicorn_server
from testing.sse import toks

SECRETS = {
    "alice": "alice-sdk-key-0123456789",
    "bob": "bob-sdk-key-0123456789",
    "solo": "solo-sdk-key-0123456789",
}
KEYS = {
    "alice": {"key": SECRETS["alice"]},
    "bob": {"key": SECRETS["bob"]},
    "solo": {"key": SECRETS["solo"], "max_streams": 1},
}
Kind = Literal["sync", "async"]
KINDS: list[Kind] = ["sync", "async"]
TOOLS: list[ChatCompletionFunctionToolParam] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "call": {"type": "integer"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
]


@pytest.fixture(scope="module")
def hosts(fake: FakeUpstream, redis_server: RedisServer) -> Iterator[tuple[Gunicorn, Gunicorn]]:
    env = {
        "STAGESERVER_UPSTREAM_URL": fake.url,
        "STAGESERVER_STORE_URL": redis_server.url,
        "STAGESERVER_API_KEYS": json.dumps(KEYS),
    }
    with gunicorn_server(env) as a, gunicorn_server(env) as b:
        yield a, b


@pytest.fixture
def a(hosts: tuple[Gunicorn, Gunicorn], upstream: FakeUpstream) -> str:
    """Host A's URL; the fake upstream's records cleared."""
    return hosts[0].url


@pytest.fixture
def b(hosts: tuple[Gunicorn, Gunicorn]) -> str:
    return hosts[1].url


def sdk(url: str, who: str = "alice", *, key: str | None = None) -> OpenAI:
    return OpenAI(
        base_url=f"{url}/v1",
        api_key=key if key is not None else SECRETS[who],
        max_retries=0,
        timeout=30,
        _strict_response_validation=True,
    )


def async_sdk(url: str, who: str = "alice", *, key: str | None = None) -> AsyncOpenAI:
    return AsyncOpenAI(
        base_url=f"{url}/v1",
        api_key=key if key is not None else SECRETS[who],
        max_retries=0,
        timeout=30,
        _strict_response_validation=True,
    )


def chat_chunks(kind: Kind, url: str, **params: Any) -> list[ChatCompletionChunk]:
    """The chunks of a streamed chat completion, read by the sync or the async client."""
    if kind == "sync":
        with sdk(url) as client:
            return list(client.chat.completions.create(stream=True, **params))

    async def read() -> list[ChatCompletionChunk]:
        async with async_sdk(url) as client:
            stream = await client.chat.completions.create(stream=True, **params)
            return [chunk async for chunk in stream]

    return asyncio.run(read())


def chat_completion(kind: Kind, url: str, **params: Any) -> Any:
    if kind == "sync":
        with sdk(url) as client:
            return client.chat.completions.create(**params)

    async def create() -> Any:
        async with async_sdk(url) as client:
            return await client.chat.completions.create(**params)

    return asyncio.run(create())


def chat_refusal(kind: Kind, url: str, who: str = "alice", **params: Any) -> openai.APIStatusError:
    """The error a chat create raises, through the sync or the async client."""
    key = params.pop("key", None)
    if kind == "sync":
        with sdk(url, who, key=key) as client, pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(**params)
        return caught.value

    async def create() -> openai.APIStatusError:
        async with async_sdk(url, who, key=key) as client:
            with pytest.raises(openai.APIStatusError) as caught:
                await client.chat.completions.create(**params)
            return caught.value

    return asyncio.run(create())


HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "say hello now"}]


# -- Chat Completions -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_chat_stream_without_usage_has_no_empty_choices(kind: Kind, a: str) -> None:
    chunks = chat_chunks(kind, a, model="fake?chunks=3", messages=HELLO)
    assert all(chunk.choices for chunk in chunks)  # nothing breaks choices[0]
    assert all(chunk.usage is None for chunk in chunks)
    assert len({(c.id, c.created, c.model) for c in chunks}) == 1
    assert chunks[0].id.startswith("chatcmpl-") and chunks[0].model == "fake?chunks=3"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == toks(3)
    assert [c.choices[0].delta.role for c in chunks] == ["assistant", None, None, None]
    assert [c.choices[0].finish_reason for c in chunks] == [None, None, None, "stop"]


@pytest.mark.parametrize("kind", KINDS)
def test_chat_stream_with_usage_ends_with_the_usage_chunk(
    kind: Kind, a: str, upstream: FakeUpstream
) -> None:
    chunks = chat_chunks(
        kind, a, model="fake?chunks=3", messages=HELLO, stream_options={"include_usage": True}
    )
    *text, last = chunks
    assert all(chunk.choices and chunk.usage is None for chunk in text)
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (3, 3)
    assert last.usage.total_tokens == 6
    assert "".join(c.choices[0].delta.content or "" for c in text) == toks(3)
    assert upstream.requests[0].body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("kind", KINDS)
def test_chat_without_stream_is_one_completion_with_usage(kind: Kind, a: str) -> None:
    completion = chat_completion(kind, a, model="fake?chunks=4", messages=HELLO)
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.choices[0].message.content == toks(4)
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 4)


def test_chat_answer_names_its_stage(a: str) -> None:
    with sdk(a) as client:
        raw = client.chat.completions.with_raw_response.create(model="fake", messages=HELLO)
    assert raw.headers["X-Stage-Id"] == raw.parse().id


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_tool_calls_reassemble(kind: Kind, a: str, upstream: FakeUpstream) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    chunks = chat_chunks(
        kind,
        a,
        model="fake?tool_calls=2&chunks=3",
        messages=HELLO,
        tools=TOOLS,
        tool_choice=choice,
        parallel_tool_calls=True,
    )
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or ():
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            if delta.id:
                call["id"] = delta.id
            assert delta.function is not None
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
    index = upstream.requests[0].index
    assert calls == {
        0: {
            "id": f"call_fake_{index}_0",
            "name": "get_weather",
            "arguments": '{"city":"Paris","call":0}',
        },
        1: {
            "id": f"call_fake_{index}_1",
            "name": "get_time",
            "arguments": '{"city":"Paris","call":1}',
        },
    }
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    body = upstream.requests[0].body
    assert (body["tools"], body["tool_choice"], body["parallel_tool_calls"]) == (
        TOOLS,
        choice,
        True,
    )


@pytest.mark.parametrize("kind", KINDS)
def test_tool_calls_without_stream_are_assembled(
    kind: Kind, a: str, upstream: FakeUpstream
) -> None:
    completion = chat_completion(
        kind,
        a,
        model="fake?tool_calls=2&chunks=2",
        messages=HELLO,
        tools=TOOLS,
        tool_choice="required",
    )
    message = completion.choices[0].message
    index = upstream.requests[0].index
    assert message.content is None
    assert [(c.id, c.type, c.function.name, c.function.arguments) for c in message.tool_calls] == [
        (f"call_fake_{index}_0", "function", "get_weather", '{"city":"Paris","call":0}'),
        (f"call_fake_{index}_1", "function", "get_time", '{"city":"Paris","call":1}'),
    ]
    assert completion.choices[0].finish_reason == "tool_calls"
    body = upstream.requests[0].body
    assert (body["tools"], body["tool_choice"]) == (TOOLS, "required")


def test_the_sdk_stream_helper_assembles_tool_calls(a: str, upstream: FakeUpstream) -> None:
    with (
        sdk(a) as client,
        client.chat.completions.stream(
            model="fake?tool_calls=1&chunks=4", messages=HELLO, tools=TOOLS
        ) as stream,
    ):
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert calls is not None and len(calls) == 1
    call = calls[0]
    assert call.type == "function"
    assert (call.function.name, call.function.arguments) == (
        "get_weather",
        '{"city":"Paris","call":0}',
    )
    assert call.id == f"call_fake_{upstream.requests[0].index}_0"


@pytest.mark.parametrize("kind", KINDS)
def test_max_completion_tokens_reaches_the_upstream_as_max_tokens(
    kind: Kind, a: str, upstream: FakeUpstream
) -> None:
    completion = chat_completion(
        kind, a, model="fake?chunks=5", messages=HELLO, max_completion_tokens=2
    )
    assert completion.choices[0].message.content == toks(2)
    assert completion.choices[0].finish_reason == "length"
    body = upstream.requests[0].body
    assert body["max_tokens"] == 2
    assert "max_completion_tokens" not in body


# -- errors ---------------------------------------------------------------------------------


FILE = {"type": "file", "file": {"file_id": "file-abc"}}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("params", "param", "code"),
    [
        ({"n": 2}, "n", "unsupported_value"),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate", "unsupported_parameter"),
        (
            {"messages": [{"role": "user", "content": [FILE]}]},
            "messages[0].content[0].type",
            "unsupported_value",
        ),
    ],
)
def test_a_bad_request_is_a_bad_request_error(
    kind: Kind, a: str, upstream: FakeUpstream, params: dict[str, Any], param: str, code: str
) -> None:
    error = chat_refusal(kind, a, **{"model": "fake", "messages": HELLO, **params})
    assert isinstance(error, openai.BadRequestError)
    assert (error.status_code, error.param, error.code) == (400, param, code)
    assert error.type == "invalid_request_error"
    assert error.message.startswith(f"Error code: 400 - {param}: ")
    assert upstream.requests == []


@pytest.mark.parametrize("kind", KINDS)
def test_a_wrong_key_is_an_authentication_error(kind: Kind, a: str) -> None:
    error = chat_refusal(kind, a, key="not-a-key-of-anyone", model="fake", messages=HELLO)
    assert isinstance(error, openai.AuthenticationError)
    assert (error.status_code, error.code) == (401, "invalid_api_key")
    assert "WWW-Authenticate" in error.response.headers


@pytest.mark.parametrize("kind", KINDS)
def test_too_many_streams_is_a_rate_limit_error(kind: Kind, a: str) -> None:
    with sdk(a, "solo") as client:
        held = client.chat.completions.create(model="fake?prefill=30", messages=HELLO, stream=True)
        try:
            error = chat_refusal(kind, a, "solo", model="fake", messages=HELLO)
        finally:
            held.close()
    assert isinstance(error, openai.RateLimitError)
    assert (error.status_code, error.code) == (429, "rate_limit_exceeded")
    assert error.type == "rate_limit_error"
    assert int(error.response.headers["Retry-After"]) >= 1


def test_unknown_and_others_responses_are_not_found_alike(a: str, b: str) -> None:
    with sdk(a) as alice:
        mine = alice.responses.create(model="fake?chunks=2", input="hello")
    unknown = f"resp_{uuid.uuid4().hex}"
    messages = []
    for url in (a, b):
        with sdk(url, "bob") as bob:
            for response_id in (unknown, mine.id):
                for call in (bob.responses.retrieve, bob.responses.cancel, bob.responses.delete):
                    with pytest.raises(openai.NotFoundError) as caught:
                        call(response_id)
                    assert caught.value.status_code == 404
                    messages.append(caught.value.message.replace(response_id, "<id>"))
    assert len(set(messages)) == 1, messages
    with sdk(b) as alice:  # still there for its owner
        assert alice.responses.retrieve(mine.id).output_text == toks(2)


def test_an_upstream_failure_mid_stream_raises_in_a_chat_stream(a: str) -> None:
    with sdk(a) as client:
        stream = client.chat.completions.create(
            model="fake?mode=drop&after=2&chunks=5", messages=HELLO, stream=True
        )
        got: list[ChatCompletionChunk] = []
        with pytest.raises(openai.APIError) as caught:
            for chunk in stream:
                got.append(chunk)
    assert "".join(c.choices[0].delta.content or "" for c in got) == toks(2)
    assert caught.value.code is not None


def test_an_upstream_failure_in_a_responses_stream_is_error_then_failed(a: str) -> None:
    model = "fake?mode=drop&after=2&chunks=5"
    with sdk(a) as client:
        # The SDK raises at the error event (its nested "error" object) ...
        events: list[ResponseStreamEvent] = []
        with pytest.raises(openai.APIError) as caught:
            for event in client.responses.create(model=model, input="hello", stream=True):
                events.append(event)
        assert caught.value.code is not None
        texts = [e.delta for e in events if e.type == "response.output_text.delta"]
        assert texts == ["tok0 ", "tok1 "]
        # ... which the wire carries flat and nested, then response.failed.
        with client.responses.with_streaming_response.create(
            model=model, input="hello", stream=True
        ) as raw:
            wire = [json.loads(line[6:]) for line in raw.iter_lines() if line.startswith("data: ")]
        error, failed = wire[-2:]
        assert error["type"] == "error"
        assert error["code"] == error["error"]["code"] == caught.value.code
        assert isinstance(error["message"], str) and error["message"]
        assert failed["type"] == "response.failed"
        assert failed["response"]["status"] == "failed"
        assert failed["response"]["error"]["code"] == error["code"]
        assert [e["sequence_number"] for e in wire] == list(range(len(wire)))
        response_id = failed["response"]["id"]
        retrieved = client.responses.retrieve(response_id)
        assert retrieved.status == "failed"
        assert retrieved.error is not None and retrieved.error.code == error["code"]


# -- Responses ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_responses_create_plain_and_streamed(kind: Kind, a: str) -> None:
    async def run(client: AsyncOpenAI) -> tuple[Response, list[ResponseStreamEvent]]:
        plain = await client.responses.create(model="fake?chunks=3", input="hello")
        stream = await client.responses.create(model="fake?chunks=3", input="hello", stream=True)
        return plain, [event async for event in stream]

    if kind == "sync":
        with sdk(a) as client:
            plain = client.responses.create(model="fake?chunks=3", input="hello")
            events = list(
                client.responses.create(model="fake?chunks=3", input="hello", stream=True)
            )
    else:

        async def go() -> tuple[Response, list[ResponseStreamEvent]]:
            async with async_sdk(a) as client:
                return await run(client)

        plain, events = asyncio.run(go())
    assert (plain.status, plain.output_text) == ("completed", toks(3))
    assert plain.usage is not None and plain.usage.output_tokens == 3
    assert [e.type for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 3,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1]
    assert final.type == "response.completed"
    assert final.response.output_text == toks(3)


RESPONSE_TOOLS: list[FunctionToolParam] = [
    {"type": "function", "name": t["function"]["name"], "parameters": None, "strict": None}
    for t in TOOLS
]


@pytest.mark.parametrize("stream", [False, True])
def test_responses_function_calls(stream: bool, a: str, upstream: FakeUpstream) -> None:
    model = "fake?tool_calls=2&chunks=3"
    with sdk(a) as client:
        if stream:
            events = list(
                client.responses.create(
                    model=model, input="hello", tools=RESPONSE_TOOLS, stream=True
                )
            )
            assert [e.sequence_number for e in events] == list(range(len(events)))
            assert [e.type for e in events].count("response.function_call_arguments.delta") == 6
            final = events[-1]
            assert final.type == "response.completed"
            response = final.response
        else:
            response = client.responses.create(model=model, input="hello", tools=RESPONSE_TOOLS)
    index = upstream.requests[0].index
    calls = [
        (item.call_id, item.name, item.arguments)
        for item in response.output
        if item.type == "function_call"
    ]
    assert calls == [
        (f"call_fake_{index}_0", "get_weather", '{"city":"Paris","call":0}'),
        (f"call_fake_{index}_1", "get_time", '{"city":"Paris","call":1}'),
    ]
    sent = upstream.requests[0].body["tools"]
    assert [t["function"]["name"] for t in sent] == ["get_weather", "get_time"]


def test_background_stream_resumed_on_the_other_host_gives_each_event_once(a: str, b: str) -> None:
    model = "fake?chunks=30&interval=0.02"
    with sdk(a) as client:
        first: list[ResponseStreamEvent] = []
        stream = client.responses.create(model=model, input="hello", stream=True, background=True)
        for event in stream:
            first.append(event)
            if event.sequence_number == 6:
                break
        stream.close()
    created = first[0]
    assert created.type == "response.created"
    assert created.response.background is True
    response_id = created.response.id
    with sdk(b) as client:
        rest = list(client.responses.retrieve(response_id, stream=True, starting_after=6))
    events = first + rest
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1]
    assert final.type == "response.completed"
    assert final.response.output_text == toks(30)
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas == [f"tok{n} " for n in range(30)]


def test_a_reasoning_models_background_stream_resumed_on_the_other_host_is_whole(
    a: str, b: str
) -> None:
    """Cut inside the reasoning item, resumed on the other host: the item, its deltas and
    the message each once, the bytes the same whichever host sent them."""
    model = "fake?chunks=6&reasoning=6&interval=0.02"
    with sdk(a) as client:
        first: list[ResponseStreamEvent] = []
        stream = client.responses.create(model=model, input="hello", stream=True, background=True)
        for event in stream:
            first.append(event)
            if event.type == "response.reasoning_text.delta" and event.delta == "think2 ":
                break
        stream.close()
    response_id = first[0].response.id  # type: ignore[union-attr]
    cut = first[-1].sequence_number
    with sdk(b) as client:
        rest = list(client.responses.retrieve(response_id, stream=True, starting_after=cut))
    with (
        sdk(a) as client,
        client.responses.with_streaming_response.retrieve(
            response_id, stream=True, starting_after=cut
        ) as again,
    ):
        replayed = again.read()
    events = first + rest
    assert [e.sequence_number for e in events] == list(range(len(events)))
    thinking = [e.delta for e in events if e.type == "response.reasoning_text.delta"]
    assert thinking == [f"think{n} " for n in range(6)]
    final = events[-1]
    assert final.type == "response.completed"
    assert [item.type for item in final.response.output] == ["reasoning", "message"]
    assert final.response.output_text == toks(6)
    assert final.response.usage is not None
    assert final.response.usage.output_tokens_details.reasoning_tokens == 6
    wire = [json.loads(line[6:]) for line in replayed.split(b"\n") if line.startswith(b"data: ")]
    assert wire == [event.model_dump(mode="json", exclude_unset=True) for event in rest]


@pytest.mark.parametrize("kind", KINDS)
def test_the_stream_helper_replays_a_background_response(kind: Kind, a: str, b: str) -> None:
    with sdk(a) as client:
        stream = client.responses.create(
            model="fake?chunks=20&interval=0.02", input="hello", stream=True, background=True
        )
        response_id = next(iter(stream)).response.id  # type: ignore[union-attr]
        stream.close()
    if kind == "sync":
        with sdk(b) as client, client.responses.stream(response_id=response_id) as replay:
            final = replay.get_final_response()
    else:

        async def go() -> Response:
            async with (
                async_sdk(b) as client,
                client.responses.stream(response_id=response_id) as replay,
            ):
                return await replay.get_final_response()

        final = asyncio.run(go())  # type: ignore[arg-type] # a ParsedResponse[None]
    assert (final.id, final.status, final.output_text) == (response_id, "completed", toks(20))


def test_cancel_twice_then_delete_then_not_found(a: str, b: str, upstream: FakeUpstream) -> None:
    with sdk(a) as client:
        created = client.responses.create(
            model="fake?chunks=500&interval=0.05", input="hello", background=True
        )
        assert created.status in ("queued", "in_progress")
        assert upstream.wait_for(
            lambda: bool(upstream.requests and upstream.requests[0].chunks_sent)
        )
    with sdk(b) as client:
        cancelled = client.responses.cancel(created.id)
        again = client.responses.cancel(created.id)
    for response in (cancelled, again):
        assert (response.id, response.status) == (created.id, "cancelled")
        assert response.usage is not None and response.usage.output_tokens >= 1
    assert again.output_text == cancelled.output_text
    with sdk(a) as client:
        raw = client.responses.with_raw_response.delete(created.id)
        assert raw.status_code == 200
        assert raw.http_response.json() == {"id": created.id, "object": "response", "deleted": True}
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(created.id)
    with sdk(b) as client, pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)


def test_cancel_of_a_foreground_stream_from_another_request(a: str, b: str) -> None:
    # The stream ends with stageserver's ``response.cancelled``, which is in no union of the
    # SDK: strict validation refuses it, the SDK's default (used here to read the stream)
    # builds it as the union's first member and keeps its ``type``.
    lenient = OpenAI(base_url=f"{a}/v1", api_key=SECRETS["alice"], max_retries=0, timeout=30)
    with lenient as client:
        stream = client.responses.create(
            model="fake?chunks=500&interval=0.05", input="hello", stream=True
        )
        events: list[ResponseStreamEvent] = []
        for event in stream:
            events.append(event)
            if event.type == "response.output_text.delta":
                break
        response_id = events[0].response.id  # type: ignore[union-attr]
        with sdk(b) as other:
            cancelled = other.responses.cancel(response_id)
        assert cancelled.status == "cancelled"
        events += list(stream)
    assert events[-1].to_dict()["type"] == "response.cancelled"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    with sdk(a) as client:
        assert client.responses.retrieve(response_id).status == "cancelled"


@pytest.mark.parametrize("kind", KINDS)
def test_previous_response_id_continues_the_conversation(
    kind: Kind, a: str, b: str, upstream: FakeUpstream
) -> None:
    async def go() -> None:
        async with async_sdk(a) as client:
            first = await client.responses.create(
                model="fake?chunks=2", input="first question", instructions="be brief"
            )
        async with async_sdk(b) as client:
            await client.responses.create(
                model="fake?chunks=2", input="second question", previous_response_id=first.id
            )

    if kind == "sync":
        with sdk(a) as client:
            first = client.responses.create(
                model="fake?chunks=2", input="first question", instructions="be brief"
            )
        with sdk(b) as client:
            second = client.responses.create(
                model="fake?chunks=2", input="second question", previous_response_id=first.id
            )
        assert second.previous_response_id == first.id
    else:
        asyncio.run(go())
    assert upstream.requests[1].body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": toks(2)},
        {"role": "user", "content": "second question"},
    ]


@pytest.mark.parametrize("background", [False, True])
def test_a_retried_create_with_an_idempotency_key_makes_one_response(
    background: bool, a: str, b: str, upstream: FakeUpstream
) -> None:
    headers = {"Idempotency-Key": f"key-{uuid.uuid4().hex}"}
    params: dict[str, Any] = {"model": "fake?chunks=3", "input": "hello", "background": background}
    with sdk(a) as client:
        first = client.responses.create(**params, extra_headers=headers)
    with sdk(b) as client:  # the retry lands on another host
        again = client.responses.create(**params, extra_headers=headers)
        final = poll(client, first.id)
    assert again.id == first.id
    assert final.output_text == toks(3)
    assert len(upstream.requests) == 1


def test_an_idempotency_key_sent_again_with_another_body_is_refused_on_any_host(
    a: str, b: str, upstream: FakeUpstream
) -> None:
    key = f"key-{uuid.uuid4().hex}"
    params: dict[str, Any] = {"model": "fake?chunks=3", "input": "hello", "background": True}
    other = {**params, "input": "goodbye"}
    with sdk(a) as client:
        first = client.responses.create(**params, extra_headers={"Idempotency-Key": key})
    error = {
        "message": f"Idempotency-Key: {key!r} was sent before with a different request body; "
        "a retry must send the same body, and a new request a new key",
        "type": "invalid_request_error",
        "param": "Idempotency-Key",
        "code": "idempotency_key_reused",
    }
    # Another body under the key, on the other host: 422, saying why.
    headers = {"Idempotency-Key": key, "Authorization": f"Bearer {SECRETS['alice']}"}
    refused = requests.post(f"{b}/v1/responses", json=other, headers=headers, timeout=30)
    assert (refused.status_code, refused.json()) == (422, {"error": error})
    with sdk(b) as client:
        with pytest.raises(openai.UnprocessableEntityError) as raised:
            client.responses.create(**other, extra_headers={"Idempotency-Key": key})
        assert raised.value.body == error
        # The same body still gets the first response, which the refusals left alone.
        again = client.responses.create(**params, extra_headers={"Idempotency-Key": key})
        final = poll(client, first.id)
    assert again.id == first.id
    assert (final.status, final.output_text) == ("completed", toks(3))
    assert len(upstream.requests) == 1


def poll(client: OpenAI, response_id: str) -> Response:
    """The response once it has ended (the SDK's way: retrieve while it is not)."""
    deadline = time.monotonic() + 20
    while True:
        response = client.responses.retrieve(response_id)
        if response.status not in ("queued", "in_progress"):
            return response
        assert time.monotonic() < deadline, response
        time.sleep(0.05)


@pytest.mark.parametrize("kind", KINDS)
def test_a_background_response_nobody_follows_completes(kind: Kind, a: str, b: str) -> None:
    model = "fake?chunks=8&interval=0.03"
    if kind == "sync":
        with sdk(a) as client:
            created = client.responses.create(model=model, input="hello", background=True)
    else:

        async def go() -> Response:
            async with async_sdk(a) as client:
                return await client.responses.create(model=model, input="hello", background=True)

        created = asyncio.run(go())
    assert created.status in ("queued", "in_progress")
    assert created.background is True
    with sdk(b) as client:
        final = poll(client, created.id)
    assert (final.status, final.output_text) == ("completed", toks(8))
    assert final.usage is not None and final.usage.output_tokens == 8


def test_models_lists_what_the_caller_may_use(a: str) -> None:
    with sdk(a) as client:
        models = list(client.models.list())
    assert [m.object for m in models] == ["model"] * len(models)
    assert models
