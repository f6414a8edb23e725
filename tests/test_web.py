"""The browser's side (stageserver/web.py): what is served, and when the playground is."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from stageserver import ConfigError, StageServer, create_app
from stageserver.web.browser import PLAYGROUND_DIR, STATIC_DIR

UPSTREAM = {"STAGESERVER_UPSTREAM_URL": "http://127.0.0.1:1/v1"}
MODULE = (STATIC_DIR / "stageserver.js").read_bytes()


def get(client: FlaskClient, path: str) -> tuple[int, str | None, bytes]:
    """Status, media type and body; a file response is closed at once."""
    with client.get(path) as response:
        return response.status_code, response.mimetype, response.get_data()


def test_upstreams_are_listed_by_name_without_urls_or_keys() -> None:
    upstreams = {
        "local": {
            "urls": ["http://user:pw@127.0.0.1:11434/v1", "http://127.0.0.1:11435/v1"],
            "kind": "ollama",
        },  # a pool of two replicas: one upstream
        "openai": {"url": "https://api.openai.com/v1", "kind": "openai", "api_key": "sk-key"},
    }
    app = create_app({"STAGESERVER_UPSTREAMS": json.dumps(upstreams)})
    status, mimetype, body = get(app.test_client(), "/upstreams")
    assert (status, mimetype) == (200, "application/json")
    assert json.loads(body) == {
        "upstreams": [
            {"name": "local", "kind": "ollama", "default": True},
            {"name": "openai", "kind": "openai", "default": False},
        ]
    }


def test_the_standalone_server_serves_the_module_and_the_playground() -> None:
    client = create_app(UPSTREAM).test_client()
    assert get(client, "/static/stageserver.js") == (200, "text/javascript", MODULE)
    page = (PLAYGROUND_DIR / "index.html").read_bytes()
    assert get(client, "/playground") == (200, "text/html", page)
    for name, mimetype in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
        served = (200, mimetype, (PLAYGROUND_DIR / name).read_bytes())
        assert get(client, f"/playground/{name}") == served


@pytest.mark.parametrize(
    ("standalone", "setting", "served"),
    [(True, None, True), (True, False, False), (False, None, False), (False, True, True)],
)
def test_the_playground_is_on_when_standalone_unless_the_setting_says(
    standalone: bool, setting: bool | None, served: bool
) -> None:
    config: dict[str, Any] = {**UPSTREAM}
    if setting is not None:
        config["STAGESERVER_PLAYGROUND"] = setting
    if standalone:
        app, prefix = create_app(config), ""
    else:
        app, prefix = Flask("host"), "/llm"
        app.config.update(config)
        StageServer(app, url_prefix=prefix)
    client = app.test_client()
    assert get(client, f"{prefix}/static/stageserver.js")[0] == 200  # whatever the setting
    assert get(client, f"{prefix}/upstreams")[0] == 200
    for path in ("/playground", "/playground/playground.js"):
        assert get(client, f"{prefix}{path}")[0] == (200 if served else 404)


def test_a_host_app_with_its_own_static_folder_still_serves_the_module() -> None:
    app = Flask("host", static_folder=str(PLAYGROUND_DIR), static_url_path="/static")
    app.config.update(UPSTREAM)
    StageServer(app)
    client = app.test_client()
    assert get(client, "/static/stageserver.js") == (200, "text/javascript", MODULE)
    assert get(client, "/static/playground.css")[0] == 200  # the host's own file


def test_a_playground_setting_that_is_not_a_boolean_is_refused() -> None:
    with pytest.raises(ConfigError, match="STAGESERVER_PLAYGROUND must be true or false"):
        create_app({**UPSTREAM, "STAGESERVER_PLAYGROUND": "yes"})
