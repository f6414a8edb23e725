"""The two ways stageserver runs, behind one small interface.

- gevent (gunicorn's gevent worker, the way to deploy): a stage runs in a greenlet, a
  timer can interrupt it while it is blocked on the upstream, and a cancel interrupts it
  at once wherever it waits.
- threads (``flask run``): a stage runs in a daemon thread. A blocked read cannot be
  interrupted, so the upstream client's read timeout (the larger of the first-token and
  idle timeouts) is what bounds a silent upstream, and a cancel takes effect by shutting
  the upstream socket down under the reading thread.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any


def gevent_active() -> bool:
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("socket"))


class Task:
    """Runs ``target`` concurrently with the caller."""

    def __init__(self, target: Callable[[], None], name: str) -> None:
        self._greenlet: Any = None
        self._thread: threading.Thread | None = None
        if gevent_active():
            import gevent

            self._greenlet = gevent.spawn(target)
        else:
            self._thread = threading.Thread(target=target, name=name, daemon=True)
            self._thread.start()

    def interrupt(self, exc: BaseException) -> bool:
        """Raise ``exc`` inside the task where it waits. False where that cannot be done."""
        if self._greenlet is None:
            return False
        if not self._greenlet.dead:
            self._greenlet.kill(exc, block=False)
        return True

    def join(self, timeout: float | None = None) -> None:
        if self._greenlet is not None:
            self._greenlet.join(timeout)
        elif self._thread is not None:
            self._thread.join(timeout)


class ReadDeadline:
    """Raises an exception in the running greenlet if a read outlasts ``seconds``.

    Use it only around a blocking upstream read, never around a write to a client, so
    that a firing timer cannot interrupt gunicorn in the middle of a response. A no-op
    under threads.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._timeout: Any = None
        if gevent_active():
            import gevent

            self._timeout = gevent.Timeout(seconds)

    def __enter__(self) -> None:
        if self._timeout is not None:
            self._timeout.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._timeout is not None:
            self._timeout.cancel()

    @property
    def enforced(self) -> bool:
        return self._timeout is not None

    def fired(self, exc: BaseException) -> bool:
        return exc is self._timeout


class Timer:
    """Calls ``fn(*args)`` after ``seconds`` unless cancelled first."""

    def __init__(self, seconds: float, fn: Callable[..., Any], *args: Any) -> None:
        self._greenlet: Any = None
        self._timer: threading.Timer | None = None
        if gevent_active():
            import gevent

            self._greenlet = gevent.spawn_later(seconds, fn, *args)
        else:
            self._timer = threading.Timer(seconds, fn, args)
            self._timer.daemon = True
            self._timer.start()

    def cancel(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
        elif self._timer is not None:
            self._timer.cancel()


def new_event() -> threading.Event:
    """An event that wakes a waiting greenlet under gevent (threading is patched there)."""
    return threading.Event()
