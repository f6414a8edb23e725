"""gunicorn settings for stageserver. Every value can be overridden from the environment.

Do not import the app here and do not preload it: the gevent worker monkey-patches before
it loads the app, and `ssl` imported earlier breaks every HTTPS upstream.
"""

import os


def _env(name: str, default: str) -> str:
    return os.environ.get(f"STAGESERVER_{name}", default)


# Where to listen.
bind = [_env("BIND", "127.0.0.1:8000")]

# Workers: one gevent worker per core is the usual shape. Several workers need a shared
# stage store (STAGESERVER_STORE_URL) for resume and cancel to reach every stage.
workers = int(_env("WORKERS", "1"))
worker_class = "gevent"
# One worker holds at most this many streams; more are silently queued by gunicorn.
worker_connections = int(_env("WORKER_CONNECTIONS", "1000"))

# `timeout` only trips on a blocked event loop, never on a long stream under gevent.
timeout = int(_env("TIMEOUT", "30"))
# On SIGTERM, streams get this long to finish before the worker is killed.
graceful_timeout = int(_env("GRACEFUL_TIMEOUT", "30"))
keepalive = int(_env("KEEPALIVE", "5"))

# Logs: access log to stdout by default, errors to stderr.
accesslog = _env("ACCESS_LOG", "-")
errorlog = "-"
loglevel = _env("LOG_LEVEL", "info")

# gunicorn 27 opens a control socket under ~/.gunicorn/ by default, which fails on a
# read-only home and collides between instances; stageserver does not use it.
control_socket_disable = True
