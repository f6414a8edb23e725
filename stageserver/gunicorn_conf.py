"""gunicorn settings for stageserver. Every value can be overridden from the environment.

    gunicorn -c python:stageserver.gunicorn_conf stageserver.wsgi:app

(what ``stageserver serve`` runs). A deployment with settings of its own can keep a
config file of its own that starts with ``from stageserver.gunicorn_conf import *``.

Do not import the app here and do not preload it: the gevent worker monkey-patches before
it loads the app, and `ssl` imported earlier breaks every HTTPS upstream.
"""

import gc
import glob
import os
import shutil
import sys
import tempfile
from typing import Any

# The settings table only: standard library, no server, no ssl (see stageserver/settings.py).
from stageserver.settings import PROCESS_SETTINGS, SETTINGS


def _env(name: str) -> str:
    """The setting from the environment, else its default in the one settings table."""
    key = f"STAGESERVER_{name}"
    default = {**SETTINGS, **PROCESS_SETTINGS}[key][0]
    return os.environ.get(key, "" if default is None else str(default))


# Where to listen.
bind = [_env("BIND")]

# Workers: one gevent worker per core is the usual shape. Several workers need a shared
# stage store (STAGESERVER_STORE_URL) for resume and cancel to reach every stage.
workers = int(_env("WORKERS"))
if workers > 1 and not _env("STORE_URL"):
    # Each worker would see only its own stages: a resume or cancel that lands on
    # another worker would answer 404 for a stage that is running.
    raise SystemExit(
        f"stageserver: STAGESERVER_WORKERS={workers} needs a shared stage store; set "
        "STAGESERVER_STORE_URL=redis://HOST:6379/0 (or run one worker)"
    )
# gunicorn's gevent worker, reading a burst's requests in the order they came.
worker_class = "stageserver.gunicorn_worker.InTurnGeventWorker"
# gevent records each greenlet's spawning stack and tree by default, for debugging: two
# greenlets a stream, and gunicorn's own per connection. Off, each spawn is cheaper and
# smaller. Set GEVENT_TRACK_GREENLET_TREE=true to have it back.
os.environ.setdefault("GEVENT_TRACK_GREENLET_TREE", "false")
# One worker holds at most this many streams; more are silently queued by gunicorn.
worker_connections = int(_env("WORKER_CONNECTIONS"))

# A header line may be up to 16 KiB (gunicorn's default is 8190 bytes), so that an
# overlong Authorization header reaches stageserver and gets its JSON 401; beyond that
# gunicorn answers 431 itself.
limit_request_field_size = 16384

# `timeout` only trips on a blocked event loop, never on a long stream under gevent.
timeout = int(_env("TIMEOUT"))
# On SIGTERM, streams get this long to finish before the worker is killed.
graceful_timeout = int(_env("GRACEFUL_TIMEOUT"))
keepalive = int(_env("KEEPALIVE"))

# Logs: access log to stdout by default (empty: none), errors to stderr. The access line
# ends with the request id, as the stage's own log line has it, and the principal's name
# ("-" when the server is open); never a key or the Authorization header. stageserver's lines go to
# stderr too (stageserver/logs.py); STAGESERVER_LOG_FORMAT=json makes the worker's lines,
# gunicorn's included, JSON lines (post_worker_init below).
accesslog = _env("ACCESS_LOG") or None
access_log_format = (
    '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" %({x-request-id}o)s '
    "%({stageserver.principal}e)s"
)
errorlog = "-"
loglevel = _env("LOG_LEVEL")

# gunicorn 27 opens a control socket under ~/.gunicorn/ by default, which fails on a
# read-only home and collides between instances; stageserver does not use it.
control_socket_disable = True


# Hooks. The ones that run in the arbiter must not import stageserver or prometheus_client:
# both import ssl, and a worker forked after that cannot patch it.
_METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def on_starting(server: Any) -> None:
    """Metrics: prometheus_client's multiprocess mode (stageserver/metrics.py) keeps each
    worker's values in files under PROMETHEUS_MULTIPROC_DIR; set it before any worker
    forks. Unset, a fresh directory is made here and removed at exit. Set, the operator's
    directory is emptied of old values (kept across a USR2 re-exec, which shares it)."""
    path = os.environ.get(_METRICS_ENV)
    if path:
        os.makedirs(path, exist_ok=True)
        if "GUNICORN_PID" not in os.environ:
            for name in glob.glob(os.path.join(path, "*.db")):
                os.remove(name)
        return
    path = tempfile.mkdtemp(prefix="stageserver-metrics-")
    os.environ[_METRICS_ENV] = path
    server.stageserver_metrics_dir = path


def when_ready(server: Any) -> None:
    """Once, in the arbiter: a server reachable from other hosts with no API keys is open
    to anyone who reaches it. Say so (stageserver/principals.py)."""
    if _env("API_KEYS"):
        return
    exposed = [a for a in bind if not a.startswith(("127.", "localhost", "[::1]", "unix:"))]
    if exposed:
        server.log.warning(
            "stageserver listens on %s with no STAGESERVER_API_KEYS: anyone who reaches it "
            "can start, read and cancel stages",
            ", ".join(exposed),
        )


def child_exit(server: Any, worker: Any) -> None:
    """A dead worker's streams are no longer active: drop its live gauges. This is what
    prometheus_client's multiprocess.mark_process_dead does, without importing it here."""
    path = os.environ.get(_METRICS_ENV)
    if path:
        for name in glob.glob(os.path.join(path, f"gauge_live*_{worker.pid}.db")):
            os.remove(name)


def on_exit(server: Any) -> None:
    path = getattr(server, "stageserver_metrics_dir", None)
    if path:
        shutil.rmtree(path, ignore_errors=True)


def post_worker_init(worker: Any) -> None:
    """In the worker, once the app is loaded and gevent has patched: graceful shutdown
    (stageserver/shutdown.py), one connection accepted per turn of the event loop
    (concurrency.accept_in_turn) and the log format of gunicorn's worker-side lines."""
    from stageserver import concurrency, shutdown
    from stageserver.telemetry import logs, metrics

    shutdown.install(worker)
    concurrency.accept_in_turn()  # a burst served in the order it came
    logs.format_gunicorn_logs(_env("LOG_FORMAT"))
    metrics.worker_started(worker.cfg.workers)
    # The app's modules and objects live as long as the worker: keep them out of the
    # collector's full passes, which otherwise walk them again and again under load.
    gc.freeze()


def worker_int(worker: Any) -> None:
    """SIGINT/SIGQUIT, gunicorn's quick shutdown (the worker exits 0.1 s later): end every
    running stage with the shutdown error now, rather than cut it silently."""
    from stageserver import shutdown

    shutdown.abort_running()


def worker_exit(server: Any, worker: Any) -> None:
    """The worker leaves its loop: close the pooled upstream connections. gunicorn also
    calls this in the arbiter for a worker that vanished, where stageserver is not loaded
    and must not be."""
    shutdown = sys.modules.get("stageserver.shutdown")
    if shutdown is not None:
        shutdown.close_upstreams()
