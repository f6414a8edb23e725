"""/v1 as operators see it: the dialect as a label in /metrics and in the log line, what a
browser's preflight may send, and the requests' bodies as the upstream gets them."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
from flask import Flask
from flask.testing import FlaskClient

from stageserver import create_app
from stageserver.web.bodies import digest, json_object
from testing.fake_upstream import FakeUpstream
from testing.metrics import scrape, value

CHAT = {"model": "fake?chunks=2", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def app(upstream: FakeUpstream) -> Flask:
    return create_app(
        {
            "STAGESERVER_UPSTREAM_URL": upstream.url,
            "STAGESERVER_CORS_ORIGINS": '["https://app.example"]',
        }
    )


def test_each_dialect_is_counted_under_its_own_label(flask_client: FlaskClient) -> None:
    def done(dialect: str) -> float:
        metrics = scrape(flask_client.get("/metrics").get_data(as_text=True))
        return value(metrics, "stageserver_dialect_stages_total", dialect=dialect, outcome="done")

    before = {d: done(d) for d in ("seed", "chat.completions", "responses")}
    assert flask_client.post("/v1/chat/completions", json=CHAT).status_code == 200
    answer = flask_client.post("/v1/responses", json={"model": "fake?chunks=2", "input": "hi"})
    assert answer.get_json()["status"] == "completed"
    body = {"stage_id": "seed-1", "model_name": "fake?chunks=2", "user_prompt": "hi"}
    assert flask_client.post("/chat", json=body).status_code == 200
    assert {d: done(d) - before[d] for d in before} == {
        "seed": 1,
        "chat.completions": 1,
        "responses": 1,
    }


def test_a_v1_stage_log_line_names_its_dialect(
    flask_client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="stageserver.stage")
    answer = flask_client.post("/v1/chat/completions", json=CHAT)
    stage_id = answer.headers["X-Stage-Id"]
    assert answer.get_json()["id"] == stage_id
    [line] = [r.getMessage() for r in caplog.records if stage_id in r.getMessage()]
    assert " dialect=chat.completions" in line and " outcome=done " in line


def test_a_preflight_allows_the_sdks_headers_and_delete(flask_client: FlaskClient) -> None:
    asked = "authorization, content-type, x-stainless-os, x-stainless-retry-count, x-evil"
    preflight = flask_client.options(
        "/v1/responses/resp_0",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "DELETE",
            "Access-Control-Request-Headers": asked,
        },
    )
    allowed = [
        h.strip().lower() for h in preflight.headers["Access-Control-Allow-Headers"].split(",")
    ]
    assert "x-stainless-os" in allowed and "x-stainless-retry-count" in allowed
    assert "x-evil" not in allowed
    assert "DELETE" in preflight.headers["Access-Control-Allow-Methods"]
    answer = flask_client.post(
        "/v1/chat/completions", json=CHAT, headers={"Origin": "https://app.example"}
    )
    assert "X-Stage-Id" in answer.headers["Access-Control-Expose-Headers"]


def test_the_upstream_gets_the_conversation_as_the_request_gave_it(
    flask_client: FlaskClient, upstream: FakeUpstream
) -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "4"},
    ]
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
    answer = flask_client.post(
        "/v1/chat/completions",
        json={
            "model": "fake?chunks=2",
            "messages": messages,
            "max_completion_tokens": 9,
            "temperature": 0.5,
            "top_p": 0.9,
            "stop": ["\n"],
            "seed": 7,
            "presence_penalty": 0.1,
            "frequency_penalty": 0.2,
            "tools": [tool],
            "tool_choice": "auto",
            "parallel_tool_calls": False,
            "response_format": {"type": "json_object"},
            "user": "u-1",
            "metadata": {"k": "v"},
        },
    )
    assert answer.status_code == 200, answer.get_json()
    sent = upstream.requests[-1].body
    assert sent["messages"] == messages
    assert sent["max_tokens"] == 9 and "max_completion_tokens" not in sent
    assert {k: sent[k] for k in ("temperature", "top_p", "stop", "seed")} == {
        "temperature": 0.5,
        "top_p": 0.9,
        "stop": ["\n"],
        "seed": 7,
    }
    assert (sent["presence_penalty"], sent["frequency_penalty"]) == (0.1, 0.2)
    assert sent["tools"] == [tool] and sent["tool_choice"] == "auto"
    assert sent["parallel_tool_calls"] is False
    assert sent["response_format"] == {"type": "json_object"}
    assert "user" not in sent and "metadata" not in sent  # they change nothing here


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({**CHAT, "n": 2}, "n", "unsupported_value"),
        (
            {**CHAT, "web_search_options": {"search_context_size": "low"}},
            "web_search_options",
            "unsupported_parameter",
        ),
        (
            {
                **CHAT,
                "messages": [
                    {"role": "user", "content": [{"type": "file", "file": {"file_id": "f-1"}}]}
                ],
            },
            "messages[0].content[0].type",
            "unsupported_value",
        ),
        ({**CHAT, "temperature": 3}, "temperature", "invalid_value"),
        ({**CHAT, "temperature": "hot"}, "temperature", "invalid_value"),
        ({"messages": CHAT["messages"]}, "model", "invalid_value"),
    ],
)
def test_a_refusal_names_its_param_in_openais_words(
    flask_client: FlaskClient,
    upstream: FakeUpstream,
    body: dict[str, object],
    param: str,
    code: str,
) -> None:
    answer = flask_client.post("/v1/chat/completions", json=body)
    assert answer.status_code == 400
    error = answer.get_json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert error["message"].startswith(f"{param}: ")
    assert upstream.requests == []


def test_a_chat_stage_named_like_a_response_is_no_response(flask_client: FlaskClient) -> None:
    """A /chat caller may name its stage resp_<32 hex>: /v1/responses knows no such
    response, in every operation, in the words of any unknown one."""
    stage_id = "resp_" + "0" * 32
    body = {"stage_id": stage_id, "model_name": "fake?chunks=1", "user_prompt": "hi"}
    assert flask_client.post("/chat", json=body).status_code == 200
    unknown = flask_client.get("/v1/responses/resp_" + "1" * 32)
    for answer in (
        flask_client.get(f"/v1/responses/{stage_id}"),
        flask_client.get(f"/v1/responses/{stage_id}?stream=true"),
        flask_client.post(f"/v1/responses/{stage_id}/cancel"),
        flask_client.delete(f"/v1/responses/{stage_id}"),
    ):
        assert answer.status_code == 404
        assert answer.get_json()["error"]["code"] == "not_found"
        assert answer.get_json()["error"]["message"] == unknown.get_json()["error"][
            "message"
        ].replace("1" * 32, "0" * 32)
    assert flask_client.get(f"/stages/{stage_id}").get_json()["status"] == "done"  # still there


def test_events_no_longer_kept_are_a_400_naming_starting_after(upstream: FakeUpstream) -> None:
    app = create_app(
        {"STAGESERVER_UPSTREAM_URL": upstream.url, "STAGESERVER_EVENT_LOG_MAX_EVENTS": 5}
    )
    client = app.test_client()
    body = {"model": "fake?chunks=12", "input": "hi", "background": True, "stream": True}
    created = client.post("/v1/responses", json=body)
    response_id = created.headers["X-Stage-Id"]
    # created, in_progress, item and part added, 12 deltas, 3 .done events, completed: 20.
    last = 19
    # The stream of the create read what it could: whatever the log let go before it was
    # read is said, never skipped (how much it kept up with depends on the scheduler).
    blocks = created.get_data().split(b"\n\n")[:-1]
    events = [json.loads(b.partition(b"data: ")[2]) for b in blocks]
    seqs = [e["sequence_number"] for e in events if "sequence_number" in e]
    assert seqs == list(range(len(seqs)))
    if seqs[-1:] != [last]:  # it may have read none, under load
        assert events[-1]["error"]["code"] == "stream_lost"
    # The create's stream may have been told of a loss while the stage ran on: wait for
    # its end, so the log holds its last five for good.
    assert upstream.wait_for(
        lambda: client.get(f"/v1/responses/{response_id}").get_json()["status"] == "completed"
    )
    kept = client.get(f"/v1/responses/{response_id}?stream=true&starting_after={last - 5}")
    assert kept.status_code == 200
    events = [b for b in kept.get_data().split(b"\n\n") if b.startswith(b"event: ")]
    assert len(events) == 5 and events[-1].startswith(b"event: response.completed\n")
    assert f'"sequence_number":{last},'.encode() in events[-1]
    gone = client.get(f"/v1/responses/{response_id}?stream=true&starting_after=0")
    assert gone.status_code == 400
    error = gone.get_json()["error"]
    assert (error["param"], error["code"]) == ("starting_after", "invalid_value")
    assert "no longer kept" in error["message"]
    for wrong in ("-1", "x", "\u00b2"):  # "²" is a digit to str.isdigit, not to int
        answer = client.get(f"/v1/responses/{response_id}?stream=true&starting_after={wrong}")
        assert answer.status_code == 400
        error = answer.get_json()["error"]
        assert (error["param"], error["message"]) == (
            "starting_after",
            "starting_after: must be a sequence number, 0 or more",
        )


def test_stream_is_true_or_false(flask_client: FlaskClient) -> None:
    answer = flask_client.get("/v1/responses/resp_" + "0" * 32 + "?stream=201")
    assert answer.status_code == 400
    assert answer.get_json()["error"]["param"] == "stream"


# -- Idempotency-Key ------------------------------------------------------------------------

#: The same object three ways: raw UTF-8, escapes and other whitespace, keys in another order.
SPELLINGS = [
    '{"model":"fake?chunks=2","input":"café","temperature":0.5}'.encode(),
    b'{\n  "model": "fake?chunks=2",\n  "input": "caf\\u00e9",\n  "temperature": 0.5\n}',
    '{"temperature":0.5, "input":"café", "model":"fake?chunks=2"}'.encode(),
]


def test_a_bodys_digest_is_its_objects_canonical_json() -> None:
    canonical = '{"input":"café","model":"fake?chunks=2","temperature":0.5}'.encode()
    expected = hashlib.sha256(canonical).hexdigest()
    assert [digest(json_object(raw)) for raw in SPELLINGS] == [expected] * 3
    changed = [
        {"model": "fake?chunks=2", "input": "cafe", "temperature": 0.5},
        {"model": "fake?chunks=2", "input": "café", "temperature": 0.6},
        {"model": "fake?chunks=2", "input": ["café"], "temperature": 0.5},
        {"model": "fake?chunks=2", "input": "café", "temperature": 0.5, "top_p": 1},
    ]
    assert expected not in {digest(body) for body in changed}


def reused(key: str) -> dict[str, object]:
    """The body of a 422 for ``key`` sent again with another body."""
    return {
        "error": {
            "message": f"Idempotency-Key: {key!r} was sent before with a different request "
            "body; a retry must send the same body, and a new request a new key",
            "type": "invalid_request_error",
            "param": "Idempotency-Key",
            "code": "idempotency_key_reused",
        }
    }


def test_an_idempotency_key_sent_again_with_another_body_is_refused(
    flask_client: FlaskClient, upstream: FakeUpstream
) -> None:
    key = {"Idempotency-Key": "key-1", "Content-Type": "application/json"}
    first = flask_client.post("/v1/responses", data=SPELLINGS[0], headers=key)
    assert first.status_code == 200
    response = first.get_json()
    assert response["status"] == "completed"

    # The same object, spelled otherwise: the retry gets the first response.
    for raw in SPELLINGS[1:]:
        again = flask_client.post("/v1/responses", data=raw, headers=key)
        assert (again.status_code, again.get_json()) == (200, response)

    # Another body under the same key: 422, saying why; nothing runs.
    other = {"model": "fake?chunks=2", "input": "something else", "temperature": 0.5}
    refused = flask_client.post("/v1/responses", json=other, headers=key)
    assert (refused.status_code, refused.get_json()) == (422, reused("key-1"))
    assert refused.headers["Content-Type"] == "application/json"
    assert len(upstream.requests) == 1

    # The first response is untouched, and its key still gives it.
    assert flask_client.get(f"/v1/responses/{response['id']}").get_json() == response
    again = flask_client.post("/v1/responses", data=SPELLINGS[0], headers=key)
    assert (again.status_code, again.get_json()) == (200, response)
    # Another key is another request.
    fresh = flask_client.post("/v1/responses", json=other, headers={"Idempotency-Key": "key-2"})
    assert fresh.status_code == 200 and fresh.get_json()["id"] != response["id"]
    assert len(upstream.requests) == 2
