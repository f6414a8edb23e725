"""The contract, published: ``GET /openapi.json`` and ``GET /docs``.

- ``/openapi.json``: the OpenAPI 3.1 document (``openapi.py``), built once per app, at its
  first request, and kept in ``app.extensions``. Its ``servers`` is where this blueprint
  answers that request (the WSGI script root and the ``url_prefix``), so that a client
  that reads the document, and Swagger UI's "Try it out", reach the API under any prefix.
- ``/docs``: the document in Swagger UI, whose files come from the ``swagger-ui-bundle``
  package and are served from here (``/docs/<file>``, only the few the page uses): the
  page asks no other host for anything, and its validator badge is off.

Both are open (no API key) and always registered with the stage API.

swagger-ui-bundle 1.1.0 ships Swagger UI 4.15.5, which renders OpenAPI 3.0 documents only
and refuses a 3.1 one. The page gives it the document labelled ``3.0.3``: what 3.1 adds
that the document uses (``const``, ``prefixItems``, ``contentSchema``, ``"type":
"null"``) Swagger UI 4 shows less well, or not at all. ``/openapi.json`` stays 3.1. A
bundle with Swagger UI 5 will not need the label.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Blueprint, Response, abort, current_app, jsonify, send_from_directory, url_for
from swagger_ui_bundle import swagger_ui_path

from ..manager import manager_of
from . import openapi
from .auth import authenticator_of
from .errors import answer_in_json

SWAGGER_UI = Path(str(swagger_ui_path))
_BUILT = "stageserver.web.openapi"

bp = Blueprint("stageserver_docs", __name__)
answer_in_json(bp)

PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>stageserver API</title>
  <link rel="icon" href="docs/favicon-32x32.png">
  <link rel="stylesheet" href="docs/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="docs/swagger-ui-bundle.js"></script>
  <script>
    fetch("openapi.json").then((response) => response.json()).then((spec) => {
      // Swagger UI 4 renders OpenAPI 3.0 only; this 3.1 document is labelled so for it.
      spec.openapi = "3.0.3";
      window.ui = SwaggerUIBundle({
        spec, dom_id: "#swagger-ui", deepLinking: true, validatorUrl: null,
        presets: [SwaggerUIBundle.presets.apis], layout: "BaseLayout",
      });
    });
  </script>
</body>
</html>
"""


@bp.get("/openapi.json")
def document() -> Response:
    built: dict[str, Any] | None = current_app.extensions.get(_BUILT)
    if built is None:
        built = openapi.build(
            manager_of(current_app.extensions).settings,
            playground="stageserver_playground" in current_app.blueprints,
            bearer_required=authenticator_of(current_app.extensions).bearer_required,
        )
        current_app.extensions[_BUILT] = built
    base = url_for(".document").removesuffix("/openapi.json")
    return jsonify({**built, "servers": [{"url": base or "/"}]})


@bp.get("/docs")
def docs() -> Response:
    return Response(PAGE, mimetype="text/html")


@bp.get("/docs/<filename>")
def docs_file(filename: str) -> Response:
    if filename not in openapi.DOCS_FILES:
        abort(404, description=f"no file {filename!r} in /docs")
    return send_from_directory(SWAGGER_UI, filename)
