"""``/v1/messages`` as Anthropic's official Python SDK (``anthropic``, its newest release,
in a venv of its own: ``testing/anthropic_sdk.py``) sees it: ``messages.create`` whole and
streamed, sync and async, ``messages.stream``, a tool round with its ``tool_result``
turn, thinking on a reasoning model, an image, ``count_tokens``, the models, a wrong key,
a bad body, and a message cancelled from the other host. Two gunicorn hosts share one
redis-server, in front of the fake upstream, with heartbeats every 0.2 s: the streams
carry ``ping`` events and ``id:`` lines, which the SDK's decoder must pass over.

Each is checked against the exact bytes of the same request on the wire: what the SDK
gives is what the server sent, event for event."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from testing.anthropic_sdk import (
    HI,
    PNG,
    SLOW,
    TOOL,
    AnthropicSDK,
    Received,
    compact,
    raw_event,
    received,
    same_id,
    wire_events,
)
from testing.fake_upstream import FakeUpstream, UpstreamRequest
from testing.servers import Gunicorn, RedisServer, gunicorn_server

SECRETS = {"alice": "alice-anthropic-key-0123", "bob": "bob-anthropic-key-0123"}
KEYS = {name: {"key": secret} for name, secret in SECRETS.items()}


@pytest.fixture(scope="module")
def hosts(fake: FakeUpstream, redis_server: RedisServer) -> Iterator[tuple[Gunicorn, Gunicorn]]:
    env = {
        "STAGESERVER_UPSTREAM_URL": fake.url,
        "STAGESERVER_STORE_URL": redis_server.url,
        "STAGESERVER_API_KEYS": json.dumps(KEYS),
        "STAGESERVER_HEARTBEAT_SECONDS": "0.2",
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


def ask(**fields: Any) -> dict[str, Any]:
    return {"model": SLOW, "max_tokens": 64, "messages": HI, **fields}


def sdk(
    anthropic_sdk: AnthropicSDK, url: str, call: str, params: dict[str, Any], **plan: Any
) -> list[Received]:
    plan.setdefault("api_key", SECRETS["alice"])
    return anthropic_sdk.run(url, call, params, **plan)


def on_the_wire(url: str, body: dict[str, Any], key: str = SECRETS["alice"]) -> requests.Response:
    """The same request, posted raw, its answer read whole."""
    answer = requests.post(
        f"{url}/v1/messages",
        json=body,
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        timeout=60,
    )
    return answer


def toks(count: int) -> str:
    return "".join(f"tok{n} " for n in range(count))


# -- create and stream ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_create_whole_is_the_message_on_the_wire(
    anthropic_sdk: AnthropicSDK, a: str, kind: str
) -> None:
    body = ask(model="fake?chunks=3")
    [got] = sdk(anthropic_sdk, a, "create", body, **{"async": kind == "async"})
    assert got.kind == "message"
    wire = on_the_wire(a, body)
    assert wire.status_code == 200
    assert same_id(got.value) == same_id(wire.json())
    assert got.value["content"] == [{"type": "text", "text": toks(3)}]
    assert (got.value["stop_reason"], got.value["usage"]["output_tokens"]) == ("end_turn", 3)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_create_streamed_gives_every_event_on_the_wire_past_ids_and_pings(
    anthropic_sdk: AnthropicSDK, a: str, kind: str
) -> None:
    body = ask(stream=True)
    got = sdk(anthropic_sdk, a, "create", body, **{"async": kind == "async"})
    assert {r.kind for r in got} == {"event"}
    expected = wire_events(on_the_wire(a, body))
    assert same_id([r.value for r in got]) == same_id(expected)
    assert [e["type"] for e in expected] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


def test_messages_stream_accumulates_the_message(anthropic_sdk: AnthropicSDK, a: str) -> None:
    got = sdk(anthropic_sdk, a, "stream", ask())
    *events, final = got
    assert final.kind == "final"
    # The raw events, as sent (the SDK adds the block to its stop, the message to its
    # message_stop), and the SDK's own text events between them.
    raw = [raw_event(e.value) for e in events if e.value["type"] not in ("text", "message_stop")]
    expected = wire_events(on_the_wire(a, ask(stream=True)))
    assert same_id(raw) == same_id(expected[:-1])
    [stop] = [e.value for e in events if e.value["type"] == "content_block_stop"]
    assert stop["content_block"] == {"type": "text", "text": toks(3)}
    texts = [e.value for e in events if e.value["type"] == "text"]
    assert [(t["text"], t["snapshot"]) for t in texts] == [
        ("tok0 ", "tok0 "), ("tok1 ", "tok0 tok1 "), ("tok2 ", toks(3)),
    ]  # fmt: skip
    whole = on_the_wire(a, ask()).json()
    # The SDK sets each field of message_delta's on its snapshot; the one sent null too.
    assert final.value.pop("stop_details") is None
    assert same_id(final.value) == same_id(whole)
    assert events[-1].value["type"] == "message_stop"


def test_a_tool_round_sends_the_answer_back_with_its_tool_result(
    anthropic_sdk: AnthropicSDK, a: str, upstream: FakeUpstream
) -> None:
    body = ask(model="fake?tool_calls=1&chunks=2", tools=[TOOL])
    first, second = sdk(anthropic_sdk, a, "tool_round", body)
    [call] = first.value["content"]
    assert (call["type"], call["name"], call["input"]) == (
        "tool_use",
        "get_weather",
        {"city": "Paris", "call": 0},
    )
    assert first.value["stop_reason"] == "tool_use"
    asked, answered = chats(upstream)
    # The SDK sent its Message back (to_param()), and a tool_result for its call.
    assert answered.body["messages"] == [
        *HI,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": compact(call["input"])},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call["id"], "content": "result of get_weather"},
    ]
    assert answered.body["tools"] == asked.body["tools"]
    assert second.value["stop_reason"] == "tool_use"  # the fake calls its tools again
    # The first answer, on the wire: the same Message.
    wire = on_the_wire(a, body).json()
    wire["content"][0]["id"] = call["id"]
    assert same_id(first.value) == same_id(wire)


def test_thinking_on_a_reasoning_model_streams_its_block_and_signature(
    anthropic_sdk: AnthropicSDK, a: str
) -> None:
    body = ask(
        model="fake?chunks=2&reasoning=2&interval=0.2&prefill=1&created=1700000000",
        max_tokens=4096,
        thinking={"type": "enabled", "budget_tokens": 2048},
    )
    *events, final = sdk(anthropic_sdk, a, "stream", body)
    kinds = [e.value["type"] for e in events]
    assert kinds.count("thinking") == 2 and kinds.count("signature") == 1
    assert [e.value["thinking"] for e in events if e.value["type"] == "thinking"] == [
        "think0 ",
        "think1 ",
    ]
    thinking, text = final.value["content"]
    assert (thinking["type"], thinking["thinking"]) == ("thinking", "think0 think1 ")
    assert thinking["signature"]
    assert text == {"type": "text", "text": toks(2)}
    assert final.value["usage"]["output_tokens_details"] == {"thinking_tokens": 2}
    raw = [
        raw_event(e.value)
        for e in events
        if e.value["type"] not in ("thinking", "signature", "text")
    ]
    expected = wire_events(on_the_wire(a, {**body, "stream": True}))
    assert same_id(raw[:-1]) == same_id(expected[:-1])


def test_an_image_block_reaches_the_upstream_as_an_image_url(
    anthropic_sdk: AnthropicSDK, a: str, upstream: FakeUpstream
) -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
    url = {"type": "image", "source": {"type": "url", "url": "https://images.example/cat.png"}}
    body = ask(
        model="fake?chunks=2",
        messages=[{"role": "user", "content": [{"type": "text", "text": "What?"}, image, url]}],
    )
    [got] = sdk(anthropic_sdk, a, "create", body)
    assert got.value["content"] == [{"type": "text", "text": toks(2)}]
    [request] = chats(upstream)
    assert request.images == [f"data:image/png;base64,{PNG}", "https://images.example/cat.png"]
    assert same_id(got.value) == same_id(on_the_wire(a, body).json())


def test_count_tokens(anthropic_sdk: AnthropicSDK, a: str) -> None:
    body: dict[str, Any] = {"model": "fake", "system": "Be brief.", "messages": HI}
    [got] = sdk(anthropic_sdk, a, "count_tokens", body)
    wire = requests.post(
        f"{a}/v1/messages/count_tokens",
        json=body,
        headers={"x-api-key": SECRETS["alice"]},
        timeout=10,
    )
    assert got.value == wire.json() == {"input_tokens": 12, "estimated": True}


def test_the_models(anthropic_sdk: AnthropicSDK, a: str) -> None:
    got = sdk(anthropic_sdk, a, "models", {"limit": 1})
    assert [r.value for r in got] == [
        {
            "type": "model",
            "id": "default",
            "display_name": "default",
            "created_at": "1970-01-01T00:00:00Z",
            "lifecycle": "active",
        }
    ]


# -- refusals ------------------------------------------------------------------------------------


def test_a_wrong_key_is_an_authentication_error(anthropic_sdk: AnthropicSDK, a: str) -> None:
    for auth in ({"api_key": "wrong-key"}, {"auth_token": "wrong-key"}):
        [got] = anthropic_sdk.run(a, "create", ask(), **auth)
        assert got.kind == "error"
        wire = on_the_wire(a, ask(), key="wrong-key")
        assert wire.status_code == 401
        message = got.value.pop("message")
        assert got.value == {"class": "AuthenticationError", "status": 401, "body": wire.json()}
        # The SDK names the request by its request-id header, as it does Anthropic's.
        assert re.fullmatch(
            r"401 unknown API key \(request_id: [0-9a-f]{32}, path: /v1/messages, "
            r"type: authentication_error\)",
            message,
        ), message
        assert wire.json()["error"] == {
            "type": "authentication_error",
            "message": "unknown API key",
        }


def test_a_bad_body_is_a_bad_request_naming_the_field(anthropic_sdk: AnthropicSDK, a: str) -> None:
    body = ask(messages=[{"role": "user", "content": [{"type": "text"}]}])
    [got] = sdk(anthropic_sdk, a, "create", body)
    error = {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "messages.0.content.0.text: Field required",
        },
    }
    assert (got.kind, got.value["class"], got.value["status"], got.value["body"]) == (
        "error",
        "BadRequestError",
        400,
        error,
    )
    assert on_the_wire(a, body).json() == error


def test_a_message_cancelled_from_the_other_host_ends_the_sdks_stream_with_its_error(
    anthropic_sdk: AnthropicSDK, a: str, b: str
) -> None:
    body = ask(model="fake?chunks=100&interval=0.1", stream=True)
    client = anthropic_sdk.start(a, "create", body, api_key=SECRETS["alice"])
    assert client.stdout is not None
    try:
        first = received(client.stdout.readline())
        message_id = first.value["message"]["id"]
        cancelled = requests.post(
            f"{b}/stages/{message_id}/cancel",
            headers={"x-api-key": SECRETS["alice"]},
            timeout=10,
        )
        assert cancelled.status_code == 202
        rest = [received(line) for line in client.stdout]
    finally:
        client.stdout.close()
        assert client.wait(timeout=60) == 0
    *events, error, end = rest
    assert end.kind == "end"
    assert all(e.kind == "event" for e in events)
    assert error.kind == "error"
    assert error.value["body"] == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "cancelled: cancelled by request"},
    }
    status = requests.get(
        f"{a}/stages/{message_id}", headers={"x-api-key": SECRETS["alice"]}, timeout=10
    ).json()
    assert (status["status"], status["cancel_reason"]) == ("cancelled", "cancelled by request")


def chats(fake: FakeUpstream) -> list[UpstreamRequest]:
    return [r for r in fake.requests if r.path.endswith("/chat/completions")]


def test_two_sdk_clients_at_once_each_read_their_own_message(
    anthropic_sdk: AnthropicSDK, a: str, b: str
) -> None:
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(sdk, anthropic_sdk, url, "stream", ask()) for url in (a, b)]
        finals = [run.result()[-1].value for run in runs]
    assert [f["content"] for f in finals] == [[{"type": "text", "text": toks(3)}]] * 2
    assert finals[0]["id"] != finals[1]["id"]
