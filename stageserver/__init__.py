"""stageserver: LLM chat stages streamed as Server-Sent Events from Flask + gevent.

Run it on its own with ``create_app()``, or mount it into an existing Flask app::

    from stageserver import StageServer
    StageServer(app, url_prefix="/llm")
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from flask import Flask
from werkzeug.exceptions import HTTPException

from . import logs, shutdown
from .admission import Admission
from .config import ConfigError, apply_defaults, upstream_configs
from .health import Readiness
from .redis_store import RedisStageStore
from .stages import Stage, StageConflict, StageRegistry
from .upstreams import Upstream, UpstreamRegistry

__all__ = ["ConfigError", "StageServer", "create_app"]


class StageServer:
    """The Flask extension. ``init_app`` reads these keys from ``app.config``; a key the
    app does not set comes from the environment variable of the same name, else its
    default:

    - ``STAGESERVER_UPSTREAM_URL`` (None), ``STAGESERVER_UPSTREAM_KIND`` ("openai"),
      ``STAGESERVER_UPSTREAM_API_KEY`` (""): one upstream, named ``default``.
    - ``STAGESERVER_UPSTREAMS`` (None): several named upstreams, as a dict or JSON.
    - ``STAGESERVER_CONNECT_TIMEOUT`` (5), ``STAGESERVER_FIRST_TOKEN_TIMEOUT`` (120),
      ``STAGESERVER_IDLE_TIMEOUT`` (60): seconds, for upstreams that do not set their own.
    - ``STAGESERVER_UPSTREAM_MAX_CONNECTIONS`` (1000): per upstream, per worker.
    - ``STAGESERVER_HEARTBEAT_SECONDS`` (15): SSE comment after this long without events.
    - ``STAGESERVER_DEFAULT_MAX_TOKENS`` (512), ``STAGESERVER_MAX_TOKENS_LIMIT`` (4096),
      ``STAGESERVER_MAX_PROMPT_CHARS`` (100000), ``STAGESERVER_MAX_BODY_BYTES`` (1 MiB).
    - ``STAGESERVER_STAGE_TTL_SECONDS`` (600), ``STAGESERVER_EVENT_TTL_SECONDS`` (60),
      ``STAGESERVER_EVENT_LOG_MAX_EVENTS`` (20000): how long a finished stage's status
      and its events stay readable, and how many events a stage keeps.
    - ``STAGESERVER_RESUMABLE_DEFAULT`` (False), ``STAGESERVER_RESUME_GRACE_SECONDS``
      (30): whether a stage outlives its client's disconnect, and for how long.
    - ``STAGESERVER_STORE_URL`` (None): Redis shared by workers and hosts.
    - ``STAGESERVER_MAX_ACTIVE_STREAMS`` (900): stages per worker; more get 503.
    - ``STAGESERVER_READY_TIMEOUT`` (2): seconds ``/readyz`` waits for each upstream.
    - ``STAGESERVER_LOG_FORMAT`` ("text"): ``text`` or ``json``; read by ``create_app``.
    - ``STAGESERVER_PLAYGROUND`` (None): ``/playground``; unset, on only under ``create_app``.

    ``config.SETTINGS`` holds the same list with descriptions.
    """

    def __init__(self, app: Flask | None = None, *, url_prefix: str | None = None) -> None:
        self.url_prefix = url_prefix
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        if "stageserver" in app.extensions:
            raise RuntimeError(
                "StageServer is already registered on this app; call init_app once per app"
            )
        apply_defaults(app.config, os.environ)
        state = StageServerState(app.config)
        app.extensions["stageserver"] = state
        from .health import bp as health_bp
        from .metrics import bp as metrics_bp
        from .views import bp

        app.register_blueprint(bp, url_prefix=self.url_prefix)
        app.register_blueprint(health_bp, url_prefix=self.url_prefix)
        app.register_blueprint(metrics_bp, url_prefix=self.url_prefix)
        from .web import register_web

        register_web(app, self.url_prefix, standalone=app.import_name == __name__)
        shutdown.track(state)


class StageServerState:
    """What one app's stageserver holds at run time: its upstreams and its stages."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.upstreams = UpstreamRegistry(upstream_configs(config))
        self.admission = Admission(int(config["STAGESERVER_MAX_ACTIVE_STREAMS"]))
        self.readiness = Readiness(self.upstreams, float(config["STAGESERVER_READY_TIMEOUT"]))
        ttl = float(config["STAGESERVER_STAGE_TTL_SECONDS"])
        event_ttl = float(config["STAGESERVER_EVENT_TTL_SECONDS"])
        self.stages = StageRegistry(ttl, event_ttl)
        self.store: RedisStageStore | None = None
        if config["STAGESERVER_STORE_URL"]:
            self.store = RedisStageStore(
                str(config["STAGESERVER_STORE_URL"]),
                ttl_seconds=ttl,
                event_ttl_seconds=event_ttl,
                max_events=int(config["STAGESERVER_EVENT_LOG_MAX_EVENTS"]),
            )

    def register(self, stage: Stage) -> None:
        """Make ``stage`` known here and, with a shared store, everywhere.

        Raises StageConflict when a stage with its id is running anywhere, and
        StoreUnavailable when the shared store cannot say."""
        if self.store is not None:
            self.store.start(self.stages)
            timeouts = stage.upstream.config
            # The claim outlives the longest silence a healthy stage can have.
            live_ms = int((max(timeouts.first_token_timeout, timeouts.idle_timeout) + 30) * 1000)
            if not self.store.claim(stage, live_ms):
                raise StageConflict(stage.stage_id)
        self.stages.add(stage)

    def resolve_upstream(
        self, name: str | None, base_url: str | None
    ) -> tuple[Upstream | None, dict[str, str]]:
        """The upstream a request asked for, or None and what was wrong with the ask."""
        configured = ", ".join(self.upstreams.names()) or "none"
        if name is not None:
            upstream = self.upstreams.by_name(name)
            if upstream is None:
                return None, {
                    "field": "upstream",
                    "message": f"unknown upstream {name!r}; configured: {configured}",
                }
        elif base_url is not None:
            upstream = self.upstreams.by_url(base_url)
            if upstream is None:
                return None, {
                    "field": "base_url",
                    "message": "base_url must be the URL of a configured upstream; the server "
                    "does not call other hosts (use 'upstream' to choose one by name)",
                }
        else:
            upstream = self.upstreams.default
            if upstream is None:
                return None, {
                    "field": "upstream",
                    "message": "no upstream is configured on this server: set "
                    "STAGESERVER_UPSTREAM_URL or STAGESERVER_UPSTREAMS",
                }
        if base_url is not None and upstream.config.url != base_url.rstrip("/"):
            return None, {
                "field": "base_url",
                "message": f"base_url does not match upstream {upstream.name!r}",
            }
        return upstream, {}


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    if test_config is not None:
        app.config.from_mapping(test_config)
    StageServer(app)
    # The standalone server owns its process's logging; a host app configures its own.
    logs.configure(str(app.config["STAGESERVER_LOG_FORMAT"]))
    # Routing errors (404, 405) never reach a blueprint's handlers; the standalone app
    # answers them in JSON too. A host app that mounts stageserver keeps its own.
    from .views import http_error

    app.register_error_handler(HTTPException, http_error)
    return app
