"""Hosts as a test finds and kills them: a gunicorn host's workers, named as a stage's
record names them (``host:pid``), and a whole host killed at once, arbiter and all, as a
machine that loses its power would be.

A host is started by ``servers.Gunicorn`` (or ``servers.gunicorn_server``, which also
checks its log); the hosts several tests share are ``topology``'s.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket

from .servers import Gunicorn

__all__ = ["kill_host", "worker_of"]


def kill_host(host: Gunicorn) -> None:
    """SIGKILL a whole host: its workers, and its arbiter, so that none is respawned."""
    for pid in [*host.worker_pids(), host.proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    host.proc.wait(timeout=10)


def worker_of(host: Gunicorn) -> str:
    """The newest worker of ``host``, as a stage's record names it (``host:pid``)."""
    return f"{socket.gethostname()}:{host.worker_pids()[-1]}"
