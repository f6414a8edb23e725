"""Graceful shutdown: streams get to finish, and the ones that cannot are told why.

What gunicorn does on SIGTERM (gunicorn 27, gevent worker): the arbiter closes its
listening sockets, sends SIGTERM to each worker and SIGKILLs whatever is left
``graceful_timeout`` seconds later. A worker that gets SIGTERM stops accepting within a
second and then waits for its open connections to end. A SIGKILL runs no ``finally``: a
stream still open then is cut without an event, and its upstream is left generating.

So, in each worker (``install``, from gunicorn_conf.py's ``post_worker_init``):

1. On SIGTERM, ``begin``: ``shutting_down()`` turns true, so a new ``/chat`` that still
   reaches this worker (a kept-alive connection, or the second before the worker stops
   accepting) gets 503 with ``Retry-After`` and ``/readyz`` answers 503. gunicorn's
   keep-alive is set to 0 in this worker, so a connection closes as soon as its response
   ends instead of idling for ``keepalive`` seconds; connections already idle close
   within ``keepalive`` (5 s by default, well inside ``graceful_timeout``).
2. With the shared store, the stages nobody here follows (background responses, resumable
   stages whose client left) are handed off at once, and so is any whose last client
   leaves later: each stops at a chunk boundary, its events are written, its lease let
   go, and another worker takes it over and continues its answer
   (``manager.takeover.Takeovers.adopt``).
3. Streams with a client run on. Short ones end with ``done``, and when none is left the
   worker exits on its own, long before the deadline.
4. At ``abort_delay(graceful_timeout)`` (2 s before the arbiter's SIGKILL, and never
   sooner than 0.5 s after SIGTERM) every stage still running is ended: with the shared
   store, one that can be resumed is handed off (its clients' responses end without a
   terminal event, and they resume on another worker); any other is aborted with
   ``ServerShuttingDown``: its runner closes the upstream response, which stops the
   upstream generating, and appends an ``error`` event; every client following the
   stage receives it, and its response ends. The 2 s leave room to write those events
   and for the worker's once-a-second check to see that nothing is left.
5. When the worker leaves its loop, gunicorn's ``worker_exit`` calls ``close_upstreams``:
   it waits (a few seconds at most) for the handoffs under way to be written, and closes
   the pooled idle upstream connections.

A worker that gunicorn retires after ``max_requests`` gets no signal: it stops accepting
and waits ``graceful_timeout`` for its connections. It is treated as a SIGTERM: the same
steps 1 to 4, from the moment it is retired.

SIGINT and SIGQUIT are gunicorn's quick shutdown: the worker exits 0.1 s later. Their
hook (``worker_int``) aborts every running stage at once, so the error events are at
least written before the process goes.
"""

from __future__ import annotations

import logging
import signal
import time
import weakref
from collections.abc import Sized
from typing import Any, Protocol

from .concurrency import Task, Timer
from .errors import ServerShuttingDown, StageFailure

log = logging.getLogger("stageserver.shutdown")

SHUTDOWN_MESSAGE = "stageserver is shutting down; retry the stage"
# Aborted streams need this long, before the SIGKILL, to write their last event and let
# gunicorn's once-a-second check see the worker idle.
_ABORT_LEAD_SECONDS = 2.0
_MIN_ABORT_DELAY = 0.5
# How often a worker looks whether gunicorn has retired it (max_requests), and, draining,
# for stages nobody follows any more.
_RETIREMENT_CHECK_SECONDS = 0.5
# How long a worker's exit waits for its handoffs to be written.
_HANDOFF_WAIT_SECONDS = 5.0


class Stoppable(Protocol):
    """What shutdown needs of an app's stage manager (``manager.StageManager``)."""

    def running(self) -> Sized: ...

    def abort_running(self, failure: StageFailure) -> int: ...

    def hand_off_unattended(self) -> int: ...

    def close(self) -> None: ...


_managers: weakref.WeakSet[Stoppable] = weakref.WeakSet()
_shutting_down = False
_abort_timer: Timer | None = None


def track(manager: Stoppable) -> None:
    """Called by ``StageServer.init_app``: this app's stages are aborted on shutdown."""
    _managers.add(manager)


def shutting_down() -> bool:
    return _shutting_down


def abort_delay(graceful_timeout: float) -> float:
    """Seconds after SIGTERM at which the streams still running are aborted."""
    return max(graceful_timeout - _ABORT_LEAD_SECONDS, _MIN_ABORT_DELAY)


def begin(graceful_timeout: float) -> None:
    """Refuse new stages from now on; abort the running ones before the deadline."""
    global _shutting_down, _abort_timer
    if _shutting_down:
        return
    _shutting_down = True
    delay = abort_delay(graceful_timeout)
    # Called from a signal handler: log from a greenlet of its own, not from here.
    Timer(0, _announce, delay)
    Task(_hand_off_unattended, name="stageserver-handoff")
    _abort_timer = Timer(delay, abort_running)


def _hand_off_unattended() -> None:
    """Draining: hand off every stage nobody here follows, now and as clients leave."""
    while any(len(manager.running()) for manager in list(_managers)):
        handed = sum(manager.hand_off_unattended() for manager in list(_managers))
        if handed:
            log.info("shutting down: handed off %d stage(s) for another worker", handed)
        time.sleep(_RETIREMENT_CHECK_SECONDS)


def abort_running() -> int:
    """End every running stage of every app in this process with the shutdown error."""
    global _shutting_down
    _shutting_down = True
    aborted = sum(
        manager.abort_running(ServerShuttingDown(SHUTDOWN_MESSAGE)) for manager in list(_managers)
    )
    if aborted:
        log.warning(
            "shutting down: ended %d stage(s) still running (handed off to another worker "
            "where they can be resumed, else aborted)",
            aborted,
        )
    return aborted


def close_upstreams() -> None:
    """The worker exits: wait for the stages being handed off to be written, then close
    the upstream connections."""
    deadline = time.monotonic() + _HANDOFF_WAIT_SECONDS
    while _shutting_down and time.monotonic() < deadline:
        if not any(len(manager.running()) for manager in list(_managers)):
            break
        time.sleep(0.05)
    for manager in list(_managers):
        manager.close()


def install(worker: Any) -> None:
    """Hook into a gunicorn worker's SIGTERM; see the module docstring."""
    graceful_timeout = float(worker.cfg.graceful_timeout)
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        # A signal handler may run inside the gevent hub: _retire only sets flags and
        # schedules a timer, the way gunicorn's own handle_quit spawns a greenlet.
        _retire(worker, graceful_timeout)
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
    # As gunicorn does for its own handler: a SIGTERM must not interrupt system calls.
    signal.siginterrupt(signal.SIGTERM, False)
    Task(lambda: _on_retirement(worker, graceful_timeout), name="stageserver-retirement")


def _on_retirement(worker: Any, graceful_timeout: float) -> None:
    """A worker that retires without a signal (``max_requests`` reached) stops accepting
    and gives its open connections ``graceful_timeout``, then kills them: the same end as
    a SIGTERM's, which must get the same care (the streams still running are ended with
    the shutdown error event, not cut)."""
    while worker.alive:
        time.sleep(_RETIREMENT_CHECK_SECONDS)
    _retire(worker, graceful_timeout)


def _retire(worker: Any, graceful_timeout: float) -> None:
    begin(graceful_timeout)
    # Each connection closes as its response ends, instead of idling until it is killed.
    worker.cfg.set("keepalive", 0)


def _announce(delay: float) -> None:
    running = sum(len(manager.running()) for manager in list(_managers))
    log.info("shutting down: %d stage(s) running get %.1f s to finish", running, delay)
