"""Who may do what, in one process: keys, ownership, usage, CORS.

The same rules across hosts on Redis are test_access_shared.py's; the limits, on every
topology (one worker, two hosts on Redis, two on a Redis Cluster), test_limits.py's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, Request
from flask.testing import FlaskClient

from stageserver import ConfigError, StageServer, create_app
from stageserver.manager import manager_of
from testing.fake_upstream import FakeUpstream
from testing.sse import parse_events, terminal

ALICE, BOB, CAROL = "alice-secret-key-1", "bob-secret-key-22", "carol-secret-key-3"
KEYS = {
    "alice": {"key_sha256": hashlib.sha256(ALICE.encode()).hexdigest(), "max_streams": 1},
    "bob": {"key": BOB, "requests_per_minute": 2},
    "carol": {"key": CAROL, "upstreams": ["second"]},
}


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def keyed(upstream: FakeUpstream) -> Iterator[FlaskClient]:
    app = create_app(
        {
            "STAGESERVER_UPSTREAMS": {
                "first": {"url": upstream.url},
                "second": {"url": upstream.url},
            },
            "STAGESERVER_API_KEYS": json.dumps(KEYS),
            "STAGESERVER_CORS_ORIGINS": '["http://127.0.0.1:9999"]',
        }
    )
    yield app.test_client()
    manager_of(app.extensions).close()


def chat(client: FlaskClient, secret: str | None, stage_id: str, **fields: Any) -> Any:
    body = {"stage_id": stage_id, "model_name": "fake", "user_prompt": "hi there", **fields}
    headers = auth(secret) if secret is not None else {}
    return client.post("/chat", json=body, headers=headers)


@pytest.mark.parametrize(
    ("header", "message", "challenge"),
    [
        (
            None,
            "this server requires an API key: send 'Authorization: Bearer <key>'",
            'Bearer realm="stageserver"',
        ),
        ("", "malformed Authorization header: expected 'Bearer <key>'", "invalid_token"),
        ("Bearer", "malformed Authorization header: expected 'Bearer <key>'", "invalid_token"),
        ("Bearer ", "malformed Authorization header: expected 'Bearer <key>'", "invalid_token"),
        (
            "Basic YWxpY2U6eA==",
            "malformed Authorization header: expected 'Bearer <key>'",
            "invalid_token",
        ),
        (
            "Bearer " + "k" * 10_000,
            "malformed Authorization header: expected 'Bearer <key>'",
            "invalid_token",
        ),
        (
            "Bearer clé-secrète",
            "malformed Authorization header: expected 'Bearer <key>'",
            "invalid_token",
        ),
        ("Bearer a b", "malformed Authorization header: expected 'Bearer <key>'", "invalid_token"),
        ("Bearer not-a-known-key", "unknown API key", "invalid_token"),
    ],
)
def test_a_request_without_a_valid_key_gets_401(
    keyed: FlaskClient, upstream: FakeUpstream, header: str | None, message: str, challenge: str
) -> None:
    headers = {} if header is None else {"Authorization": header}
    for method, path in (
        ("POST", "/chat"),
        ("GET", "/stages/x"),
        ("GET", "/stages/x/events"),
        ("POST", "/stages/x/cancel"),
    ):
        response = keyed.open(
            path,
            method=method,
            headers=headers,
            json={"stage_id": "x", "model_name": "fake", "user_prompt": "x"},
        )
        assert response.status_code == 401, (method, path)
        assert response.get_json() == {"error": message}
        assert challenge in response.headers["WWW-Authenticate"]
        assert response.headers["WWW-Authenticate"].startswith('Bearer realm="stageserver"')
    assert upstream.requests == []


def test_health_and_metrics_stay_open(keyed: FlaskClient) -> None:
    assert keyed.get("/healthz").status_code == 200
    assert keyed.get("/metrics").status_code == 200
    assert keyed.get("/readyz").status_code in (200, 503)  # answers; no 401


def test_a_stage_is_its_principals_alone(keyed: FlaskClient) -> None:
    assert chat(keyed, ALICE, "mine").status_code == 200
    unknown = keyed.get("/stages/nobody", headers=auth(BOB))
    for method, path in (
        ("GET", "/stages/{}"),
        ("GET", "/stages/{}/events"),
        ("POST", "/stages/{}/cancel"),
    ):
        theirs = keyed.open(path.format("mine"), method=method, headers=auth(BOB))
        never = keyed.open(path.format("nobody"), method=method, headers=auth(BOB))
        assert (theirs.status_code, never.status_code) == (404, 404)
        assert theirs.get_json() == {
            "error": "no stage 'mine' (unknown, or expired)",
            "field": "stage_id",
        }
        assert never.get_json() == {
            **unknown.get_json(),
            "error": "no stage 'nobody' (unknown, or expired)",
        }
    assert keyed.get("/stages/mine", headers=auth(ALICE)).get_json()["status"] == "done"


def test_two_principals_may_run_the_same_stage_id_at_once(
    keyed: FlaskClient, upstream: FakeUpstream
) -> None:
    slow = {"model_name": "fake?prefill=30", "stream": True}
    alice = chat(keyed, ALICE, "summary", **slow)
    bob = chat(keyed, BOB, "summary", **slow)
    try:
        assert (alice.status_code, bob.status_code) == (200, 200)
        assert upstream.wait_for(lambda: len(upstream.requests) == 2)
        again = chat(keyed, BOB, "summary")
        assert again.status_code == 409  # only its own live id is a conflict
        assert again.get_json()["field"] == "stage_id"
    finally:
        for secret in (ALICE, BOB):
            keyed.post("/stages/summary/cancel", headers=auth(secret))
        alice.close()
        bob.close()


def test_a_principal_uses_only_its_upstreams(keyed: FlaskClient, upstream: FakeUpstream) -> None:
    assert chat(keyed, CAROL, "c1").status_code == 200
    assert keyed.get("/stages/c1", headers=auth(CAROL)).get_json()["upstream"] == "second"
    refused = chat(keyed, CAROL, "c2", upstream="first")
    assert refused.status_code == 400
    assert refused.get_json() == {
        "error": "unknown upstream 'first'; configured: second",
        "field": "upstream",
    }
    assert chat(keyed, ALICE, "a1", upstream="first").status_code == 200


def test_usage_is_in_done_cancel_and_the_status(keyed: FlaskClient, upstream: FakeUpstream) -> None:
    done = parse_events(chat(keyed, BOB, "u1", stream=True, model_name="fake?chunks=3").data)
    assert terminal(done)[0]["data"] == {
        "stage_id": "u1",
        "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5},
    }
    status = keyed.get("/stages/u1", headers=auth(BOB)).get_json()
    assert status["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}

    # Cancelled mid-stream: no usage chunk came; what was generated is estimated.
    streaming = chat(
        keyed, ALICE, "u2", stream=True, model_name="fake?chunks=500&interval=0.01", buffered=False
    )
    pieces = streaming.iter_encoded()
    wire = b""
    while wire.count(b"event: chat_completion_chunk") < 3:
        wire += next(pieces)
    assert keyed.post("/stages/u2/cancel", headers=auth(ALICE)).status_code == 202
    wire += b"".join(pieces)
    events = parse_events(wire)
    chunks = sum(e.get("event") == "chat_completion_chunk" for e in events)
    # "hi there": 8 characters, 2 tokens, + 4 for the message.
    assert terminal(events)[0]["data"] == {
        "stage_id": "u2",
        "reason": "cancelled by request",
        "usage": {
            "prompt_tokens": 6,
            "completion_tokens": chunks,
            "total_tokens": 6 + chunks,
            "estimated": True,
        },
    }


def test_cors_for_listed_origins_only(keyed: FlaskClient) -> None:
    allowed = {"Origin": "http://127.0.0.1:9999"}
    preflight = keyed.options(
        "/chat",
        headers={
            **allowed,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:9999"
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    assert "Content-Type" in preflight.headers["Access-Control-Allow-Headers"]
    answer = keyed.get("/stages/none", headers={**allowed, **auth(ALICE)})
    assert answer.headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:9999"
    assert "X-Request-ID" in answer.headers["Access-Control-Expose-Headers"]

    other = {"Origin": "http://evil.example"}
    refused = keyed.options("/chat", headers={**other, "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in refused.headers
    assert "Access-Control-Allow-Origin" not in keyed.get("/stages/none", headers=other).headers


def test_identify_lets_the_host_app_name_the_principal(upstream: FakeUpstream) -> None:
    host = Flask("host")
    host.config.update(
        STAGESERVER_UPSTREAM_URL=upstream.url, STAGESERVER_API_KEYS={"dana": {"max_streams": 3}}
    )

    def identify(request: Request) -> str | None:
        return request.headers.get("X-Signed-In-As")

    StageServer(host, identify=identify)
    client = host.test_client()
    body = {"stage_id": "h", "model_name": "fake", "user_prompt": "hi"}
    assert client.post("/chat", json=body).status_code == 401
    ok = client.post("/chat", json=body, headers={"X-Signed-In-As": "dana"})
    assert ok.get_json()["type"] == "text"
    assert client.get("/stages/h", headers={"X-Signed-In-As": "erin"}).status_code == 404
    assert client.get("/stages/h", headers={"X-Signed-In-As": "dana"}).status_code == 200


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ("{nope", "STAGESERVER_API_KEYS is not valid JSON"),
        ("[]", "must be a JSON object of principals"),
        ({"alice": {"key": "short"}}, "principal 'alice': key must be a string of at least 8"),
        ({"alice": {"key_sha256": "abc"}}, "key_sha256 must be 64 hexadecimal digits"),
        ({"alice": {}}, r"principal 'alice': needs a 'key_sha256' \(or a 'key'\)"),
        ({"alice": {"key": "k" * 8, "colour": 1}}, r"unknown field\(s\) \['colour'\]"),
        ({"alice": {"key": "k" * 8, "max_streams": 0}}, "max_streams must be a whole number"),
        ({"a b": {"key": "k" * 8}}, "principal name 'a b' must be 1 to 64 characters"),
        ({"other": {"key": "k" * 8}}, "'other' is reserved"),
        ({"a": {"key": "k" * 8}, "b": {"key": "k" * 8}}, "'a' and 'b' have the same key"),
        (
            {"a": {"key": "k" * 8, "upstreams": ["elsewhere"]}},
            r"principal 'a' names unknown upstream\(s\) \['elsewhere'\]",
        ),
        ("@/nonexistent/keys.json", "STAGESERVER_API_KEYS: cannot read /nonexistent/keys.json"),
    ],
)
def test_malformed_keys_stop_start_up_and_never_show_a_secret(keys: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        create_app(
            {"STAGESERVER_UPSTREAM_URL": "http://127.0.0.1:9/v1", "STAGESERVER_API_KEYS": keys}
        )
    assert "kkkkkkkk" not in str(caught.value)


def test_keys_from_a_file(tmp_path: Any, upstream: FakeUpstream) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"ci": {"key": "ci-secret-123"}}))
    app = create_app({"STAGESERVER_UPSTREAM_URL": upstream.url, "STAGESERVER_API_KEYS": f"@{path}"})
    client = app.test_client()
    body = {"stage_id": "f", "model_name": "fake", "user_prompt": "hi"}
    assert client.post("/chat", json=body).status_code == 401
    assert client.post("/chat", json=body, headers=auth("ci-secret-123")).status_code == 200
