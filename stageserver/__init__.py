"""stageserver: LLM chat stages streamed as Server-Sent Events from Flask + gevent.

Run it on its own with ``create_app()``, or mount it into an existing Flask app::

    from stageserver import StageServer
    StageServer(app, url_prefix="/llm")

and end its background work and connections with ``stageserver.close(app)``.

The package imports the server only when one of these names is used, so that
``stageserver.settings`` (read by gunicorn_conf.py before gevent patches anything) and
``stageserver.client`` (for callers) import nothing of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import StageServer, close, create_app
    from .errors import ConfigError, StageServerError

    __version__: str

__all__ = [
    "ConfigError",
    "StageServer",
    "StageServerError",
    "__version__",
    "close",
    "create_app",
]


def __getattr__(name: str) -> Any:
    if name in ("StageServer", "close", "create_app"):
        from . import app

        return getattr(app, name)
    if name in ("ConfigError", "StageServerError"):
        from . import errors

        return getattr(errors, name)
    if name == "__version__":
        from .release import package_version

        return package_version()
    raise AttributeError(f"module 'stageserver' has no attribute {name!r}")
