"""``/v1/messages`` on the wire, in the app's own process against the fake upstream: each
stream byte for byte (text, thinking, tool use, a stop sequence, the token limit, an error
mid-stream, the ping heartbeat), the whole Message, the conversation the upstream gets
(system, images, documents, tool use and results, turns combined), the fields passed and
refused, the errors in Anthropic's shape and statuses, keys from ``x-api-key``, the
betas, ``count_tokens`` (by the upstream's tokenizer, else estimated), the models'
listing, and a stream resumed with ``Last-Event-ID``."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient

from stageserver.anthropic_api import betas
from stageserver.anthropic_api.errors import error_type, status_of
from testing.apps import app_client, settle
from testing.fake_upstream import FakeUpstream, UpstreamRequest
from testing.sse import parse_events

HI = [{"role": "user", "content": "hi"}]
MODEL = "fake?chunks=2&created=1700000000"
PNG = "iVBORw0KGgo="
IMAGE_URL = "https://images.example/cat.png"
MESSAGE_ID = re.compile(rb"msg_[0-9a-f]{32}")


def ask(**fields: Any) -> dict[str, Any]:
    """A Messages request: ``MODEL``, 64 tokens, "hi", and ``fields``."""
    return {"model": MODEL, "max_tokens": 64, "messages": HI, **fields}


@pytest.fixture
def flask_client(upstream: FakeUpstream) -> Iterator[FlaskClient]:
    with app_client({"STAGESERVER_UPSTREAM_URL": upstream.url}) as test_client:
        yield test_client


def chats(fake: FakeUpstream) -> list[UpstreamRequest]:
    """The chat requests it got (an upstream's kind may probe it first)."""
    return [r for r in fake.requests if r.path.endswith("/chat/completions")]


def upstreams(fake: FakeUpstream, **declared: dict[str, Any]) -> dict[str, str]:
    return {
        "STAGESERVER_UPSTREAMS": json.dumps(
            {name: {"url": fake.url, **spec} for name, spec in declared.items()}
        )
    }


def same_ids(wire: bytes, message_id: str) -> bytes:
    """``wire`` with the message's id as ``ID``: the same in every run."""
    return wire.replace(message_id.encode(), b"ID")


def event(seq: int, kind: str, data: dict[str, Any]) -> bytes:
    """One event of a Messages stream, as stageserver writes it (compact JSON)."""
    body = json.dumps({"type": kind, **data}, separators=(",", ":"), ensure_ascii=False)
    return f"id: ID-{kind}-{seq}\nevent: {kind}\ndata: {body}\n\n".encode()


def start(seq: int, model: str = MODEL, input_tokens: int = 5) -> bytes:
    message: dict[str, Any] = {
        "id": "ID",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": 0},
    }
    return event(seq, "message_start", {"message": message})


def block_start(seq: int, index: int, **block: Any) -> bytes:
    return event(seq, "content_block_start", {"index": index, "content_block": block})


def delta(seq: int, index: int, **value: Any) -> bytes:
    return event(seq, "content_block_delta", {"index": index, "delta": value})


def block_stop(seq: int, index: int) -> bytes:
    return event(seq, "content_block_stop", {"index": index})


def usage(output: int, input_tokens: int = 1, **more: Any) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "output_tokens": output,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        **more,
    }


def end(seq: int, stop_reason: str, used: dict[str, Any], stop: str | None = None) -> bytes:
    finish = event(
        seq,
        "message_delta",
        {"delta": {"stop_reason": stop_reason, "stop_sequence": stop}, "usage": used},
    )
    return finish + event(seq + 1, "message_stop", {})


def streamed(client: FlaskClient, body: dict[str, Any], **headers: str) -> bytes:
    """The stream of ``body`` as the client read it, its message's id as ``ID``."""
    answer = client.post("/v1/messages", json={**body, "stream": True}, headers=headers)
    assert answer.status_code == 200, answer.data
    assert answer.mimetype == "text/event-stream"
    message_id = answer.headers["X-Stage-Id"]
    assert MESSAGE_ID.fullmatch(message_id.encode())
    return same_ids(answer.data, message_id)


def whole(client: FlaskClient, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    answer = client.post("/v1/messages", json=body)
    found: dict[str, Any] = answer.get_json()
    if answer.status_code == 200:
        assert found["id"] == answer.headers["X-Stage-Id"]
        found["id"] = "ID"
    return answer.status_code, found


# -- streams, byte for byte ---------------------------------------------------------------------


def test_a_text_stream_is_anthropics_events_in_order(flask_client: FlaskClient) -> None:
    wire = streamed(flask_client, ask(), **{"anthropic-version": "2023-06-01"})
    assert wire == (
        start(0)
        + block_start(1, 0, type="text", text="")
        + delta(2, 0, type="text_delta", text="tok0 ")
        + delta(3, 0, type="text_delta", text="tok1 ")
        + block_stop(4, 0)
        + end(5, "end_turn", usage(2))
    )


def test_a_whole_message_is_the_messages_apis_message(flask_client: FlaskClient) -> None:
    assert whole(flask_client, ask()) == (
        200,
        {
            "id": "ID",
            "type": "message",
            "role": "assistant",
            "model": MODEL,
            "content": [{"type": "text", "text": "tok0 tok1 "}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": usage(2),
        },
    )


THINKER = "fake?chunks=2&reasoning=2&created=1700000000"
SIGNATURE = "kTIpHUo1muAciH4URQIBogEWHSv65zyXvChNUWI9Gsg="  # think0 think1, digested


def test_a_reasoning_models_thinking_is_a_block_before_the_text(flask_client: FlaskClient) -> None:
    body = ask(model=THINKER, thinking={"type": "enabled", "budget_tokens": 1024}, max_tokens=2048)
    assert streamed(flask_client, body) == (
        start(0, THINKER)
        + block_start(1, 0, type="thinking", thinking="", signature="")
        + delta(2, 0, type="thinking_delta", thinking="think0 ")
        + delta(3, 0, type="thinking_delta", thinking="think1 ")
        + delta(4, 0, type="signature_delta", signature=SIGNATURE)
        + block_stop(5, 0)
        + block_start(6, 1, type="text", text="")
        + delta(7, 1, type="text_delta", text="tok0 ")
        + delta(8, 1, type="text_delta", text="tok1 ")
        + block_stop(9, 1)
        + end(10, "end_turn", usage(4, output_tokens_details={"thinking_tokens": 2}))
    )
    status, message = whole(flask_client, body)
    assert status == 200
    assert message["content"] == [
        {"type": "thinking", "thinking": "think0 think1 ", "signature": SIGNATURE},
        {"type": "text", "text": "tok0 tok1 "},
    ]


def test_thinking_shown_omitted_is_an_empty_block_with_its_signature(
    flask_client: FlaskClient,
) -> None:
    body = ask(
        model=THINKER,
        max_tokens=2048,
        thinking={"type": "enabled", "budget_tokens": 1024, "display": "omitted"},
    )
    events = parse_events(streamed(flask_client, body))
    kinds = [(e["event"], e["data"].get("delta", {}).get("type")) for e in events]
    assert ("content_block_delta", "thinking_delta") not in kinds
    assert events[1]["data"]["content_block"]["type"] == "thinking"
    assert events[2]["data"]["delta"] == {"type": "signature_delta", "signature": SIGNATURE}
    _, message = whole(flask_client, body)
    assert message["content"][0] == {"type": "thinking", "thinking": "", "signature": SIGNATURE}


TOOL = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def test_a_tool_call_is_a_tool_use_block_its_arguments_streamed_as_they_come(
    flask_client: FlaskClient, upstream: FakeUpstream
) -> None:
    body = ask(model="fake?tool_calls=1&chunks=2", tools=[TOOL])
    wire = streamed(flask_client, body)
    [request] = chats(upstream)
    call_id = f"call_fake_{request.index}_0"
    assert wire == (
        start(0, body["model"])
        + block_start(1, 0, type="tool_use", id=call_id, name="get_weather", input={})
        + delta(2, 0, type="input_json_delta", partial_json='{"city":"Par')
        + delta(3, 0, type="input_json_delta", partial_json='is","call":0}')
        + block_stop(4, 0)
        + end(5, "tool_use", usage(3))
    )
    assert request.body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city.",
                "parameters": TOOL["input_schema"],
            },
        }
    ]
    status, message = whole(flask_client, body)
    assert (status, message["stop_reason"]) == (200, "tool_use")
    assert message["content"] == [
        {
            "type": "tool_use",
            "id": f"call_fake_{chats(upstream)[-1].index}_0",
            "name": "get_weather",
            "input": {"city": "Paris", "call": 0},
        }
    ]


def test_a_stop_sequence_the_upstream_names_is_the_stop_reason(
    flask_client: FlaskClient, upstream: FakeUpstream
) -> None:
    body = ask(model="fake?chunks=4&created=1700000000", stop_sequences=["tok2", "never"])
    wire = streamed(flask_client, body)
    assert chats(upstream)[0].body["stop"] == ["tok2", "never"]
    assert wire.endswith(end(5, "stop_sequence", usage(2), stop="tok2"))
    status, message = whole(flask_client, body)
    assert message["content"] == [{"type": "text", "text": "tok0 tok1 "}]
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", "tok2")


def test_the_token_limit_is_max_tokens(flask_client: FlaskClient, upstream: FakeUpstream) -> None:
    body = ask(model="fake?chunks=5&created=1700000000", max_tokens=2)
    assert streamed(flask_client, body).endswith(end(5, "max_tokens", usage(2)))
    assert chats(upstream)[0].body["max_tokens"] == 2


def test_a_failure_mid_stream_is_an_error_event_and_the_end(flask_client: FlaskClient) -> None:
    # Nothing continues an answer on the fake's default kind (openai: mode none).
    body = ask(model="fake?chunks=4&mode=drop&after=2&created=1700000000")
    wire = streamed(flask_client, body)
    events = parse_events(wire)
    assert [e["event"] for e in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "error",
    ]
    assert events[-1]["id"] == "ID-error-4"
    assert events[-1]["data"]["type"] == "error"
    error = events[-1]["data"]["error"]
    assert error["type"] == "api_error"
    assert error["message"].startswith("upstream 'default' dropped the connection mid-stream")


def test_a_quiet_stream_pings(upstream: FakeUpstream) -> None:
    config = {"STAGESERVER_UPSTREAM_URL": upstream.url, "STAGESERVER_HEARTBEAT_SECONDS": 0.1}
    with app_client(config) as client:
        wire = streamed(client, ask(model=f"{MODEL}&prefill=0.5"))
    ping = b'event: ping\ndata: {"type":"ping"}\n\n'
    assert wire.startswith(start(0, f"{MODEL}&prefill=0.5") + ping)
    assert [e["event"] for e in parse_events(wire)][:3] == ["message_start", "ping", "ping"]
    assert wire.endswith(end(5, "end_turn", usage(2)))


# -- the conversation the upstream gets ------------------------------------------------------


def test_the_conversation_becomes_chat_completions_messages(
    flask_client: FlaskClient, upstream: FakeUpstream
) -> None:
    body = ask(
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        messages=[
            {"role": "user", "content": "What is in these?"},
            {
                "role": "user",
                "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                 "data": PNG}},
                    {"type": "image", "source": {"type": "url", "url": IMAGE_URL}},
                    {
                        "type": "document",
                        "title": "Notes",
                        "source": {"type": "text", "media_type": "text/plain", "data": "A cat."},
                    },
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "Hmm.", "signature": "sig"},
                    {"type": "redacted_thinking", "data": "opaque"},
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "look", "input": {"at": 1}},
                    {"type": "tool_use", "id": "toolu_2", "name": "look", "input": {}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "a cat"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_2",
                        "is_error": True,
                        "content": [
                            {"type": "text", "text": "a picture:"},
                            {"type": "image", "source": {"type": "url", "url": IMAGE_URL}},
                        ],
                    },
                    {"type": "text", "text": "And?"},
                ],
            },
            {"role": "system", "content": "Answer now."},
        ],
    )  # fmt: skip
    assert flask_client.post("/v1/messages", json=body).status_code == 200
    assert chats(upstream)[0].body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in these?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                {"type": "image_url", "image_url": {"url": IMAGE_URL}},
                {"type": "text", "text": "Notes"},
                {"type": "text", "text": "A cat."},
            ],
        },
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "look", "arguments": '{"at":1}'},
                },
                {
                    "id": "toolu_2",
                    "type": "function",
                    "function": {"name": "look", "arguments": "{}"},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "a cat"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "a picture:"},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": IMAGE_URL}},
                {"type": "text", "text": "And?"},
            ],
        },
        {"role": "system", "content": "Answer now."},
    ]


def test_text_blocks_of_one_turn_are_one_text_and_a_document_of_blocks_is_read(
    flask_client: FlaskClient, upstream: FakeUpstream
) -> None:
    document = {
        "type": "document",
        "context": "From the wiki.",
        "source": {"type": "content", "content": [{"type": "text", "text": "Cats purr."}]},
    }
    body = ask(
        system="Be brief.",
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "one"}, document]},
            {"role": "user", "content": "two"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f",
                                               "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t"}]},
            {"role": "assistant", "content": "The answer is ("},
        ],
    )  # fmt: skip
    assert flask_client.post("/v1/messages", json=body).status_code == 200
    assert chats(upstream)[0].body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "one\nFrom the wiki.\nCats purr.\ntwo"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "t", "type": "function", "function": {"name": "f",
                                                                        "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "t", "content": ""},
        {"role": "assistant", "content": "The answer is ("},
    ]  # fmt: skip


# -- the fields ----------------------------------------------------------------------------------


def test_sampling_stops_and_tool_choice_pass_as_chat_completions_names_them(
    flask_client: FlaskClient, upstream: FakeUpstream
) -> None:
    choices: list[tuple[dict[str, Any], dict[str, Any]]] = [
        ({"type": "auto"}, {"tool_choice": "auto"}),
        ({"type": "any", "disable_parallel_tool_use": True},
         {"tool_choice": "required", "parallel_tool_calls": False}),
        ({"type": "tool", "name": "get_weather"},
         {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
        ({"type": "none"}, {"tool_choice": "none"}),
    ]  # fmt: skip
    for choice, sent in choices:
        body = ask(tools=[TOOL], tool_choice=choice, temperature=0.5, top_p=0.9)
        assert flask_client.post("/v1/messages", json=body).status_code == 200
        request = chats(upstream)[-1].body
        assert {k: request[k] for k in sent} == sent
        assert (request["temperature"], request["top_p"]) == (0.5, 0.9)
        assert "parallel_tool_calls" in sent or "parallel_tool_calls" not in request


def test_thinking_and_effort_pass_as_reasoning_effort_and_qwens_enable_thinking(
    upstream: FakeUpstream,
) -> None:
    config = upstreams(
        upstream, vllm={"kind": "vllm"}, hosted={"kind": "openai", "models": ["hosted"]}
    )
    cases = [
        ({"type": "enabled", "budget_tokens": 1024}, None, "low", True),
        ({"type": "enabled", "budget_tokens": 8000}, None, "medium", True),
        ({"type": "enabled", "budget_tokens": 16384}, None, "high", True),
        ({"type": "enabled", "budget_tokens": 1024}, "max", "high", True),
        ({"type": "adaptive"}, None, None, True),
        ({"type": "between_tools"}, "low", "low", True),
        ({"type": "disabled"}, None, None, False),
        (None, None, None, None),
    ]
    with app_client(config) as client:
        for thinking, effort, reasoning_effort, enable in cases:
            fields: dict[str, Any] = {"max_tokens": 20000}
            if thinking is not None:
                fields["thinking"] = thinking
            if effort is not None:
                fields["output_config"] = {"effort": effort}
            for target in ("vllm", "hosted"):
                model = "fake" if target == "vllm" else "hosted"
                answer = client.post("/v1/messages", json=ask(model=model, **fields))
                assert answer.status_code == 200, answer.get_json()
                sent = chats(upstream)[-1].body
                assert sent.get("reasoning_effort") == reasoning_effort, (thinking, effort)
                kwargs = sent.get("chat_template_kwargs")
                if target == "hosted" or enable is None:
                    assert kwargs is None, (thinking, target)
                else:
                    assert kwargs == {"enable_thinking": enable}


def test_output_formats_schema_is_the_response_format(
    flask_client: FlaskClient, upstream: FakeUpstream
) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    body = ask(output_config={"format": {"type": "json_schema", "schema": schema}})
    assert flask_client.post("/v1/messages", json=body).status_code == 200
    assert chats(upstream)[0].body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema},
    }


def test_top_k_and_other_fields_reach_an_upstream_that_takes_them_and_merge_with_hints(
    upstream: FakeUpstream,
) -> None:
    config = upstreams(
        upstream, vllm={"kind": "vllm"}, hosted={"kind": "openai", "models": ["hosted"]}
    )
    with app_client(config) as client:
        body = ask(
            top_k=20,
            min_p=0.05,
            thinking={"type": "disabled"},
            chat_template_kwargs={"custom": 1},
        )
        assert client.post("/v1/messages", json=body).status_code == 200
        sent = chats(upstream)[-1].body
        assert (sent["top_k"], sent["min_p"]) == (20, 0.05)
        assert sent["chat_template_kwargs"] == {"enable_thinking": False, "custom": 1}
        refused = client.post("/v1/messages", json=ask(model="hosted", top_k=20))
    assert refused.status_code == 400
    assert refused.get_json() == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "top_k: is not supported by this server (upstream 'hosted' takes no "
            "such field; its extra_fields lists those it takes)",
        },
    }


def test_fields_that_change_nothing_are_taken_and_not_sent(
    flask_client: FlaskClient, upstream: FakeUpstream
) -> None:
    body = ask(
        metadata={"user_id": "u-1"},
        cache_control={"type": "ephemeral", "ttl": "1h"},
        service_tier="standard_only",
        speed="fast",
        inference_geo="us",
        diagnostics={"previous_message_id": "msg_1"},
        user_profile_id="up_1",
        workspace_id="wrkspc_1",
    )
    assert flask_client.post("/v1/messages", json=body).status_code == 200
    sent = chats(upstream)[0].body
    assert set(sent) == {"model", "messages", "max_tokens", "stream", "stream_options"}


REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"model": MODEL, "messages": HI}, "max_tokens: Field required"),
    (ask(max_tokens=0), "max_tokens: Input should be greater than or equal to 1"),
    (ask(messages=[]), "messages: List should have at least 1 item after validation, not 0"),
    (ask(temperature=1.5), "temperature: Input should be less than or equal to 1"),
    (
        ask(messages=[{"role": "user", "content": [{"type": "text", "text": "x", "y": 1}]}]),
        "messages.0.content.0.y: Extra inputs are not permitted",
    ),
    (
        ask(messages=[{"role": "user", "content": [{"type": "search_result", "title": "t"}]}]),
        "messages.0.content.0.type: is not a type this server takes (it takes 'text', 'image', "
        "'document', 'thinking', 'redacted_thinking', 'tool_use', 'tool_result')",
    ),
    (
        ask(tools=[{"type": "web_search_20250305", "name": "web_search"}]),
        "tools.0.type: 'web_search_20250305' is one of Anthropic's own tools, which run on its "
        "side or are built into Claude; this server runs custom tools (a name and an "
        "input_schema), as function tools of the upstream",
    ),
    (
        ask(messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "file", "file_id": "file_1"}}]}]),
        "messages.0.content.0.source.type: 'file' names a file of Anthropic's Files API, which "
        "this server does not keep: send the image as base64 data or by URL",
    ),
    (
        ask(messages=[{"role": "user", "content": [{"type": "document", "source": {
            "type": "base64", "media_type": "application/pdf", "data": "JVBER"}}]}]),
        "messages.0.content.0.source.type: 'base64' is a PDF, which no upstream here reads: "
        "send the document's text (a source of type 'text' or 'content')",
    ),
    (
        ask(messages=[{"role": "user", "content": [
            {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]),
        "messages.0.content.0.type: a tool_use block cannot be in a user message",
    ),
    (
        ask(thinking={"type": "enabled", "budget_tokens": 1024}),
        "thinking.budget_tokens: must be less than max_tokens (64): thinking counts toward "
        "max_tokens",
    ),
    (
        ask(thinking={"type": "enabled", "budget_tokens": 100}, max_tokens=4096),
        "thinking.budget_tokens: Input should be greater than or equal to 1024",
    ),
    (
        ask(container="container_1"),
        "container: Anthropic's code-execution containers do not run here",
    ),
    (ask(metadata={"user_id": "u", "tier": 1}), "metadata.tier: Extra inputs are not permitted"),
    (ask(unknown_field=1), "unknown_field: is not supported by this server (upstream 'default' "
     "takes no such field; its extra_fields lists those it takes)"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "message"), REFUSED, ids=[m[:40] for _, m in REFUSED])
def test_a_bad_request_is_a_400_in_anthropics_shape_naming_the_field(
    flask_client: FlaskClient, upstream: FakeUpstream, body: dict[str, Any], message: str
) -> None:
    answer = flask_client.post("/v1/messages", json=body)
    assert answer.status_code == 400
    assert answer.get_json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": message},
    }
    assert answer.headers["request-id"] == answer.headers["X-Request-ID"]
    assert chats(upstream) == []


def test_a_body_that_is_no_json_object_is_a_400(flask_client: FlaskClient) -> None:
    answer = flask_client.post("/v1/messages", data=b"[1]")
    assert (answer.status_code, answer.get_json()) == (
        400,
        {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "message": "request body must be a JSON object, not an array",
            },
        },
    )


def test_an_upstreams_own_400_is_an_invalid_request_naming_the_message(
    flask_client: FlaskClient,
) -> None:
    image = {"type": "image", "source": {"type": "url", "url": IMAGE_URL}}
    body = ask(
        model="fake?vision=0",
        system="Look.",
        messages=[{"role": "user", "content": ["What is it?", image][1:]}],
    )
    status, answer = whole(flask_client, body)
    assert status == 400
    assert answer == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "messages.0: upstream 'default' answered HTTP 400: image input is not "
            "supported by this model",
        },
    }
    events = parse_events(streamed(flask_client, body))
    assert [e["event"] for e in events] == ["message_start", "error"]
    assert events[1]["data"] == answer


@pytest.mark.parametrize(
    ("model", "status", "kind"),
    [
        ("fake?mode=status&status=500", 502, "api_error"),
        ("fake?mode=status&status=429", 529, "overloaded_error"),
        ("fake?mode=hang", 504, "timeout_error"),
    ],
)
def test_an_upstreams_failure_has_anthropics_status_and_type(
    upstream: FakeUpstream, model: str, status: int, kind: str
) -> None:
    config = {
        "STAGESERVER_UPSTREAM_URL": upstream.url,
        "STAGESERVER_FIRST_TOKEN_TIMEOUT": 0.5,
        "STAGESERVER_IDLE_TIMEOUT": 0.5,
    }
    with app_client(config) as client:
        answer = client.post("/v1/messages", json=ask(model=model))
    assert answer.status_code == status
    body = answer.get_json()
    assert (body["type"], body["error"]["type"]) == ("error", kind)


def test_the_statuses_and_types_of_stageservers_own_refusals() -> None:
    assert [status_of(s) for s in (400, 401, 404, 413, 422, 429, 500, 503, 504)] == [
        400, 401, 404, 413, 400, 429, 500, 529, 504,
    ]  # fmt: skip
    assert [error_type(s) for s in (400, 401, 403, 404, 413, 429, 499, 500, 502, 504, 529)] == [
        "invalid_request_error", "authentication_error", "permission_error", "not_found_error",
        "request_too_large", "rate_limit_error", "invalid_request_error", "api_error",
        "api_error", "timeout_error", "overloaded_error",
    ]  # fmt: skip


def test_a_full_worker_is_a_529_overloaded_error_with_retry_after(upstream: FakeUpstream) -> None:
    config = {
        "STAGESERVER_UPSTREAM_URL": upstream.url,
        "STAGESERVER_MAX_ACTIVE_STREAMS": 1,
        # In the test's threads, a cancel reaches a stage still waiting for its upstream's
        # headers when they come, or when its read times out (the larger of these two):
        # the stage is over before the test is, and counts in no later test's metrics.
        "STAGESERVER_FIRST_TOKEN_TIMEOUT": 1,
        "STAGESERVER_IDLE_TIMEOUT": 1,
    }
    with app_client(config) as client:
        first = client.post(
            "/v1/messages", json=ask(model="fake?mode=hang", stream=True), buffered=False
        )
        stage_id = first.headers["X-Stage-Id"]
        try:
            refused = client.post("/v1/messages", json=ask())
        finally:
            cancel = client.post(f"/stages/{stage_id}/cancel")
            first.close()
        settle(client, stage_id)
    assert cancel.status_code == 202
    assert refused.status_code == 529
    assert refused.headers["Retry-After"] == "1"
    assert refused.get_json()["error"]["type"] == "overloaded_error"


def test_a_large_body_is_a_413_request_too_large(upstream: FakeUpstream) -> None:
    config = {"STAGESERVER_UPSTREAM_URL": upstream.url, "STAGESERVER_MAX_BODY_BYTES": 2048}
    with app_client(config) as client:
        answer = client.post("/v1/messages", json=ask(system="x" * 4096))
    assert answer.status_code == 413
    assert answer.get_json()["error"]["type"] == "request_too_large"


# -- keys ---------------------------------------------------------------------------------------

KEYS = {"alice": {"key": "alice-key-0123456789"}, "bob": {"key": "bob-key-0123456789"}}


@pytest.fixture
def keyed(upstream: FakeUpstream) -> Iterator[FlaskClient]:
    config = {"STAGESERVER_UPSTREAM_URL": upstream.url, "STAGESERVER_API_KEYS": KEYS}
    with app_client(config) as test_client:
        yield test_client


def test_x_api_key_names_the_principal_as_a_bearer_key_does(keyed: FlaskClient) -> None:
    by_api_key = keyed.post("/v1/messages", json=ask(), headers={"x-api-key": KEYS["alice"]["key"]})
    assert by_api_key.status_code == 200
    message_id = by_api_key.headers["X-Stage-Id"]
    bearer = {"Authorization": f"Bearer {KEYS['alice']['key']}"}
    assert keyed.get(f"/stages/{message_id}", headers=bearer).get_json()["status"] == "done"
    both = {**bearer, "x-api-key": KEYS["alice"]["key"]}
    assert keyed.post("/v1/messages", json=ask(), headers=both).status_code == 200
    # Another principal's message looks like none at all.
    other = keyed.get(f"/stages/{message_id}", headers={"x-api-key": KEYS["bob"]["key"]})
    assert other.status_code == 404


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "this server requires an API key: send 'Authorization: Bearer <key>'"),
        ({"x-api-key": "wrong-key"}, "unknown API key"),
        ({"x-api-key": "two words"}, "malformed x-api-key header: expected the key"),
        (
            {"x-api-key": KEYS["alice"]["key"], "Authorization": f"Bearer {KEYS['bob']['key']}"},
            "Authorization and x-api-key carry the keys of two principals: send one key",
        ),
        (
            {"x-api-key": KEYS["alice"]["key"], "Authorization": "Bearer wrong-key"},
            "unknown API key",
        ),
    ],
)
def test_a_wrong_key_is_a_401_authentication_error(
    keyed: FlaskClient, upstream: FakeUpstream, headers: dict[str, str], message: str
) -> None:
    answer = keyed.post("/v1/messages", json=ask(), headers=headers)
    assert answer.status_code == 401
    assert answer.get_json() == {
        "type": "error",
        "error": {"type": "authentication_error", "message": message},
    }
    assert answer.headers["WWW-Authenticate"].startswith('Bearer realm="stageserver"')
    assert chats(upstream) == []


def test_a_key_in_no_header_is_never_logged(
    keyed: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        keyed.post("/v1/messages", json=ask(), headers={"x-api-key": "secret-wrong-key-42"})
        keyed.post("/v1/messages", json=ask(), headers={"x-api-key": KEYS["alice"]["key"]})
    assert "secret-wrong-key-42" not in caplog.text
    assert KEYS["alice"]["key"] not in caplog.text


# -- headers -------------------------------------------------------------------------------------


def test_an_unknown_beta_is_ignored_and_logged_once(
    flask_client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    name = "some-new-beta-2099-01-01"
    headers = {
        "anthropic-version": "2023-06-01",
        "anthropic-beta": f"claude-code-20250219, {name},interleaved-thinking-2025-05-14",
    }
    betas._logged.discard(name)
    with caplog.at_level(logging.INFO, logger="stageserver.anthropic"):
        for _ in range(2):
            assert flask_client.post("/v1/messages", json=ask(), headers=headers).status_code == 200
    logged = [r.getMessage() for r in caplog.records if r.name == "stageserver.anthropic"]
    assert logged == [f"anthropic-beta {name!r} is not one this server knows: ignored"]


def test_a_preflight_allows_the_anthropic_sdks_headers(upstream: FakeUpstream) -> None:
    config = {
        "STAGESERVER_UPSTREAM_URL": upstream.url,
        "STAGESERVER_CORS_ORIGINS": ["https://app.example"],
    }
    asked = (
        "x-api-key, anthropic-version, anthropic-dangerous-direct-browser-access, "
        "x-stainless-lang, x-stage-resumable, content-type, x-evil"
    )
    with app_client(config) as client:
        preflight = client.options(
            "/v1/messages",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": asked,
            },
        )
        answer = client.post("/v1/messages", json=ask(), headers={"Origin": "https://app.example"})
    allowed = {
        h.strip().lower() for h in preflight.headers["Access-Control-Allow-Headers"].split(",")
    }
    assert set(asked.split(", ")) - allowed == {"x-evil"}
    exposed = answer.headers["Access-Control-Expose-Headers"]
    assert "X-Stage-Id" in exposed and "request-id" in exposed


def test_x_stage_resumable_makes_a_message_resumable(flask_client: FlaskClient) -> None:
    answer = flask_client.post("/v1/messages", json=ask(), headers={"X-Stage-Resumable": "true"})
    status = flask_client.get(f"/stages/{answer.headers['X-Stage-Id']}").get_json()
    assert (status["resumable"], status["text"]) == (True, "tok0 tok1 ")
    plain = flask_client.post("/v1/messages", json=ask())
    assert (
        flask_client.get(f"/stages/{plain.headers['X-Stage-Id']}").get_json()["resumable"] is False
    )
    bad = flask_client.post("/v1/messages", json=ask(), headers={"X-Stage-Resumable": "yes"})
    assert (bad.status_code, bad.get_json()["error"]["message"]) == (
        400,
        "X-Stage-Resumable: must be true or false",
    )


def test_a_stream_resumes_after_its_last_event_id(flask_client: FlaskClient) -> None:
    answer = flask_client.post("/v1/messages", json=ask(stream=True))
    message_id = answer.headers["X-Stage-Id"]
    events = parse_events(answer.data)
    after = events[2]["id"]
    assert after == f"{message_id}-content_block_delta-2"
    rest = flask_client.get(f"/stages/{message_id}/events", headers={"Last-Event-ID": after})
    assert rest.status_code == 200
    # The rest, the same bytes: the log holds what every host replays.
    blocks = [block + b"\n\n" for block in answer.data.split(b"\n\n")[:-1]]
    assert rest.data == b"retry: 3000\n" + b"".join(blocks[3:])
    assert parse_events(rest.data) == events[3:]
    last = flask_client.get(
        f"/stages/{message_id}/events", headers={"Last-Event-ID": events[-1]["id"]}
    )
    assert last.status_code == 204


# -- count_tokens ------------------------------------------------------------------------------


def test_count_tokens_estimates_where_the_upstream_has_no_tokenizer(
    flask_client: FlaskClient,
) -> None:
    body = {"model": "fake", "system": "Be brief.", "messages": HI}
    answer = flask_client.post("/v1/messages/count_tokens", json=body)
    # "Be brief." (9 characters: 3) and "hi" (1), each and 4 for its message.
    assert (answer.status_code, answer.get_json()) == (200, {"input_tokens": 12, "estimated": True})
    with_tools = flask_client.post("/v1/messages/count_tokens", json={**body, "tools": [TOOL]})
    assert with_tools.get_json()["input_tokens"] > 12


@pytest.mark.parametrize("kind", ["vllm", "llamacpp"])
def test_count_tokens_is_the_upstreams_tokenizers_count(upstream: FakeUpstream, kind: str) -> None:
    with app_client(upstreams(upstream, local={"kind": kind})) as client:
        answer = client.post(
            "/v1/messages/count_tokens",
            json={"model": "fake", "system": "Be brief.", "messages": HI, "tools": [TOOL]},
        )
    # The fake counts a token per character of the prompt its ChatML template renders.
    prompt = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    prompt += "<|im_start|>assistant\n"
    assert (answer.status_code, answer.get_json()) == (200, {"input_tokens": len(prompt)})
    messages = [{"role": "system", "content": "Be brief."}, *HI]
    # Not the continuation mode's probe, which asks the same endpoints of its own.
    counted = [
        r
        for r in upstream.requests
        if r.path in ("/apply-template", "/tokenize")
        and (r.body.get("messages") == messages or "content" in r.body)
    ]
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city.",
                "parameters": TOOL["input_schema"],
            },
        }
    ]
    if kind == "vllm":
        [tokenize] = counted
        assert (tokenize.path, tokenize.body) == (
            "/tokenize",
            {"model": "fake", "messages": messages, "add_generation_prompt": True, "tools": tools},
        )
    else:
        template, tokenize = counted
        assert (template.path, template.body) == (
            "/apply-template",
            {"messages": messages, "tools": tools},
        )
        assert tokenize.body == {"content": prompt, "add_special": True}
    # fmt: skip


def test_count_tokens_estimates_when_the_tokenizer_fails(upstream: FakeUpstream) -> None:
    with app_client(upstreams(upstream, local={"kind": "vllm"})) as client:
        answer = client.post(
            "/v1/messages/count_tokens", json={"model": "fake?mode=nonsense", "messages": HI}
        )
    assert answer.get_json() == {"input_tokens": 5, "estimated": True}


def test_count_tokens_refuses_a_field_it_does_not_take(flask_client: FlaskClient) -> None:
    answer = flask_client.post(
        "/v1/messages/count_tokens", json={"model": "fake", "messages": HI, "max_tokens": 5}
    )
    assert (answer.status_code, answer.get_json()["error"]["message"]) == (
        400,
        "max_tokens: Extra inputs are not permitted",
    )


# -- models ---------------------------------------------------------------------------------------


def test_models_in_anthropics_shape_with_anthropic_version(upstream: FakeUpstream) -> None:
    config = upstreams(upstream, a={"models": ["m1", "m2", "m3"]}, b={})
    version = {"anthropic-version": "2023-06-01"}
    with app_client(config) as client:
        listed = client.get("/v1/models", headers=version)
        first = client.get("/v1/models?limit=2", headers=version)
        after = client.get("/v1/models?limit=2&after_id=m2", headers=version)
        before = client.get("/v1/models?before_id=m3", headers=version)
        openai = client.get("/v1/models")
        bad = client.get("/v1/models?limit=0", headers=version)
        unknown = client.get("/v1/models?after_id=m9", headers=version)
    info = {"type": "model", "created_at": "1970-01-01T00:00:00Z", "lifecycle": "active"}
    models = [{**info, "id": m, "display_name": m} for m in ("m1", "m2", "m3", "b")]
    assert listed.get_json() == {
        "data": models,
        "has_more": False,
        "first_id": "m1",
        "last_id": "b",
    }
    assert first.get_json() == {
        "data": models[:2], "has_more": True, "first_id": "m1", "last_id": "m2",
    }  # fmt: skip
    assert after.get_json() == {
        "data": models[2:], "has_more": False, "first_id": "m3", "last_id": "b",
    }  # fmt: skip
    assert before.get_json() == {
        "data": models[:2], "has_more": False, "first_id": "m1", "last_id": "m2",
    }  # fmt: skip
    assert openai.get_json()["object"] == "list"
    assert (bad.status_code, bad.get_json()["error"]["message"]) == (
        400,
        "limit: must be a whole number from 1 to 1000",
    )
    assert (unknown.status_code, unknown.get_json()["error"]["message"]) == (
        400,
        "after_id: no model 'm9' here",
    )


def test_a_models_error_is_in_the_shape_its_client_reads(keyed: FlaskClient) -> None:
    anthropic = keyed.get("/v1/models", headers={"anthropic-version": "2023-06-01"})
    assert (anthropic.status_code, anthropic.get_json()) == (
        401,
        {
            "type": "error",
            "error": {
                "type": "authentication_error",
                "message": "this server requires an API key: send 'Authorization: Bearer <key>'",
            },
        },
    )
    openai = keyed.get("/v1/models")
    assert openai.status_code == 401
    assert openai.get_json()["error"]["code"] == "invalid_api_key"
