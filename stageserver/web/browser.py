"""The browser's side of stageserver: its client module and the playground.

- ``GET /static/stageserver.js``: the dependency-free ES module for browsers
  (``stageserver/static``). Served whenever stageserver is registered, playground or not:
  browser clients need it, and it is public code. Its rule is the exact path, which
  Flask matches before any ``/static/<path:filename>``, so a host app's own static
  folder cannot hide it. Pages of the origins in ``STAGESERVER_CORS_ORIGINS`` may import
  it from here (``cors.py``).
- ``GET /playground`` and ``GET /playground/<file>``: a page for a person trying the
  server (``stageserver/playground``), only when ``STAGESERVER_PLAYGROUND`` is on. Unset,
  it is on in the standalone server (``create_app`` sets it, and ``scripts/serve`` runs
  that) and off in an app that mounts ``StageServer``; ``true`` or ``false`` force it.

The page asks the API (``views.py``) for ``/upstreams`` and the stages, with the API key
a person types in, when the server has keys.

Every URL in the page is relative, so it works under any ``url_prefix``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, Response, current_app, request, send_from_directory

from ..errors import ConfigError
from ..manager import manager_of
from . import cors
from .errors import answer_in_json

STATIC_DIR = Path(__file__).parent / "static"
PLAYGROUND_DIR = Path(__file__).parent / "playground"

client_bp = Blueprint("stageserver_web", __name__)
playground_bp = Blueprint("stageserver_playground", __name__)
answer_in_json(playground_bp)  # a missing file is a JSON 404, in a host app too


def register_web(app: Flask, url_prefix: str | None) -> None:
    """Serve the client module, and the playground when it is on."""
    app.register_blueprint(client_bp, url_prefix=url_prefix)
    if playground_enabled(app.config):
        app.register_blueprint(playground_bp, url_prefix=url_prefix)


def playground_enabled(config: Mapping[str, Any]) -> bool:
    setting = config["STAGESERVER_PLAYGROUND"]
    if setting is None:
        return False
    if not isinstance(setting, bool):
        raise ConfigError(
            f"STAGESERVER_PLAYGROUND must be true or false (or unset), not {setting!r}"
        )
    return setting


@client_bp.get("/static/stageserver.js")
def client_module() -> Response:
    return send_from_directory(STATIC_DIR, "stageserver.js", mimetype="text/javascript")


@client_bp.after_request
def _cross_origin(response: Response) -> Response:
    # A browser fetches a module script with CORS: a page of a listed origin can import
    # the client from here only with the same headers as the API's (cors.py).
    return cors.apply(request, response, manager_of(current_app.extensions).settings.cors_origins)


@playground_bp.get("/playground")
def playground() -> Response:
    return send_from_directory(PLAYGROUND_DIR, "index.html")


@playground_bp.get("/playground/<path:filename>")
def playground_file(filename: str) -> Response:
    return send_from_directory(PLAYGROUND_DIR, filename)
