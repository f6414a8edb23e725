"""What a self-hosted model can do passes through ``/v1``: images, logprobs, a reasoning
model's reasoning and its token counts, and the fields an upstream takes beyond OpenAI's
API. Each read on the wire, in each dialect, streamed and whole, against the fake
upstream's reasoning, logprobs and text-only modes."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient

from stageserver.sse import compact_json, encode_event
from testing.apps import app_client
from testing.fake_upstream import FakeUpstream, UpstreamRequest
from testing.sse import parse_events

HI = [{"role": "user", "content": "hi"}]
THINKER = "fake?chunks=2&reasoning=2"
PNG = "data:image/png;base64,iVBORw0KGgo="
IMAGE_URL = "https://images.example/cat.png"


@pytest.fixture
def flask_client(upstream: FakeUpstream) -> Iterator[FlaskClient]:
    with app_client({"STAGESERVER_UPSTREAM_URL": upstream.url}) as test_client:
        yield test_client


def same_ids(wire: bytes, stage_id: str) -> bytes:
    """``wire`` with the stage's id as ``ID`` and every timestamp as 0: what is left is
    the same in every run."""
    wire = wire.replace(stage_id.encode(), b"ID")
    return re.sub(rb'"(created|created_at)":\d+', rb'"\1":0', wire)


def token(text: str, logprob: float, top: int = 0) -> dict[str, Any]:
    """A token's logprob as the fake upstream gives it (Chat Completions' shape)."""
    alternatives = [text if j == 0 else f"alt{j}" for j in range(top)]
    return {
        "token": text,
        "logprob": logprob,
        "bytes": list(text.encode()),
        "top_logprobs": [
            {"token": t, "logprob": logprob - j, "bytes": list(t.encode())}
            for j, t in enumerate(alternatives)
        ],
    }


# -- Chat Completions -----------------------------------------------------------------------


def chat_chunk(choice: dict[str, Any] | None, **extra: Any) -> bytes:
    head = {"id": "ID", "object": "chat.completion.chunk", "created": 0, "model": THINKER}
    body = {**head, "choices": [] if choice is None else [choice], **extra}
    return b"data: " + compact_json(body) + b"\n\n"


def test_a_reasoning_models_chat_stream_carries_its_reasoning_logprobs_and_usage(
    flask_client: FlaskClient,
) -> None:
    answer = flask_client.post(
        "/v1/chat/completions",
        json={
            "model": THINKER,
            "messages": HI,
            "stream": True,
            "logprobs": True,
            "top_logprobs": 2,
            "stream_options": {"include_usage": True},
        },
    )
    assert answer.status_code == 200
    wire = same_ids(answer.data, answer.headers["X-Stage-Id"])

    def delta(content: dict[str, Any], logprobs: Any = None) -> bytes:
        choice = {"index": 0, "delta": content, "logprobs": logprobs, "finish_reason": None}
        return chat_chunk(choice)

    usage = {
        "prompt_tokens": 1,
        "completion_tokens": 4,
        "total_tokens": 5,
        "completion_tokens_details": {"reasoning_tokens": 2},
    }
    assert wire == b"".join(
        [
            delta({"role": "assistant", "reasoning_content": "think0 "}),
            delta({"reasoning_content": "think1 "}),
            delta({"content": "tok0 "}, {"content": [token("tok0 ", -0.1, 2)]}),
            delta({"content": "tok1 "}, {"content": [token("tok1 ", -0.2, 2)]}),
            chat_chunk({"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}),
            chat_chunk(None, usage=usage),
            b"data: [DONE]\n\n",
        ]
    )


def test_a_whole_chat_answer_holds_the_reasoning_and_every_tokens_logprobs(
    flask_client: FlaskClient,
) -> None:
    answer = flask_client.post(
        "/v1/chat/completions",
        json={"model": THINKER, "messages": HI, "logprobs": True, "top_logprobs": 1},
    )
    assert answer.status_code == 200
    completion = answer.get_json()
    assert completion["choices"] == [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "tok0 tok1 ",
                "refusal": None,
                "reasoning_content": "think0 think1 ",
            },
            "logprobs": {
                "content": [token("tok0 ", -0.1, 1), token("tok1 ", -0.2, 1)],
                "refusal": None,
            },
            "finish_reason": "stop",
        }
    ]
    assert completion["usage"] == {
        "prompt_tokens": 1,
        "completion_tokens": 4,
        "total_tokens": 5,
        "completion_tokens_details": {"reasoning_tokens": 2},
    }


def test_vllms_newer_reasoning_field_passes_as_it_came_and_reads_as_reasoning_content(
    flask_client: FlaskClient,
) -> None:
    model = THINKER + "&reasoning_field=reasoning"
    streamed = flask_client.post(
        "/v1/chat/completions", json={"model": model, "messages": HI, "stream": True}
    )
    chunks = [json.loads(line[6:]) for line in streamed.data.split(b"\n\n") if line[6:7] == b"{"]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[:2] == [{"role": "assistant", "reasoning": "think0 "}, {"reasoning": "think1 "}]
    whole = flask_client.post("/v1/chat/completions", json={"model": model, "messages": HI})
    assert whole.get_json()["choices"][0]["message"]["reasoning_content"] == "think0 think1 "


def test_the_seeds_chunk_is_the_upstreams_reasoning_and_all(
    flask_client: FlaskClient, upstream: FakeUpstream
) -> None:
    body = {"stage_id": "thinks", "model_name": THINKER, "user_prompt": "hi", "stream": True}
    events = parse_events(flask_client.post("/chat", json=body).data)
    index = upstream.requests[0].index
    assert events[0]["data"]["chunk"]["id"] == f"chatcmpl-fake-{index}"
    assert [e["data"]["chunk"]["choices"][0]["delta"] for e in events[:2]] == [
        {"reasoning_content": "think0 "},
        {"reasoning_content": "think1 "},
    ]
    assert events[-1]["data"]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 2}


# -- Responses ------------------------------------------------------------------------------


def responses_events(wire: bytes) -> list[dict[str, Any]]:
    """Each event's data; each block, byte for byte, its type's event with that data."""
    events = []
    for block in wire.split(b"\n\n")[:-1]:
        name, data = block.split(b"\n")
        event = json.loads(data.removeprefix(b"data: "))
        assert block + b"\n\n" == encode_event(event["type"], compact_json(event))
        assert name == b"event: " + event["type"].encode()
        events.append(event)
    return events


def test_a_reasoning_models_response_stream_has_a_reasoning_item_before_the_message(
    flask_client: FlaskClient,
) -> None:
    answer = flask_client.post(
        "/v1/responses",
        json={
            "model": THINKER,
            "input": "hi",
            "stream": True,
            "include": ["message.output_text.logprobs", "reasoning.encrypted_content"],
            "top_logprobs": 1,
            "reasoning": {"effort": "low", "summary": "auto"},
        },
    )
    assert answer.status_code == 200
    events = responses_events(same_ids(answer.data, answer.headers["X-Stage-Id"]))
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    reasoning = {"id": "rs_ID_0", "type": "reasoning", "summary": []}
    message = {"id": "msg_ID_1", "type": "message", "role": "assistant"}
    rs = {"item_id": "rs_ID_0", "output_index": 0, "content_index": 0}
    msg = {"item_id": "msg_ID_1", "output_index": 1, "content_index": 0}
    thought = {"type": "reasoning_text", "text": "think0 think1 "}
    delta_logprobs = [
        [
            {
                "token": "tok0 ",
                "logprob": -0.1,
                "top_logprobs": [{"token": "tok0 ", "logprob": -0.1}],
            }
        ],
        [
            {
                "token": "tok1 ",
                "logprob": -0.2,
                "top_logprobs": [{"token": "tok1 ", "logprob": -0.2}],
            }
        ],
    ]
    part = {
        "type": "output_text",
        "text": "tok0 tok1 ",
        "annotations": [],
        "logprobs": [token("tok0 ", -0.1, 1), token("tok1 ", -0.2, 1)],
    }
    bodies = [{k: v for k, v in e.items() if k != "sequence_number"} for e in events]
    assert [b["type"] for b in bodies[:2]] == ["response.created", "response.in_progress"]
    assert bodies[0]["response"]["reasoning"] == {"effort": "low", "summary": "auto"}
    assert bodies[2:-1] == [
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {**reasoning, "content": [], "status": "in_progress"},
        },
        {
            "type": "response.content_part.added",
            **rs,
            "part": {"type": "reasoning_text", "text": ""},
        },
        {"type": "response.reasoning_text.delta", **rs, "delta": "think0 "},
        {"type": "response.reasoning_text.delta", **rs, "delta": "think1 "},
        {"type": "response.reasoning_text.done", **rs, "text": "think0 think1 "},
        {"type": "response.content_part.done", **rs, "part": thought},
        {
            "type": "response.output_item.done",
            "output_index": 0,
            "item": {**reasoning, "content": [thought], "status": "completed"},
        },
        {
            "type": "response.output_item.added",
            "output_index": 1,
            "item": {**message, "status": "in_progress", "content": []},
        },
        {
            "type": "response.content_part.added",
            **msg,
            "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []},
        },
        {
            "type": "response.output_text.delta",
            **msg,
            "delta": "tok0 ",
            "logprobs": delta_logprobs[0],
        },
        {
            "type": "response.output_text.delta",
            **msg,
            "delta": "tok1 ",
            "logprobs": delta_logprobs[1],
        },
        {
            "type": "response.output_text.done",
            **msg,
            "text": "tok0 tok1 ",
            "logprobs": delta_logprobs[0] + delta_logprobs[1],
        },
        {"type": "response.content_part.done", **msg, "part": part},
        {
            "type": "response.output_item.done",
            "output_index": 1,
            "item": {**message, "status": "completed", "content": [part]},
        },
    ]
    completed = bodies[-1]
    assert completed["type"] == "response.completed"
    assert completed["response"]["output"] == [
        {**reasoning, "content": [thought], "status": "completed"},
        {**message, "status": "completed", "content": [part]},
    ]
    assert completed["response"]["usage"]["output_tokens_details"] == {"reasoning_tokens": 2}


def test_a_whole_response_has_the_reasoning_item_and_the_usage_counts_its_tokens(
    flask_client: FlaskClient, upstream: FakeUpstream
) -> None:
    answer = flask_client.post(
        "/v1/responses",
        json={"model": THINKER, "input": "hi", "reasoning": {"effort": "high"}},
    )
    response = answer.get_json()
    assert [item["type"] for item in response["output"]] == ["reasoning", "message"]
    assert response["output"][0]["content"] == [
        {"type": "reasoning_text", "text": "think0 think1 "}
    ]
    assert response["output"][1]["content"][0]["logprobs"] == []  # none asked for
    assert response["usage"] == {
        "input_tokens": 1,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 4,
        "output_tokens_details": {"reasoning_tokens": 2},
        "total_tokens": 5,
    }
    sent = upstream.requests[0].body
    assert sent["reasoning_effort"] == "high" and "logprobs" not in sent


def test_a_responses_earlier_reasoning_items_are_taken_and_not_sent_on(
    flask_client: FlaskClient, upstream: FakeUpstream
) -> None:
    first = flask_client.post("/v1/responses", json={"model": THINKER, "input": "hi"}).get_json()
    again = flask_client.post(
        "/v1/responses",
        json={"model": "fake?chunks=1", "input": [*HI, *first["output"], *HI]},
    )
    assert again.status_code == 200, again.get_json()
    assert upstream.requests[-1].body["messages"] == [
        *HI,
        {"role": "assistant", "content": "tok0 tok1 "},
        *HI,
    ]


# -- images ---------------------------------------------------------------------------------


def test_image_parts_reach_the_upstream_as_given_in_both_dialects(
    flask_client: FlaskClient, upstream: FakeUpstream
) -> None:
    chat = [
        {"type": "text", "text": "Which is bigger?"},
        {"type": "image_url", "image_url": {"url": PNG}},
        {"type": "image_url", "image_url": {"url": IMAGE_URL, "detail": "high"}},
    ]
    answer = flask_client.post(
        "/v1/chat/completions",
        json={"model": "fake", "messages": [{"role": "user", "content": chat}]},
    )
    assert answer.status_code == 200
    assert upstream.requests[0].images == [PNG, IMAGE_URL]
    assert upstream.requests[0].body["messages"] == [{"role": "user", "content": chat}]

    content = [
        {"type": "input_text", "text": "Which is bigger?"},
        {"type": "input_image", "image_url": PNG, "detail": "auto"},
        {"type": "input_image", "image_url": IMAGE_URL},
    ]
    answer = flask_client.post(
        "/v1/responses",
        json={"model": "fake", "input": [{"role": "user", "content": content}]},
    )
    assert answer.get_json()["status"] == "completed"
    assert upstream.requests[1].images == [PNG, IMAGE_URL]
    assert upstream.requests[1].body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Which is bigger?"},
                {"type": "image_url", "image_url": {"url": PNG, "detail": "auto"}},
                {"type": "image_url", "image_url": {"url": IMAGE_URL}},
            ],
        }
    ]


TEXT_ONLY = "upstream 'default' answered HTTP 400: image input is not supported by this model"
WITH_IMAGE = [
    {"type": "text", "text": "What is it?"},
    {"type": "image_url", "image_url": {"url": IMAGE_URL}},
]


def test_a_text_only_upstreams_refusal_of_an_image_is_a_bad_request_naming_it(
    flask_client: FlaskClient,
) -> None:
    request = {"model": "fake?vision=0", "messages": [{"role": "user", "content": WITH_IMAGE}]}
    error = {
        "message": TEXT_ONLY,
        "type": "invalid_request_error",
        "param": "messages[0].content[1]",
        "code": "invalid_value",
    }
    whole = flask_client.post("/v1/chat/completions", json=request)
    assert (whole.status_code, whole.get_json()) == (400, {"error": error})
    streamed = flask_client.post("/v1/chat/completions", json={**request, "stream": True})
    assert streamed.data == b"data: " + compact_json({"error": error}) + b"\n\n"

    content = [
        {"type": "input_text", "text": "What is it?"},
        {"type": "input_image", "image_url": IMAGE_URL},
    ]
    request = {
        "model": "fake?vision=0",
        "instructions": "Be brief.",  # messages[0]: the upstream's index is not the input's
        "input": [{"role": "user", "content": content}],
    }
    whole = flask_client.post("/v1/responses", json=request)
    assert (whole.status_code, whole.get_json()) == (
        400,
        {"error": {**error, "param": "input[0].content[1]"}},
    )
    streamed = flask_client.post("/v1/responses", json={**request, "stream": True})
    *_, failure, failed = responses_events(streamed.data)
    flat = {"code": "invalid_prompt", "message": TEXT_ONLY, "param": "input[0].content[1]"}
    assert {k: v for k, v in failure.items() if k != "sequence_number"} == {
        "type": "error",
        **flat,
        "error": {"type": "server_error", **flat},
    }
    assert failed["response"]["error"] == flat


def test_an_image_larger_than_the_body_limit_is_a_413_that_says_what_to_do() -> None:
    with app_client({"STAGESERVER_UPSTREAM_URL": "http://127.0.0.1:9/v1"}) as client:
        image = "data:image/png;base64," + "A" * (1 << 20)
        content = [{"type": "image_url", "image_url": {"url": image}}]
        answer = client.post(
            "/v1/chat/completions",
            json={"model": "fake", "messages": [{"role": "user", "content": content}]},
        )
    assert answer.status_code == 413
    assert answer.get_json() == {
        "error": {
            "message": "request body is larger than 1048576 bytes (STAGESERVER_MAX_BODY_BYTES); "
            "an image sent inline as a data: URI counts toward it: send it by URL, or "
            "raise the limit",
            "type": "invalid_request_error",
            "param": "body",
            "code": "request_too_large",
        }
    }


# -- fields beyond OpenAI's API ---------------------------------------------------------------


def chats(fake: FakeUpstream) -> list[UpstreamRequest]:
    """The chat requests it got (an upstream's kind may probe it first)."""
    return [r for r in fake.requests if r.path.endswith("/chat/completions")]


def upstreams(fake: FakeUpstream, **declared: dict[str, Any]) -> dict[str, str]:
    return {
        "STAGESERVER_UPSTREAMS": json.dumps(
            {name: {"url": fake.url, **spec} for name, spec in declared.items()}
        )
    }


VLLM_EXTRAS = {
    "top_k": 20,
    "min_p": 0.05,
    "repetition_penalty": 1.1,
    "chat_template_kwargs": {"enable_thinking": False},
    "guided_json": {"type": "object"},
    "structured_outputs": {"choice": ["yes", "no"]},
}


def test_an_upstream_takes_its_kinds_extra_fields_as_given(upstream: FakeUpstream) -> None:
    config = upstreams(upstream, vllm={"kind": "vllm"}, llama={"kind": "llamacpp"})
    with app_client(config) as client:
        chat = {"model": "fake", "messages": HI, **VLLM_EXTRAS}
        assert client.post("/v1/chat/completions", json=chat).status_code == 200
        response = {"model": "fake", "input": "hi", "top_k": 5, "chat_template_kwargs": {}}
        assert client.post("/v1/responses", json=response).status_code == 200
        llama = client.post(
            "/v1/chat/completions",
            json={"model": "fake", "messages": HI, "grammar": 'root ::= "yes"'},
        )
    first, second = chats(upstream)
    assert {k: first.body[k] for k in VLLM_EXTRAS} == VLLM_EXTRAS
    assert (second.body["top_k"], second.body["chat_template_kwargs"]) == (5, {})
    # The default upstream is the first declared: vLLM, which knows no grammar.
    assert llama.status_code == 400
    assert llama.get_json()["error"]["param"] == "grammar"


def test_a_field_no_upstream_takes_is_refused_as_openai_refuses_it(
    upstream: FakeUpstream,
) -> None:
    with app_client(upstreams(upstream, hosted={"kind": "openai"})) as client:
        answer = client.post(
            "/v1/chat/completions", json={"model": "fake", "messages": HI, "top_k": 20}
        )
    assert answer.status_code == 400
    assert answer.get_json() == {
        "error": {
            "message": "top_k: is not supported by this server (upstream 'hosted' takes no "
            "such field; its extra_fields lists those it takes)",
            "type": "invalid_request_error",
            "param": "top_k",
            "code": "unsupported_parameter",
        }
    }
    assert chats(upstream) == []


def test_extra_fields_in_the_config_replace_the_kinds_and_may_end_in_a_star(
    upstream: FakeUpstream,
) -> None:
    config = upstreams(upstream, sglang={"kind": "openai", "extra_fields": ["top_k", "regex*"]})
    with app_client(config) as client:
        taken = {"model": "fake", "messages": HI, "top_k": 3, "regex_pattern": "a+"}
        assert client.post("/v1/chat/completions", json=taken).status_code == 200
        refused = client.post(
            "/v1/chat/completions", json={"model": "fake", "messages": HI, "min_p": 0.1}
        )
    [taken_request] = chats(upstream)
    assert (taken_request.body["top_k"], taken_request.body["regex_pattern"]) == (3, "a+")
    assert (refused.status_code, refused.get_json()["error"]["param"]) == (400, "min_p")


def test_ollamas_options_keep_stageservers_token_limit(upstream: FakeUpstream) -> None:
    with app_client(upstreams(upstream, local={"kind": "ollama"})) as client:
        answer = client.post(
            "/v1/chat/completions",
            json={
                "model": "fake",
                "messages": HI,
                "max_tokens": 7,
                "options": {"num_ctx": 8192, "num_predict": 99999},
            },
        )
    assert answer.status_code == 200
    assert chats(upstream)[0].body["options"] == {"num_ctx": 8192, "num_predict": 7}


def test_a_fallback_of_another_kind_gets_none_of_the_extra_fields(
    upstream: FakeUpstream,
) -> None:
    config = upstreams(
        upstream,
        vllm={"kind": "vllm", "models": ["down?mode=status&status=503"], "fallbacks": ["hosted"]},
        hosted={"kind": "openai", "models": ["fake"]},
    )
    with app_client(config) as client:
        answer = client.post(
            "/v1/chat/completions",
            json={"model": "down?mode=status&status=503", "messages": HI, "top_k": 20},
        )
    assert answer.status_code == 200, answer.get_json()
    down, served = chats(upstream)
    assert down.body["top_k"] == 20
    assert "top_k" not in served.body and served.body["model"] == "fake"
