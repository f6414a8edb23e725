"""stageserver: LLM chat stages streamed as Server-Sent Events from Flask + gevent.

Run it on its own with ``create_app()``, or mount it into an existing Flask app::

    from stageserver import StageServer
    StageServer(app, url_prefix="/llm")

The package imports the server only when one of these names is used, so that
``stageserver.settings`` (read by gunicorn_conf.py before gevent patches anything) and
``stageserver.client`` (for callers) import nothing of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import StageServer, create_app
    from .errors import ConfigError

__all__ = ["ConfigError", "StageServer", "create_app"]


def __getattr__(name: str) -> Any:
    if name in ("StageServer", "create_app"):
        from . import app

        return getattr(app, name)
    if name == "ConfigError":
        from .errors import ConfigError

        return ConfigError
    raise AttributeError(f"module 'stageserver' has no attribute {name!r}")
