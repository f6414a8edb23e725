"""The browser's side of stageserver: its client module, the playground, the upstream list.

- ``GET /static/stageserver.js``: the dependency-free ES module for browsers
  (``stageserver/static``). Served whenever stageserver is registered, playground or not:
  browser clients need it, and it is public code. Its rule is the exact path, which
  Flask matches before any ``/static/<path:filename>``, so a host app's own static
  folder cannot hide it.
- ``GET /upstreams``: the configured upstreams by name, the default first, as
  ``{"upstreams": [{"name", "kind", "default"}]}``. Never a URL (it may hold credentials,
  and says where the upstreams are) nor an API key. Served with the module: a name is no
  secret (an unknown ``upstream`` in ``POST /chat`` lists them all), and a browser client
  needs them to offer a choice.
- ``GET /playground`` and ``GET /playground/<file>``: a page for a person trying the
  server (``stageserver/playground``), only when ``STAGESERVER_PLAYGROUND`` is on. Unset,
  it is on in the standalone server (``create_app``, which ``scripts/serve`` runs) and
  off in an app that mounts ``StageServer``; ``true`` or ``false`` force it. The page's
  files are not in ``static/`` because Flask serves an app's ``static`` folder by itself,
  and under ``create_app`` that folder is this package's: a playground turned off would
  still be served from there.

Every URL in the page is relative, so it works under any ``url_prefix``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, send_from_directory

from .config import ConfigError, upstream_configs

STATIC_DIR = Path(__file__).parent / "static"
PLAYGROUND_DIR = Path(__file__).parent / "playground"

client_bp = Blueprint("stageserver_web", __name__)
playground_bp = Blueprint("stageserver_playground", __name__)


def register_web(app: Flask, url_prefix: str | None, *, standalone: bool) -> None:
    """Serve the client module and the upstream list, and the playground when it is on
    (``standalone``: the app is stageserver's own, from ``create_app``)."""
    app.register_blueprint(client_bp, url_prefix=url_prefix)
    if playground_enabled(app.config, standalone=standalone):
        app.register_blueprint(playground_bp, url_prefix=url_prefix)


def playground_enabled(config: Mapping[str, Any], *, standalone: bool) -> bool:
    setting = config["STAGESERVER_PLAYGROUND"]
    if setting is None:
        return standalone
    if not isinstance(setting, bool):
        raise ConfigError(
            f"STAGESERVER_PLAYGROUND must be true or false (or unset), not {setting!r}"
        )
    return setting


@client_bp.get("/static/stageserver.js")
def client_module() -> Response:
    return send_from_directory(STATIC_DIR, "stageserver.js", mimetype="text/javascript")


@client_bp.get("/upstreams")
def upstreams() -> Response:
    configs = upstream_configs(current_app.config)
    return jsonify(
        {
            "upstreams": [
                {"name": config.name, "kind": config.kind, "default": index == 0}
                for index, config in enumerate(configs)
            ]
        }
    )


@playground_bp.get("/playground")
def playground() -> Response:
    return send_from_directory(PLAYGROUND_DIR, "index.html")


@playground_bp.get("/playground/<path:filename>")
def playground_file(filename: str) -> Response:
    return send_from_directory(PLAYGROUND_DIR, filename)
