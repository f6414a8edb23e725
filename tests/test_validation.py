"""Bad input gets a 4xx JSON body naming the field, and never reaches the upstream."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient

from stageserver import create_app
from testing.fake_upstream import FakeUpstream

GOOD = {"stage_id": "v1", "model_name": "fake", "user_prompt": "hi"}


def post(client: FlaskClient, **changes: Any) -> Any:
    body = {**GOOD, **changes}
    return client.post("/chat", json={k: v for k, v in body.items() if v is not ...})


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"stage_id": "a\nevent: done"}, "stage_id", "must not contain line breaks"),
        ({"stage_id": "a b"}, "stage_id", "must be 1 to 128 characters of A-Z a-z 0-9 . _ : -"),
        ({"stage_id": "x" * 129}, "stage_id", "must be 1 to 128 characters of A-Z a-z 0-9 . _ : -"),
        ({"stage_id": ""}, "stage_id", "must be 1 to 128 characters of A-Z a-z 0-9 . _ : -"),
        ({"stage_id": 5}, "stage_id", "Input should be a valid string"),
        ({"stage_id": ...}, "stage_id", "Field required"),
        ({"model_name": ...}, "model_name", "Field required"),
        ({"model_name": ""}, "model_name", "String should have at least 1 character"),
        ({"user_prompt": ...}, "user_prompt", "Field required"),
        ({"user_prompt": ["hi"]}, "user_prompt", "Input should be a valid string"),
        ({"max_tokens": 0}, "max_tokens", "must be from 1 to 4096 (got 0)"),
        ({"max_tokens": [5000]}, "max_tokens", "must be from 1 to 4096 (got 5000)"),
        ({"max_tokens": []}, "max_tokens", "must not be an empty list"),
        ({"max_tokens": [None]}, "max_tokens", "must not be a list that starts with null"),
        ({"temperature": [None, 1]}, "temperature", "must not be a list that starts with null"),
        ({"max_tokens": [[1]]}, "max_tokens", "Input should be a valid integer"),
        ({"max_tokens": "5"}, "max_tokens", "Input should be a valid integer"),
        ({"max_tokens": 1.5}, "max_tokens", "Input should be a valid integer"),
        ({"temperature": 2.5}, "temperature", "must be from 0 to 2 (got 2.5)"),
        ({"temperature": [-1]}, "temperature", "must be from 0 to 2 (got -1)"),
        ({"temperature": "hot"}, "temperature", "Input should be a valid number"),
        ({"stream": "yes"}, "stream", "Input should be a valid boolean"),
        ({"resumable": 1}, "resumable", "Input should be a valid boolean"),
    ],
)
def test_each_bad_field_is_named(
    flask_client: FlaskClient,
    upstream: FakeUpstream,
    changes: dict[str, Any],
    field: str,
    message: str,
) -> None:
    response = post(flask_client, **changes)
    assert response.status_code == 422
    body = response.get_json()
    assert body["fields"] == [{"field": field, "message": message}]
    assert body["error"] == f"invalid request: {field}: {message}"
    assert upstream.requests == []


def test_every_bad_field_is_named_at_once(flask_client: FlaskClient) -> None:
    response = post(flask_client, stage_id="a b", max_tokens=0, temperature=9)
    assert response.status_code == 422
    assert [f["field"] for f in response.get_json()["fields"]] == [
        "stage_id",
        "max_tokens",
        "temperature",
    ]


DEEP = b"[" * 100_000 + b"]" * 100_000  # 200 KB, under the body limit


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"", "is empty: send a JSON object"),
        (b" \r\n", "is empty: send a JSON object"),
        (b"not json", "is not valid JSON: Expecting value at line 1 column 1"),
        (b"[1, 2]", "must be a JSON object, not an array"),
        (b'"text"', "must be a JSON object, not a string"),
        (b"3", "must be a JSON object, not a number"),
        (b"null", "must be a JSON object, not null"),
        (
            b"{",
            "is not valid JSON: Expecting property name enclosed in double quotes at line 1 "
            "column 2",
        ),
        (b'{"a": 1,\n "b": }', "is not valid JSON: Expecting value at line 2 column 7"),
        (b'{"a": 1} {"b": 2}', "is not valid JSON: Extra data at line 1 column 10"),
        (b'{"a": "x', "is not valid JSON: Unterminated string starting at line 1 column 7"),
        # a scan that retried from every quote would take hours over these
        (b'"\\' * 500_000, "is not valid JSON: Unterminated string starting at line 1 column 1"),
        (
            b'["' + b'\\"' * 500_000,
            "is not valid JSON: Unterminated string starting at line 1 column 2",
        ),
        # deep nesting: refused before parsing, without recursion
        (DEEP, "nests deeper than 64 levels"),
        (b'{"a": ' + b"[" * 64 + b"]" * 64 + b"}", "nests deeper than 64 levels"),
        # overlong numbers
        (b'{"max_tokens": ' + b"9" * 5000 + b"}", "has a number too long to parse (5000 digits)"),
        (b'{"max_tokens": -' + b"1" * 4301 + b"}", "has a number too long to parse (4301 digits)"),
        (b'{"temperature": 1e400}', "has a number too large to parse (1e400)"),
        # bad encodings
        (b'{"user_prompt": "caf\xe9"}', "is not UTF-8 (byte 0xe9 at offset 20)"),
        (b'{"a": "\xff"}', "is not UTF-8 (byte 0xff at offset 7)"),
        (b'{"a": "\xc3"}', "is not UTF-8 (byte 0xc3 at offset 7)"),
        (b'{"a": "\xed\xa0\x80"}', "is not UTF-8 (byte 0xed at offset 7)"),  # a raw surrogate
        ('{"a": "b"}'.encode("utf-16-le"), "is not UTF-8 (it looks like UTF-16-LE)"),
        ('{"a": "b"}'.encode("utf-16"), "is not UTF-8 (it looks like UTF-16)"),
        ('{"a": "b"}'.encode("utf-32-be"), "is not UTF-8 (it looks like UTF-32-BE)"),
        (
            b'{"user_prompt": "\\ud800"}',
            "has a lone surrogate (\\ud800), which is not a Unicode character",
        ),
        (
            b'{"a": ["\\udfff x"]}',
            "has a lone surrogate (\\udfff), which is not a Unicode character",
        ),
        # NaN and Infinity
        (b'{"temperature": NaN}', "contains NaN or Infinity, which JSON does not allow"),
        (b'{"temperature": Infinity}', "contains NaN or Infinity, which JSON does not allow"),
        (b'{"a": [-Infinity]}', "contains NaN or Infinity, which JSON does not allow"),
        # duplicate keys, at any depth
        (b'{"stage_id": "a", "stage_id": "b"}', "has the key 'stage_id' twice"),
        (b'{"a": {"x": 1, "y": 2, "x": 3}}', "has the key 'x' twice"),
        (
            b'{"' + b"k" * 50 + b'": 1, "' + b"k" * 50 + b'": 2}',
            "has the key '" + "k" * 40 + "...' twice",
        ),
    ],
)
def test_a_body_that_is_not_a_json_object_says_what_is_wrong(
    flask_client: FlaskClient, upstream: FakeUpstream, raw: bytes, problem: str
) -> None:
    response = flask_client.post("/chat", data=raw, content_type="application/json")
    assert response.status_code == 400
    assert response.get_json() == {"error": f"request body {problem}", "field": "body"}
    assert upstream.requests == []


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a": ' + b"[" * 63 + b"]" * 63 + b"}",  # 64 levels, the object included
        b'\xef\xbb\xbf{"a": 1}',  # a UTF-8 byte order mark, which RFC 8259 lets us ignore
        '{"a": "caf\u00e9 \U0001f600"}'.encode(),
        b'{"a": "\\ud83d\\ude00", "b": "\\\\ud800"}',  # a surrogate pair; an escaped backslash
        b'{"a": "' + b"[" * 100 + b'", "b": "\\"' + b"{" * 100 + b'"}',  # in strings: no nesting
    ],
)
def test_bodies_that_are_strict_json_objects_are_read(
    flask_client: FlaskClient, raw: bytes
) -> None:
    response = flask_client.post("/chat", data=raw, content_type="application/json")
    assert response.status_code == 422  # read, then refused for its missing fields
    assert response.get_json()["fields"][0] == {"field": "stage_id", "message": "Field required"}


def test_json_without_content_type_is_accepted(flask_client: FlaskClient) -> None:
    # curl -d sends form-encoded by default; the body is still read as JSON.
    response = flask_client.post(
        "/chat", data=b'{"stage_id":"ct","model_name":"fake","user_prompt":"x"}'
    )
    assert response.status_code == 200


def test_limits_come_from_config(upstream: FakeUpstream) -> None:
    app = create_app(
        {
            "STAGESERVER_UPSTREAM_URL": upstream.url,
            "STAGESERVER_MAX_TOKENS_LIMIT": 10,
            "STAGESERVER_MAX_PROMPT_CHARS": 5,
            "STAGESERVER_MAX_BODY_BYTES": 300,
        }
    )
    client = app.test_client()
    assert post(client, max_tokens=11).get_json()["fields"] == [
        {"field": "max_tokens", "message": "must be from 1 to 10 (got 11)"}
    ]
    assert post(client, system_prompt="toolong").get_json()["fields"] == [
        {"field": "system_prompt", "message": "must be at most 5 characters (got 7)"}
    ]
    response = post(client, user_prompt="x" * 400)
    assert response.status_code == 413
    assert response.get_json() == {
        "error": "request body is larger than 300 bytes",
        "field": "body",
    }
    assert upstream.requests == []


def test_unknown_upstream_name(flask_client: FlaskClient) -> None:
    response = post(flask_client, upstream="elsewhere")
    assert response.status_code == 400
    assert response.get_json() == {
        "error": "unknown upstream 'elsewhere'; configured: default",
        "field": "upstream",
    }


def test_base_url_of_another_host_is_refused(
    flask_client: FlaskClient, upstream: FakeUpstream
) -> None:
    response = post(flask_client, base_url="http://169.254.169.254/latest")
    assert response.status_code == 400
    assert response.get_json()["field"] == "base_url"
    assert upstream.requests == []


def test_base_url_of_a_configured_upstream_is_accepted(
    flask_client: FlaskClient, upstream: FakeUpstream
) -> None:
    response = post(flask_client, base_url=upstream.url + "/")
    assert response.status_code == 200
    assert response.get_json()["stage_id"] == "v1-chat-final"


def test_no_upstream_configured() -> None:
    response = post(create_app().test_client())
    assert response.status_code == 400
    assert response.get_json() == {
        "error": "no upstream is configured on this server: set STAGESERVER_UPSTREAM_URL "
        "or STAGESERVER_UPSTREAMS",
        "field": "upstream",
    }


def test_seed_clients_extra_fields_are_ignored(flask_client: FlaskClient) -> None:
    assert post(flask_client, something_else=1).status_code == 200


def test_live_stage_id_is_a_conflict(flask_client: FlaskClient, upstream: FakeUpstream) -> None:
    first = flask_client.post(
        "/chat", json={**GOOD, "stage_id": "dup", "model_name": "fake?prefill=30", "stream": True}
    )
    try:
        assert upstream.wait_for(lambda: len(upstream.requests) == 1)
        second = post(flask_client, stage_id="dup")
        assert second.status_code == 409
        assert second.get_json()["field"] == "stage_id"
        assert len(upstream.requests) == 1
    finally:
        assert flask_client.post("/stages/dup/cancel").status_code == 202
        first.close()
    assert upstream.wait_for(
        lambda: flask_client.get("/stages/dup").get_json()["status"] != "running"
    )
    # A finished stage's id may be used again.
    assert post(flask_client, stage_id="dup").status_code == 200


def test_ollama_kind_gets_num_predict_and_others_do_not(upstream: FakeUpstream) -> None:
    for kind, expected in (("ollama", {"num_predict": 9}), ("openai", None)):
        upstream.reset()
        app = create_app(
            {"STAGESERVER_UPSTREAM_URL": upstream.url, "STAGESERVER_UPSTREAM_KIND": kind}
        )
        post(app.test_client(), max_tokens=9)
        body = upstream.requests[0].body
        assert body.get("options") == expected
        assert body["max_tokens"] == 9


def test_default_max_tokens(flask_client: FlaskClient, upstream: FakeUpstream) -> None:
    post(flask_client)
    assert upstream.requests[0].body["max_tokens"] == 512
    assert "temperature" not in upstream.requests[0].body


def test_unknown_route_in_blueprint_is_json(flask_client: FlaskClient) -> None:
    response = flask_client.get("/stages/nope")
    assert response.status_code == 404
    assert response.get_json() == {
        "error": "no stage 'nope' (unknown, or expired)",
        "field": "stage_id",
    }


def test_method_not_allowed_is_json(flask_client: FlaskClient) -> None:
    response = flask_client.get("/chat")
    assert response.status_code == 405
    assert "error" in response.get_json()


def test_request_id_is_echoed_or_generated(
    flask_client: FlaskClient, upstream: FakeUpstream
) -> None:
    response = flask_client.post("/chat", json=GOOD, headers={"X-Request-ID": "req-42"})
    assert response.headers["X-Request-ID"] == "req-42"
    assert upstream.requests[0].headers["x-request-id"] == "req-42"
    generated = post(flask_client, stage_id="v2").headers["X-Request-ID"]
    assert len(generated) == 32
