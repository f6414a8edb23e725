"""``/v1/messages`` as Anthropic's official JavaScript SDK (``@anthropic-ai/sdk``, pinned
in testing/js/package-lock.json) sees it, run with Debian's node against gunicorn and the
fake upstream, on streams slow enough to carry ``ping`` heartbeats: ``messages.create``
whole and streamed, ``messages.stream``, a tool round with its ``tool_result`` turn,
thinking on a reasoning model, an image, ``countTokens``, the models, a wrong key and a
bad body, each checked against the same request's bytes on the wire.

``scripts/setup.sh --dev`` installs node and the SDK (``npm ci`` in testing/js).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from testing.anthropic_sdk import (
    HI,
    PNG,
    SLOW,
    TOOL,
    Received,
    compact,
    raw_event,
    same_id,
    wire_events,
)
from testing.fake_upstream import FakeUpstream, UpstreamRequest
from testing.servers import ROOT, Gunicorn, gunicorn_server

JS = ROOT / "testing" / "js"
KEY = "js-anthropic-key-0123456789"


@pytest.fixture(scope="module")
def server(fake: FakeUpstream) -> Iterator[Gunicorn]:
    settings = {
        "STAGESERVER_UPSTREAM_URL": fake.url,
        "STAGESERVER_HEARTBEAT_SECONDS": "0.2",
        "STAGESERVER_API_KEYS": json.dumps({"js": {"key": KEY}}),
    }
    with gunicorn_server(settings) as gunicorn:
        yield gunicorn


@pytest.fixture
def url(server: Gunicorn, upstream: FakeUpstream) -> str:
    """The server's URL; the fake upstream's records cleared."""
    return server.url


def node(url: str, call: str, params: dict[str, Any], **auth: str) -> list[Received]:
    """Run testing/js/anthropic.mjs against ``url``: what it printed, up to its "end"."""
    found = shutil.which("node")
    assert found, "node is missing: run scripts/setup.sh --dev (it installs Debian's nodejs)"
    assert (JS / "node_modules" / "@anthropic-ai" / "sdk" / "package.json").exists(), (
        "testing/js/node_modules is missing the SDK: run scripts/setup.sh --dev (npm ci there)"
    )
    plan = {"call": call, "params": params, **(auth or {"apiKey": KEY})}
    # Without the test's own ANTHROPIC_* (a key, a base URL), which the SDK would read.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")}
    done = subprocess.run(
        [found, "anthropic.mjs", url, json.dumps(plan)],
        cwd=JS,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"{call} failed:\n{done.stderr}\n{done.stdout}"
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines[-1] == {"kind": "end", "value": None}, done.stdout
    return [Received(line["kind"], line["value"]) for line in lines[:-1]]


def on_the_wire(url: str, body: dict[str, Any], key: str = KEY) -> requests.Response:
    return requests.post(
        f"{url}/v1/messages",
        json=body,
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        timeout=60,
    )


def ask(**fields: Any) -> dict[str, Any]:
    return {"model": SLOW, "max_tokens": 64, "messages": HI, **fields}


def chats(fake: FakeUpstream) -> list[UpstreamRequest]:
    return [r for r in fake.requests if r.path.endswith("/chat/completions")]


def toks(count: int) -> str:
    return "".join(f"tok{n} " for n in range(count))


def test_create_whole(url: str) -> None:
    [got] = node(url, "create", ask(model="fake?chunks=3"))
    assert got.kind == "message"
    assert same_id(got.value) == same_id(on_the_wire(url, ask(model="fake?chunks=3")).json())
    assert got.value["content"] == [{"type": "text", "text": toks(3)}]


def test_create_streamed_is_every_event_on_the_wire(url: str) -> None:
    got = node(url, "create", ask(stream=True))
    assert {r.kind for r in got} == {"event"}
    expected = wire_events(on_the_wire(url, ask(stream=True)))
    assert same_id([r.value for r in got]) == same_id(expected)
    assert [e["type"] for e in expected][-2:] == ["message_delta", "message_stop"]


def test_messages_stream_and_its_final_message(url: str) -> None:
    *events, final = node(url, "stream", ask())
    assert final.kind == "final"
    expected = wire_events(on_the_wire(url, ask(stream=True)))
    assert same_id([raw_event(e.value) for e in events]) == same_id(expected)
    whole = on_the_wire(url, ask()).json()
    # The SDK's own additions to the message it accumulates, all null here.
    added = {k: final.value.pop(k) for k in set(final.value) - set(whole)}
    assert set(added.values()) <= {None}, added
    assert same_id(final.value) == same_id(whole)


def test_a_tool_round(url: str, upstream: FakeUpstream) -> None:
    body = ask(model="fake?tool_calls=1&chunks=2", tools=[TOOL])
    first, second = node(url, "tool_round", body)
    [call] = first.value["content"]
    assert (call["type"], call["name"], call["input"]) == (
        "tool_use",
        "get_weather",
        {"city": "Paris", "call": 0},
    )
    _, answered = chats(upstream)
    assert answered.body["messages"][1:] == [
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
    assert second.value["stop_reason"] == "tool_use"
    wire = on_the_wire(url, body).json()
    wire["content"][0]["id"] = call["id"]
    assert same_id(first.value) == same_id(wire)


def test_thinking_on_a_reasoning_model(url: str) -> None:
    body = ask(
        model="fake?chunks=2&reasoning=2&interval=0.2&prefill=1&created=1700000000",
        max_tokens=4096,
        thinking={"type": "enabled", "budget_tokens": 2048},
    )
    *events, final = node(url, "stream", body)
    expected = wire_events(on_the_wire(url, {**body, "stream": True}))
    assert same_id([raw_event(e.value) for e in events]) == same_id(expected)
    thinking, text = final.value["content"]
    assert (thinking["type"], thinking["thinking"]) == ("thinking", "think0 think1 ")
    assert thinking["signature"] == expected[4]["delta"]["signature"]
    assert text == {"type": "text", "text": toks(2)}


def test_an_image(url: str, upstream: FakeUpstream) -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
    body = ask(model="fake?chunks=2", messages=[{"role": "user", "content": [image]}])
    [got] = node(url, "create", body)
    assert got.value["content"] == [{"type": "text", "text": toks(2)}]
    assert chats(upstream)[0].images == [f"data:image/png;base64,{PNG}"]


def test_count_tokens_and_the_models(url: str) -> None:
    [count] = node(url, "count_tokens", {"model": "fake", "messages": HI})
    assert count.value == {"input_tokens": 5, "estimated": True}
    [model] = node(url, "models", {})
    assert (model.value["type"], model.value["id"]) == ("model", "default")


def test_a_wrong_key_and_a_bad_body(url: str) -> None:
    for auth in ({"apiKey": "wrong-key"}, {"authToken": "wrong-key"}):
        [refused] = node(url, "create", ask(), **auth)
        assert (refused.kind, refused.value["class"], refused.value["status"]) == (
            "error",
            "AuthenticationError",
            401,
        )
        assert refused.value["body"] == on_the_wire(url, ask(), key="wrong-key").json()
    body = ask(temperature=2)
    [bad] = node(url, "create", body)
    assert (bad.value["class"], bad.value["status"]) == ("BadRequestError", 400)
    assert (
        bad.value["body"]
        == on_the_wire(url, body).json()
        == {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "message": "temperature: Input should be less than or equal to 1",
            },
        }
    )
