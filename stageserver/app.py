"""The Flask extension, ``StageServer``, the standalone app, ``create_app``, and the end
of stageserver's work in an app, ``close``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from flask import Flask
from werkzeug.exceptions import HTTPException

from . import shutdown
from .config import StageSettings, apply_defaults, upstream_configs
from .dialects import DIALECTS
from .manager import StageManager, manager_of
from .principals import key_ring
from .telemetry import logs
from .telemetry.tracing import start_tracing
from .upstream.clients import UpstreamRegistry
from .web.auth import Authenticator, Identify


class StageServer:
    """The Flask extension. ``init_app`` reads these keys from ``app.config``; a key the
    app does not set comes from the environment variable of the same name, else its
    default:

    - ``STAGESERVER_UPSTREAM_URL`` (None), ``STAGESERVER_UPSTREAM_KIND`` ("openai"),
      ``STAGESERVER_UPSTREAM_API_KEY`` (""): one upstream, named ``default``.
    - ``STAGESERVER_UPSTREAMS`` (None): several named upstreams, as a dict or JSON;
      each a pool of replicas, with its models, retries and fallbacks (config.py).
    - ``STAGESERVER_UPSTREAM_CONTINUATION`` ("auto"), ``STAGESERVER_UPSTREAM_CHAT_TEMPLATE``
      (""): how that upstream continues an answer cut short (upstream/continuation.py);
      ``STAGESERVER_MAX_CONTINUATIONS`` (2): how many times one stage's answer may be.
    - ``STAGESERVER_CONNECT_TIMEOUT`` (5), ``STAGESERVER_FIRST_TOKEN_TIMEOUT`` (120),
      ``STAGESERVER_IDLE_TIMEOUT`` (60): seconds, for upstreams that do not set their own.
    - ``STAGESERVER_UPSTREAM_MAX_CONNECTIONS`` (1000): per upstream, per worker.
    - ``STAGESERVER_UPSTREAM_TRANSPORT`` ("httptools"): or "httpx", the one before it.
    - ``STAGESERVER_HEARTBEAT_SECONDS`` (15): SSE comment after this long without events.
    - ``STAGESERVER_SEND_TIMEOUT_SECONDS`` (30): a client that takes no bytes this long
      is gone. ``STAGESERVER_SSE_RETRY_MS`` (3000): the ``retry:`` a stream starts with.
    - ``STAGESERVER_DEFAULT_MAX_TOKENS`` (512), ``STAGESERVER_MAX_TOKENS_LIMIT`` (4096),
      ``STAGESERVER_MAX_PROMPT_CHARS`` (100000), ``STAGESERVER_MAX_BODY_BYTES`` (1 MiB).
    - ``STAGESERVER_STAGE_TTL_SECONDS`` (600), ``STAGESERVER_EVENT_TTL_SECONDS`` (60),
      ``STAGESERVER_EVENT_LOG_MAX_EVENTS`` (20000), ``STAGESERVER_EVENT_LOG_MAX_BYTES``
      (8 MiB): how long a finished stage's status and its events stay readable, and how
      many events a stage keeps.
    - ``STAGESERVER_RESUMABLE_DEFAULT`` (False), ``STAGESERVER_RESUME_GRACE_SECONDS``
      (30): whether a stage outlives its client's disconnect, and for how long.
    - ``STAGESERVER_BACKGROUND_MAX_SECONDS`` (3600): how long a background response may
      run with nobody attached.
    - ``STAGESERVER_STORE_URL`` (None): Redis shared by workers and hosts (one Redis,
      a Sentinel service or a Redis Cluster); ``STAGESERVER_OWNER_LEASE_SECONDS`` (5):
      how long a stage outlives its worker's last sign of life there, before another
      worker takes it over; ``STAGESERVER_STORE_FLUSH_WINDOW_SECONDS`` (0.005): how long
      a worker gathers its stages' new events into one write;
      ``STAGESERVER_STORE_MAX_CONNECTIONS`` (8): connections a worker holds to each Redis
      node for commands, at most.
    - ``STAGESERVER_MAX_ACTIVE_STREAMS`` (900): stages per worker; more get 503.
    - ``STAGESERVER_READY_TIMEOUT`` (2): seconds ``/readyz`` waits for each upstream.
    - ``STAGESERVER_API_KEYS`` (None): principals, their keys and limits (principals.py).
    - ``STAGESERVER_CORS_ORIGINS`` (None): origins whose pages may call the API.
    - ``STAGESERVER_PLAYGROUND`` (None): ``/playground``; unset, off (``create_app`` sets it).
    - ``STAGESERVER_LOG_FORMAT`` ("text"): ``text`` or ``json``; read by ``create_app``.
    - ``STAGESERVER_TRACING`` (None: ``otlp`` if ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set,
      else ``off``), ``STAGESERVER_TRACING_FILE`` (None): OpenTelemetry traces
      (tracing.py).

    ``settings.SETTINGS`` holds the same list with descriptions (the configuration page
    of the docs is made from it; ``tests/test_docs.py`` holds this list to it). The
    values are read once, here: change ``app.config`` before ``init_app``, not after.

    ``identify(request)``, when given, names the principal of a request from the host
    app's own login or session (a name, or None for 401); see auth.py.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        url_prefix: str | None = None,
        identify: Identify | None = None,
    ) -> None:
        self.url_prefix = url_prefix
        self.identify = identify
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Register stageserver on ``app``: read its settings (once), register the
        blueprint under ``url_prefix`` and keep the state in
        ``app.extensions["stageserver"]``. Its background work (with
        ``STAGESERVER_STORE_URL``, the store's tasks) runs until ``close(app)``. Raises
        ``RuntimeError`` on a second call for the same app, and ``ConfigError`` for a
        configuration it refuses."""
        if "stageserver" in app.extensions:
            raise RuntimeError(
                "StageServer is already registered on this app; call init_app once per app"
            )
        apply_defaults(app.config, os.environ)
        keys = key_ring(app.config["STAGESERVER_API_KEYS"], identify=self.identify is not None)
        configs = upstream_configs(app.config)
        manager = StageManager(
            StageSettings.from_config(app.config),
            UpstreamRegistry(configs),
            keys.principals(),
            start_tracing(app.config, os.environ, {cfg.name: cfg.kind for cfg in configs}),
            dialects=DIALECTS,
        )
        app.extensions["stageserver"] = manager
        app.extensions["stageserver.auth"] = Authenticator(keys, self.identify)
        from .views import bp
        from .web.apidocs import bp as docs_bp
        from .web.browser import register_web
        from .web.messages import bp as messages_bp
        from .web.ops import bp as ops_bp
        from .web.v1 import bp as v1_bp

        app.register_blueprint(bp, url_prefix=self.url_prefix)
        app.register_blueprint(ops_bp, url_prefix=self.url_prefix)
        app.register_blueprint(docs_bp, url_prefix=self.url_prefix)
        app.register_blueprint(v1_bp, url_prefix=f"{self.url_prefix or ''}/v1")
        app.register_blueprint(messages_bp, url_prefix=f"{self.url_prefix or ''}/v1")
        register_web(app, self.url_prefix)
        shutdown.track(manager)


def close(app: Flask) -> None:
    """End stageserver's work in ``app``: stop its background tasks (the continuation
    probe; with ``STAGESERVER_STORE_URL``, the store's flusher, cancel listener, sweeper
    and lease renewal) and close its connections (to the upstreams, to Redis, the traces'
    exporter). Call it when the app is done with: at the end of a test that made it, or
    of a process that serves it outside gunicorn (a gunicorn worker closes its own at
    exit). Stages still running there lose their upstream; the app serves no stage
    afterwards. Idempotent. Raises ``RuntimeError`` for an app without ``StageServer``."""
    manager_of(app.extensions).close()


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """The standalone server (``stageserver.wsgi:app``): a Flask app with ``StageServer``
    at its root, the playground on unless ``STAGESERVER_PLAYGROUND`` says otherwise, the
    process's logging set up (``STAGESERVER_LOG_FORMAT``), and 404 and 405 answered in
    JSON. ``test_config`` goes into ``app.config`` first."""
    # No static folder: what stageserver serves it routes itself (web/browser.py).
    app = Flask("stageserver", static_folder=None)
    if test_config is not None:
        app.config.from_mapping(test_config)
    # The standalone server shows its playground unless told otherwise.
    if "STAGESERVER_PLAYGROUND" not in app.config and "STAGESERVER_PLAYGROUND" not in os.environ:
        app.config["STAGESERVER_PLAYGROUND"] = True
    StageServer(app)
    # The standalone server owns its process's logging; a host app configures its own.
    logs.configure(str(app.config["STAGESERVER_LOG_FORMAT"]))
    # Routing errors (404, 405) never reach a blueprint's handlers; the standalone app
    # answers them in JSON too. A host app that mounts stageserver keeps its own.
    from .web.errors import http_error

    app.register_error_handler(HTTPException, http_error)
    return app
