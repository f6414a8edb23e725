"""An existing Flask app, with its own pages and its own login, that mounts stageserver
under ``/llm``. From this folder, with an upstream configured::

    STAGESERVER_UPSTREAM_URL=http://127.0.0.1:8080/v1 \\
        gunicorn -c python:stageserver.gunicorn_conf app:app

``stageserver.gunicorn_conf`` runs the gevent worker with stageserver's settings (the
``STAGESERVER_*`` variables; it listens on 127.0.0.1:8000 unless ``STAGESERVER_BIND``
says otherwise). stageserver reads its ``STAGESERVER_*`` keys from ``app.config``, else
from the environment.

Who may start a stage is this app's decision: ``identify`` names the signed-in user, from
the session cookie (a browser, the playground) or from a token that ``POST /login`` hands
out (a script: ``client.py``). Nobody signed in, and ``/llm/...`` answers 401.
"""

from __future__ import annotations

import hmac
import os
import secrets
from html import escape

from flask import Flask, Request, jsonify, redirect, request, session, url_for
from flask.typing import ResponseReturnValue
from itsdangerous import BadSignature, URLSafeTimedSerializer

from stageserver import StageServer

# A demo's users. A real app has its own user store and password hashes.
USERS = {"alice": "wonderland", "bob": "builder"}
TOKEN_MAX_AGE = 3600  # seconds

app = Flask(__name__)
# Sign the session cookie and the tokens. Set EXAMPLE_SECRET_KEY to keep sessions across
# restarts and workers; without it every start makes a new key.
app.secret_key = os.environ.get("EXAMPLE_SECRET_KEY") or secrets.token_hex(32)
app.config.update(SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Lax")
# app.config wins over the environment: this app always shows stageserver's playground.
app.config["STAGESERVER_PLAYGROUND"] = True
tokens = URLSafeTimedSerializer(app.secret_key, salt="example-api-token")


def signed_in_user(req: Request) -> str | None:
    """The user of a request: the session's, else the one a bearer token names."""
    user = session.get("user")
    if isinstance(user, str):
        return user
    scheme, _, token = req.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    try:
        named = tokens.loads(token.strip(), max_age=TOKEN_MAX_AGE)
    except BadSignature:  # forged, or expired (SignatureExpired is a BadSignature)
        return None
    return named if isinstance(named, str) and named in USERS else None


StageServer(app, url_prefix="/llm", identify=signed_in_user)


@app.get("/")
def home() -> str:
    user = signed_in_user(request)
    if user is None:
        return (
            "<h1>Example app</h1>"
            '<form method="post" action="/login">'
            '<input name="user" placeholder="user"> '
            '<input name="password" type="password" placeholder="password"> '
            "<button>Sign in</button></form>"
        )
    return (
        f"<h1>Example app</h1><p>Signed in as {escape(user)}.</p>"
        '<p><a href="/llm/playground">Playground</a> · <a href="/llm/docs">API docs</a></p>'
        '<form method="post" action="/logout"><button>Sign out</button></form>'
    )


@app.post("/login")
def login() -> ResponseReturnValue:
    """A form (from the home page) or JSON ``{"user", "password"}``; JSON gets a token
    for ``Authorization: Bearer`` back."""
    form = request.get_json(silent=True) if request.is_json else request.form
    user = str((form or {}).get("user", ""))
    password = str((form or {}).get("password", ""))
    known = USERS.get(user)
    if known is None or not hmac.compare_digest(known.encode(), password.encode()):
        return jsonify(error="wrong user or password"), 401
    session.clear()
    session["user"] = user
    if request.is_json:
        return jsonify(user=user, token=tokens.dumps(user))
    return redirect(url_for("home"))


@app.post("/logout")
def logout() -> ResponseReturnValue:
    session.clear()
    return redirect(url_for("home"))


@app.get("/me")
def me() -> ResponseReturnValue:
    user = signed_in_user(request)
    if user is None:
        return jsonify(error="not signed in"), 401
    return jsonify(user=user)
