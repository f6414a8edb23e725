"""The document (/openapi.json) and the server cannot disagree: the document is valid
OpenAPI 3.1, names exactly the app's routes, is generated from the models the server
uses, and every body the server builds elsewhere (a stage's summary, /readyz, the events'
data) validates against its model. What the live server answers to generated requests is
tests/test_contract.py's."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from typing import Any

import jsonschema_rs
import pytest
import requests
from flask import Flask, Request
from openapi_spec_validator import validate
from pydantic import BaseModel, ValidationError

import stageserver
from stageserver import StageServer, create_app
from stageserver.schemas import (
    CancelData,
    Cancelling,
    ChatRequest,
    ChunkData,
    DoneData,
    ErrorData,
    Health,
    Readiness,
    StageStatus,
    UpstreamList,
)
from stageserver.web.apidocs import SWAGGER_UI
from testing.fake_upstream import FakeUpstream
from testing.servers import ROOT, Gunicorn, RedisServer, gunicorn_server
from testing.sse import parse_events, post_chat, wait_for_status

KEYS = {"alice": {"key": "alice-secret-key"}}


def document(app: Flask, prefix: str = "") -> dict[str, Any]:
    answer = app.test_client().get(f"{prefix}/openapi.json")
    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == "application/json"
    body: dict[str, Any] = answer.get_json()
    return body


def routes(app: Flask) -> set[tuple[str, str]]:
    """Every (method, path) the app answers, in OpenAPI's spelling."""
    return {
        (method.lower(), re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule))
        for rule in app.url_map.iter_rules()
        for method in rule.methods or ()
        if method not in ("HEAD", "OPTIONS")
    }


def operations(doc: dict[str, Any], prefix: str = "") -> set[tuple[str, str]]:
    return {(method, prefix + path) for path, item in doc["paths"].items() for method in item}


def identify(request: Request) -> str | None:
    return None


@pytest.mark.parametrize(
    ("config", "bearer"),
    [
        ({}, [{"bearerAuth": []}, {"apiKeyAuth": []}, {}]),
        ({"STAGESERVER_API_KEYS": KEYS}, [{"bearerAuth": []}, {"apiKeyAuth": []}]),
        (
            {"STAGESERVER_API_KEYS": KEYS, "STAGESERVER_PLAYGROUND": False},
            [{"bearerAuth": []}, {"apiKeyAuth": []}],
        ),
    ],
)
def test_the_document_is_valid_and_names_every_route(
    upstream: FakeUpstream, config: dict[str, Any], bearer: list[dict[str, Any]]
) -> None:
    app = create_app({"STAGESERVER_UPSTREAM_URL": upstream.url, **config})
    doc = document(app)
    validate(doc)  # openapi-spec-validator: OpenAPI 3.1
    assert doc["openapi"] == "3.1.0"
    assert doc["servers"] == [{"url": "/"}]
    assert operations(doc) == routes(app)
    assert ("get", "/playground") in routes(app) or config.get("STAGESERVER_PLAYGROUND") is False
    for path in (
        "/chat",
        "/upstreams",
        "/stages/{stage_id}",
        "/stages/{stage_id}/events",
        "/stages/{stage_id}/cancel",
    ):
        for operation in doc["paths"][path].values():
            assert operation["security"] == bearer
            assert operation["responses"]["401"]["headers"]["WWW-Authenticate"]["required"]
    for path in (
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/docs",
        "/static/stageserver.js",
    ):
        assert doc["paths"][path]["get"]["security"] == []
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    api_key = doc["components"]["securitySchemes"]["apiKeyAuth"]
    assert (api_key["type"], api_key["in"], api_key["name"]) == ("apiKey", "header", "x-api-key")


def test_the_documents_version_is_the_packages(upstream: FakeUpstream) -> None:
    app = create_app({"STAGESERVER_UPSTREAM_URL": upstream.url})
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert stageserver.__version__ == pyproject["project"]["version"]
    assert document(app)["info"]["version"] == stageserver.__version__


def test_under_a_prefix_the_servers_reach_every_operation(upstream: FakeUpstream) -> None:
    host = Flask("host")
    host.config.update(STAGESERVER_UPSTREAM_URL=upstream.url)
    StageServer(host, url_prefix="/llm", identify=identify)
    doc = document(host, "/llm")
    validate(doc)
    assert doc["servers"] == [{"url": "/llm"}]
    ours = {route for route in routes(host) if route[1].startswith("/llm/")}
    assert operations(doc, "/llm") == ours
    # A host app's identify() may name the caller instead of a key: the key is optional.
    assert doc["paths"]["/chat"]["post"]["security"] == [
        {"bearerAuth": []},
        {"apiKeyAuth": []},
        {},
    ]
    assert host.test_client().get("/llm/docs").status_code == 200


def test_the_app_limits_are_in_the_schema_of_a_chat(upstream: FakeUpstream) -> None:
    app = create_app(
        {
            "STAGESERVER_UPSTREAM_URL": upstream.url,
            "STAGESERVER_MAX_TOKENS_LIMIT": 10,
            "STAGESERVER_MAX_PROMPT_CHARS": 5,
        }
    )
    chat = document(app)["components"]["schemas"]["ChatRequest"]["properties"]
    assert chat["max_tokens"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 10}
    assert chat["user_prompt"]["maxLength"] == chat["system_prompt"]["maxLength"] == 5


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"max_tokens": 64},
        {"max_tokens": [64]},
        {"max_tokens": [64, "anything"]},
        {"max_tokens": 64.0},
        {"max_tokens": None},
        {"max_tokens": 0},
        {"max_tokens": 4097},
        {"max_tokens": []},
        {"max_tokens": [None]},
        {"max_tokens": "64"},
        {"max_tokens": True},
        {"max_tokens": 1.5},
        {"max_tokens": [[64]]},
        {"temperature": 0.5},
        {"temperature": [2]},
        {"temperature": [2.5]},
        {"temperature": -0.1},
        {"temperature": [None]},
        {"temperature": "0.5"},
        {"stage_id": "a b"},
        {"stage_id": "x" * 129},
        {"stage_id": "ok\n"},
        {"stage_id": 5},
        {"model_name": ""},
        {"model_name": "m" * 257},
        {"user_prompt": None},
        {"system_prompt": None},
        {"stream": 1},
        {"stream": None},
        {"resumable": None},
        {"upstream": ""},
        {"base_url": None},
        {"unknown": "ignored"},
    ],
)
def test_the_schema_of_a_chat_accepts_what_the_model_accepts(
    app: Flask, changes: dict[str, Any]
) -> None:
    body = {"stage_id": "s1", "model_name": "m", "user_prompt": "hi", **changes}
    try:
        ChatRequest.model_validate(body)
        accepted = True
    except ValidationError:
        accepted = False
    # jsonschema_rs, as schemathesis: patterns are ECMA-262's, where $ ends the text.
    schema = document(app)["components"]["schemas"]["ChatRequest"]
    valid = jsonschema_rs.Draft202012Validator(schema).is_valid(body)
    assert valid == accepted, (body, valid, accepted)


def holds(model: type[BaseModel], body: bytes | str | dict[str, Any]) -> None:
    """``body`` is what ``model`` describes, nothing more, nothing less."""
    if isinstance(body, dict):
        model.model_validate(body, strict=True)
    else:
        model.model_validate_json(body, strict=True)


def events_of(wire: bytes) -> dict[str, list[dict[str, Any]]]:
    by_name: dict[str, list[dict[str, Any]]] = {}
    for event in parse_events(wire):
        if "event" in event:
            by_name.setdefault(event["event"], []).append(event["data"])
    return by_name


EVENT_MODELS: dict[str, type[BaseModel]] = {
    "chat_completion_chunk": ChunkData,
    "done": DoneData,
    "error": ErrorData,
    "cancel": CancelData,
}


@pytest.fixture(scope="module")
def pair(fake: FakeUpstream, redis_server: RedisServer) -> Iterator[tuple[Gunicorn, Gunicorn]]:
    env = {"STAGESERVER_UPSTREAM_URL": fake.url, "STAGESERVER_STORE_URL": redis_server.url}
    with gunicorn_server(env) as a, gunicorn_server(env) as b:
        yield a, b


def test_every_summary_and_event_the_server_sends_holds_to_its_model(
    pair: tuple[Gunicorn, Gunicorn], upstream: FakeUpstream
) -> None:
    """Stage.summary() builds the status from a dict; the events' data come from
    stages/events.py: each, from the stage's own worker and through Redis from another,
    running, done, failed or cancelled, validates against the model the document shows."""
    a, b = pair
    seen: dict[str, int] = {}
    running = post_chat(
        a.url,
        open=True,
        stage_id="m-run",
        model_name="fake?chunks=400&interval=0.01",
        resumable=True,
    )
    running.read_until(b"event: chat_completion_chunk", 3)
    for server in (a, b):
        holds(StageStatus, requests.get(f"{server.url}/stages/m-run", timeout=5).content)
    cancel = requests.post(f"{b.url}/stages/m-run/cancel", timeout=5)
    assert cancel.status_code == 202
    holds(Cancelling, cancel.content)
    running.read_to_end()
    wire = [running.wire]
    wire.append(post_chat(a.url, stage_id="m-done", model_name="fake?chunks=3").content)
    wire.append(
        post_chat(a.url, stage_id="m-fail", model_name="fake?mode=status&status=500").content
    )
    wire.append(post_chat(a.url, stage_id="m-drop", model_name="fake?mode=drop&after=2").content)
    for stage_id, status in (
        ("m-run", "cancelled"),
        ("m-done", "done"),
        ("m-fail", "error"),
        ("m-drop", "error"),
    ):
        for server in (a, b):
            summary = wait_for_status(server.url, stage_id, status)
            holds(StageStatus, summary)
            seen[f"status:{status}"] = seen.get(f"status:{status}", 0) + 1
        replay = requests.get(f"{b.url}/stages/{stage_id}/events", timeout=10)
        wire.append(replay.content)
    for piece in wire:
        for name, datas in events_of(piece).items():
            for data in datas:
                holds(EVENT_MODELS[name], data)
                seen[name] = seen.get(name, 0) + 1
    assert set(seen) == {"status:cancelled", "status:done", "status:error", *EVENT_MODELS}


def test_health_readiness_and_upstreams_hold_to_their_models(upstream: FakeUpstream) -> None:
    ready = create_app({"STAGESERVER_UPSTREAM_URL": upstream.url}).test_client()
    unready = create_app(
        {
            "STAGESERVER_UPSTREAMS": {
                "up": {"url": upstream.url},
                "down": {"url": "http://127.0.0.1:9/v1"},
                "pool": {"urls": [upstream.url, "http://127.0.0.1:9/v2"]},
            }
        }
    ).test_client()
    none = create_app().test_client()
    holds(Health, ready.get("/healthz").data)
    answers = [ready.get("/readyz"), unready.get("/readyz"), none.get("/readyz")]
    assert [answer.status_code for answer in answers] == [200, 503, 503]
    for answer in answers:
        holds(Readiness, answer.data)
    reports = answers[1].get_json()["upstreams"].values()
    assert {"ok": False, "error": "could not connect"} in [
        {k: v for k, v in report.items() if k != "continuation"} for report in reports
    ]
    holds(UpstreamList, unready.get("/upstreams").data)


def test_docs_serves_swagger_ui_from_the_package_only(flask_client: Any) -> None:
    page = flask_client.get("/docs")
    assert page.status_code == 200
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.get_data(as_text=True))
    assert assets == ["docs/favicon-32x32.png", "docs/swagger-ui.css", "docs/swagger-ui-bundle.js"]
    for asset, mimetype in zip(assets, ("image/png", "text/css", "text/javascript"), strict=True):
        with flask_client.get(f"/{asset}") as served:
            assert (served.status_code, served.mimetype) == (200, mimetype)
            assert served.get_data() == (SWAGGER_UI / asset.removeprefix("docs/")).read_bytes()
    missing = flask_client.get("/docs/index.html")
    assert missing.status_code == 404
    assert missing.get_json() == {"error": "no file 'index.html' in /docs"}


def test_an_id_no_stage_can_have_is_a_422_naming_the_field(flask_client: Any) -> None:
    rule = "must be 1 to 128 characters of A-Z a-z 0-9 . _ : -"
    for method, path in (
        ("GET", "/stages/{}"),
        ("GET", "/stages/{}/events"),
        ("POST", "/stages/{}/cancel"),
    ):
        for stage_id in ("a b", "x" * 129, "caf%C3%A9", "a%0A"):
            answer = flask_client.open(path.format(stage_id), method=method)
            assert answer.status_code == 422, (method, path, stage_id)
            assert answer.get_json() == {
                "error": f"invalid request: stage_id: {rule}",
                "fields": [{"field": "stage_id", "message": rule}],
            }


def test_a_405_says_which_methods_are_allowed(flask_client: Any) -> None:
    answer = flask_client.put("/chat")
    assert answer.status_code == 405
    assert sorted(answer.headers["Allow"].split(", ")) == ["OPTIONS", "POST"]  # a set's order
    assert answer.get_json() == {"error": "The method is not allowed for the requested URL."}


def test_a_last_event_id_of_another_stage_is_a_400(flask_client: Any) -> None:
    assert (
        flask_client.post(
            "/chat", json={"stage_id": "l1", "model_name": "fake", "user_prompt": "x"}
        ).status_code
        == 200
    )
    for other in ("l2-chunk-1", "l1-chunk-\u00b9"):  # another stage's; a digit int() refuses
        answer = flask_client.get("/stages/l1/events", headers={"Last-Event-ID": other})
        assert answer.status_code == 400
        assert answer.get_json() == {
            "error": f"Last-Event-ID {other!r} is not an event id of stage 'l1'",
            "field": "Last-Event-ID",
        }


def test_an_overlong_request_line_is_documented_where_a_value_can_make_one(
    app: Flask,
) -> None:
    """gunicorn answers 414 itself to a request line over 4094 bytes: every operation of
    the API with a path or query value says so, and only those."""
    document = app.test_client().get("/openapi.json").get_json()
    api = 0
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if operation["tags"] not in (["stages"], ["openai"], ["anthropic"]):
                continue
            api += 1
            documented = "414" in operation["responses"]
            assert documented == ("parameters" in operation), (method, path)
    assert api == 13


def test_the_two_apis_schemas_have_names_of_their_own() -> None:
    """Each API's schemas are generated apart and merged by name: one name in both would
    leave one API's requests described by the other's model."""
    from stageserver.web import openapi, openapi_messages, openapi_v1

    openai, anthropic = set(openapi_v1.schemas()), set(openapi_messages.schemas())
    seed = {model.__name__ for model in openapi._RESPONSE_MODELS} | {"ChatRequest"}
    assert openai & anthropic == set()
    assert (openai | anthropic) & seed == set()
