"""The app factory, the extension mounted into someone else's app, and configuration."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import cast

import pytest
from flask import Flask

from stageserver import ConfigError, StageServer, create_app
from stageserver.config import SETTINGS, upstream_configs
from stageserver.manager import manager_of
from testing.fake_upstream import FakeUpstream


def test_mounted_under_a_prefix_beside_the_host_apps_routes(upstream: FakeUpstream) -> None:
    host = Flask("host")
    host.config["STAGESERVER_UPSTREAM_URL"] = upstream.url

    @host.get("/")
    def index() -> str:
        return "host page"

    StageServer(host, url_prefix="/llm")
    client = host.test_client()
    assert client.get("/").data == b"host page"
    response = client.post(
        "/llm/chat", json={"stage_id": "m", "model_name": "fake", "user_prompt": "hi"}
    )
    assert response.get_json()["stage_id"] == "m-chat-final"
    assert client.get("/llm/stages/m").get_json()["status"] == "done"
    # The host's own 404 stays the host's.
    assert client.get("/nowhere").status_code == 404
    assert client.get("/nowhere").is_json is False


def test_init_app_twice_is_refused() -> None:
    app = Flask("twice")
    extension = StageServer(app)
    with pytest.raises(RuntimeError, match="already registered on this app"):
        extension.init_app(app)


def test_environment_sets_keys_the_app_did_not(
    monkeypatch: pytest.MonkeyPatch, upstream: FakeUpstream
) -> None:
    monkeypatch.setenv("STAGESERVER_UPSTREAM_URL", upstream.url)
    monkeypatch.setenv("STAGESERVER_HEARTBEAT_SECONDS", "2.5")
    monkeypatch.setenv("STAGESERVER_RESUMABLE_DEFAULT", "true")
    app = create_app({"STAGESERVER_MAX_TOKENS_LIMIT": 64})
    assert app.config["STAGESERVER_UPSTREAM_URL"] == upstream.url
    assert app.config["STAGESERVER_HEARTBEAT_SECONDS"] == 2.5
    assert app.config["STAGESERVER_RESUMABLE_DEFAULT"] is True
    assert app.config["STAGESERVER_MAX_TOKENS_LIMIT"] == 64
    assert app.config["STAGESERVER_IDLE_TIMEOUT"] == SETTINGS["STAGESERVER_IDLE_TIMEOUT"][0]


def test_app_config_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAGESERVER_HEARTBEAT_SECONDS", "2.5")
    app = create_app({"STAGESERVER_HEARTBEAT_SECONDS": 1})
    assert app.config["STAGESERVER_HEARTBEAT_SECONDS"] == 1


def test_unknown_environment_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAGESERVER_UPSTREAM_ULR", "http://127.0.0.1:1/v1")
    with pytest.raises(ConfigError, match="unknown setting STAGESERVER_UPSTREAM_ULR"):
        create_app()


@pytest.mark.parametrize(
    ("upstreams", "message"),
    [
        ("{not json", "STAGESERVER_UPSTREAMS is not valid JSON"),
        ("[]", "must be a JSON object of named upstreams"),
        ({"a": {"url": "ftp://x"}}, "upstream 'a': url 'ftp://x' must be an absolute http"),
        ({"a": {"url": "http://x", "kind": "bard"}}, "upstream 'a': kind 'bard' must be one of"),
        ({"a": {"url": "http://x", "idle_timeout": 0}}, "idle_timeout must be a positive"),
        ({"a": {"url": "http://x", "colour": 1}}, r"unknown field\(s\) \['colour'\]"),
    ],
)
def test_malformed_upstreams_fail_at_start_up(upstreams: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        create_app({"STAGESERVER_UPSTREAMS": upstreams})


def test_named_upstreams_first_is_default() -> None:
    app = create_app(
        {
            "STAGESERVER_UPSTREAMS": json.dumps(
                {
                    "local": {"url": "http://127.0.0.1:11434/v1/", "kind": "ollama"},
                    "big": {"url": "http://127.0.0.1:8001/v1", "first_token_timeout": 300},
                }
            ),
            "STAGESERVER_IDLE_TIMEOUT": 9,
        }
    )
    configs = upstream_configs(app.config)
    assert [(c.name, c.url, c.kind) for c in configs] == [
        ("local", "http://127.0.0.1:11434/v1", "ollama"),
        ("big", "http://127.0.0.1:8001/v1", "openai"),
    ]
    assert (configs[1].first_token_timeout, configs[1].idle_timeout) == (300.0, 9.0)
    default = manager_of(app.extensions).upstreams.default
    assert default is not None and default.name == "local"


def test_one_client_per_upstream_per_process(upstream: FakeUpstream) -> None:
    app = create_app({"STAGESERVER_UPSTREAM_URL": upstream.url})
    default = manager_of(app.extensions).upstreams.default
    assert default is not None
    assert default.client is default.client


def test_finished_stage_events_expire_before_its_status(upstream: FakeUpstream) -> None:
    app = create_app(
        {
            "STAGESERVER_UPSTREAM_URL": upstream.url,
            "STAGESERVER_EVENT_TTL_SECONDS": 0.2,
            "STAGESERVER_STAGE_TTL_SECONDS": 0.6,
        }
    )
    client = app.test_client()
    body = {"model_name": "fake", "user_prompt": "hi"}
    assert client.post("/chat", json={**body, "stage_id": "old"}).status_code == 200
    assert client.get("/stages/old/events").data.endswith(
        b'event: done\ndata: {"stage_id":"old",'
        b'"usage":{"prompt_tokens":1,"completion_tokens":5,"total_tokens":6}}\n\n'
    )
    time.sleep(0.3)
    client.post("/chat", json={**body, "stage_id": "sweep1"})  # expiry is swept on add
    expired = client.get("/stages/old/events")
    assert expired.status_code == 410
    assert expired.get_json()["field"] == "stage_id"
    assert client.get("/stages/old").get_json()["text"] == "tok0 tok1 tok2 tok3 tok4 "
    time.sleep(0.4)
    client.post("/chat", json={**body, "stage_id": "sweep2"})
    assert client.get("/stages/old").status_code == 404


def test_events_are_kept_while_a_client_still_reads_them(upstream: FakeUpstream) -> None:
    app = create_app(
        {"STAGESERVER_UPSTREAM_URL": upstream.url, "STAGESERVER_EVENT_TTL_SECONDS": 0.1}
    )
    client = app.test_client()
    body = {"model_name": "fake?chunks=20", "user_prompt": "hi", "stream": True}
    slow = client.post("/chat", json={**body, "stage_id": "slow"}, buffered=False)
    pieces = cast(Iterator[bytes], iter(slow.response))
    # The headers went out (an empty first write); the client reads nothing more yet.
    assert next(pieces) == b""
    assert upstream.wait_for(lambda: client.get("/stages/slow").get_json()["status"] == "done")
    time.sleep(0.2)
    # Expiry is swept on add. Not streamed: an unread stream would end after this test,
    # and its upstream request land in the next test's records.
    swept = client.post("/chat", json={**body, "stage_id": "sweep", "stream": False})
    assert swept.status_code == 200
    wire = b"".join(pieces)
    assert wire.count(b"event: chat_completion_chunk") == 22
    assert wire.endswith(
        b'event: done\ndata: {"stage_id":"slow",'
        b'"usage":{"prompt_tokens":1,"completion_tokens":20,"total_tokens":21}}\n\n'
    )
