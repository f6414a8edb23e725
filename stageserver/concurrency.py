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

import heapq
import itertools
import sys
import threading
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any


def gevent_active() -> bool:
    """Whether gevent patched this process's ``socket`` module."""
    # Another thread may be importing gevent.monkey this moment (its module is in
    # sys.modules, half made): nothing was patched by it yet.
    monkey = sys.modules.get("gevent.monkey")
    is_module_patched = getattr(monkey, "is_module_patched", None)
    return is_module_patched is not None and bool(is_module_patched("socket"))


def original(module: str, name: str) -> Any:
    """``module.name`` as the standard library has it, even when gevent patched it."""
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return getattr(__import__(module), name)
    return monkey.get_original(module, name)


def real_poll() -> Callable[[], Any]:
    """``select.poll`` as the C library has it, even when gevent patched it: a
    zero-timeout poll never blocks, and gevent's costs a trip through its hub."""
    poll: Callable[[], Any] = original("select", "poll")
    return poll


def cooperative_socket_module() -> Any:
    """gevent's ``socket`` module: its sockets park the greenlet, not the worker."""
    from gevent import socket as gevent_socket

    return gevent_socket


def read_watcher(fd: int) -> tuple[Any, Callable[[Any], None]]:
    """A libev watcher of ``fd`` becoming readable in gevent's loop, and the hub's
    ``wait``, which parks the calling greenlet until the watcher fires. The watcher is
    the caller's to ``start(callback)`` instead, to ``stop()`` and to ``close()``."""
    import gevent

    hub = gevent.get_hub()
    return hub.loop.io(fd, 1), hub.wait  # 1: readable


def wait_in_turn() -> Callable[[Any, int], None]:
    """A ``wait(watcher, rank)`` like the hub's, that wakes the readers ready in one turn
    of the loop lowest rank first (``ReadyInTurn``)."""
    import gevent

    return ReadyInTurn.of(gevent.get_hub()).wait


#: The order in which things came to this process: requests to the worker
#: (``gunicorn_worker``), and the upstream requests they made to the transport.
_ARRIVALS = itertools.count()


def next_rank() -> int:
    """The rank of what comes in now: it is woken after whatever came before it, when
    both are ready in the same turn of the loop (``ReadyInTurn``)."""
    return next(_ARRIVALS)


class ReadyInTurn:
    """Wakes the readers whose descriptors became readable in the same turn of gevent's
    loop lowest ``rank`` first: a burst's requests are read, and their upstream replies
    relayed, in the order they came.

    libev keeps the watchers that are ready in one turn on a stack and runs them last
    first: when a burst's requests (or its upstream replies) were ready together, the
    last one's view ran first, and the last one's client got its first token first.
    Here a fired watcher only files its reader; one callback, run once the turn's
    watchers have all fired, wakes them in order. The cost is that callback and a heap
    push per wake-up, a few microseconds: paid for a connection's first request
    (``gunicorn_worker``) and an upstream reply until its body begins, not for every
    chunk."""

    _by_hub: weakref.WeakKeyDictionary[Any, ReadyInTurn] = weakref.WeakKeyDictionary()

    def __init__(self, hub: Any) -> None:
        self._hub = hub
        self._run_callback = hub.loop.run_callback
        self._ready: list[tuple[int, int, Any]] = []
        self._tickets = itertools.count()  # keeps equal ranks in the order they fired
        self._release_due = False

    @classmethod
    def of(cls, hub: Any) -> ReadyInTurn:
        turns = cls._by_hub.get(hub)
        if turns is None:
            turns = cls._by_hub[hub] = cls(hub)
        return turns

    def wait(self, watcher: Any, rank: int) -> None:
        from gevent.hub import Waiter

        waiter = Waiter(self._hub)
        watcher.start(self._fired, rank, waiter)
        try:
            waiter.get()
        finally:
            watcher.stop()

    def _fired(self, rank: int, waiter: Any) -> None:
        heapq.heappush(self._ready, (rank, next(self._tickets), waiter))
        if not self._release_due:
            self._release_due = True
            self._run_callback(self._release)

    def _release(self) -> None:
        # In the hub. A reader killed while filed is no longer waiting: its Waiter keeps
        # the switch and wakes nobody. All of a turn's readers at once: one per callback,
        # each followed by what it spawned, served a burst first come, first served to
        # the letter, but cost its last streams 2-3 times their wait and each new stream
        # up to half its CPU again, for no better median (docs/benchmarks.md).
        self._release_due = False
        ready = self._ready
        while ready:
            heapq.heappop(ready)[2].switch(None)


def readable_in_turn(sock: Any, rank: int, seconds: float | None) -> bool:
    """Park until ``sock`` is readable, woken in turn (``ReadyInTurn``) with the others
    ready in the same turn of the loop: whether it became readable within ``seconds``
    (None: no bound)."""
    import gevent

    watcher, _ = read_watcher(sock.fileno())
    readable = False
    try:
        with gevent.Timeout(seconds, False):
            wait_in_turn()(watcher, rank)
            readable = True
    finally:
        watcher.close()
    return readable


def accept_in_turn(batch: int = 1) -> None:
    """Under gevent, have the servers of this process accept at most ``batch``
    connections each time their listening socket is ready (gevent's ``max_accept``,
    100 by default; gunicorn sets 1 itself when it runs several workers). Call it before
    the servers start (``gunicorn_conf.post_worker_init``).

    gevent runs what is ready in a strict order: a greenlet spawned for each connection
    accepted, then what those spawned. With 100 accepted at a time, a burst's requests
    were all parsed before the first of them sent its upstream request, and each stream
    waited for nearly the whole burst. One at a time, each request is parsed, its stage
    started and its upstream request sent before the next connection is accepted, and the
    streams already open are read in between: a burst is served in the order it came."""
    from gevent.server import StreamServer

    StreamServer.max_accept = batch


def every(seconds: float, fn: Callable[[], None]) -> Any:
    """Under gevent, run ``fn`` in a new greenlet every ``seconds``, on a timer that never
    keeps the worker's loop alive (``ref=False``): for sweeps that live as long as the
    process. The caller keeps the timer it returns."""
    import gevent

    timer = gevent.get_hub().loop.timer(seconds, seconds, ref=False)
    timer.start(gevent.spawn, fn)
    return timer


class Task:
    """Runs ``target`` concurrently with the caller."""

    def __init__(self, target: Callable[[], None], name: str) -> None:
        self._greenlet: Any = None
        self._thread: threading.Thread | None = None
        self._due: BaseException | None = None  # an interruption not yet thrown in
        if gevent_active():
            import gevent

            self._greenlet = gevent.spawn(target)
        else:
            self._thread = threading.Thread(target=target, name=name, daemon=True)
            self._thread.start()

    def interrupt(self, exc: BaseException) -> bool:
        """Raise ``exc`` inside the task where it next waits, unless it raises it itself
        first (``withdraw``). False where that cannot be done (threads)."""
        if self._greenlet is None:
            return False
        if not self._greenlet.dead and self._due is None:
            self._due = exc
            # As gevent's kill(block=False) does: thrown from the hub, where the task waits.
            self._greenlet.parent.loop.run_callback(self._throw_due)
        return True

    def withdraw(self) -> None:
        """The task saw its interruption before it was thrown in, and raises it itself:
        none is thrown in later. Thrown then, it would land wherever the task next waits,
        in the middle of its clean-up (a lease's release, an upstream's close)."""
        if self._greenlet is None:
            return
        import gevent

        if gevent.getcurrent() is self._greenlet:
            self._due = None

    def _throw_due(self) -> None:
        exc, self._due = self._due, None
        if exc is not None and not self._greenlet.dead:
            self._greenlet.throw(exc)

    def join(self, timeout: float | None = None) -> None:
        if self._greenlet is not None:
            self._greenlet.join(timeout)
        elif self._thread is not None:
            self._thread.join(timeout)


#: How long stopping a background task waits for it to end (``stop_task``): longer than
#: any one step of a store's loops (a look of a second, a write bounded by the client's
#: two-second socket timeout).
STOP_WAIT_SECONDS = 5.0


def stop_task(stopping: threading.Event, task: Task | None, *wake: threading.Event) -> None:
    """Stop a background task whose loop ends once ``stopping`` is set: set it, and each
    event in ``wake`` that the loop may be waiting on, then wait for the task to end
    (``STOP_WAIT_SECONDS`` at most)."""
    stopping.set()
    for event in wake:
        event.set()
    if task is not None:
        task.join(STOP_WAIT_SECONDS)


class _LazyTimer:
    """A libev timer for a deadline that moves often and fires rarely.

    Starting and cancelling a ``gevent.Timeout`` around every read of a stream costs
    more than the read's own Python code. Here the owner only records when its wait
    began (``since``); one timer runs, and when it fires it checks that time: a wait
    that began later re-arms it for the rest, a wait that has lasted ``seconds`` gets
    ``_expire()``. So a stream relaying chunks touches the timer about once per
    ``seconds``, not once per chunk. Without gevent (``_loop`` None) it does nothing.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.since = -1.0  # loop time the current wait began; negative when not waiting
        self._timer: Any = None
        self._loop: Any = None
        if gevent_active():
            import gevent

            self._loop = gevent.get_hub().loop

    def begin(self) -> None:
        self.since = self._loop.now()
        if self._timer is None:
            self._arm(self.seconds)

    def end(self) -> None:
        self.since = -1.0

    def close(self) -> None:
        self.since = -1.0
        if self._timer is not None:
            self._timer.close()
            self._timer = None

    def _arm(self, seconds: float) -> None:
        # ref=False: a pending deadline does not keep the worker's loop alive.
        self._timer = self._loop.timer(seconds, 0.0, ref=False)
        self._timer.start(self._check)

    def _check(self) -> None:
        self._timer.close()
        self._timer = None
        if self.since < 0:
            return  # not waiting: the next wait arms it again
        left = self.since + self.seconds - self._loop.now()
        if left > 0:
            self._arm(left)
            return
        self.since = -1.0
        self._expire()

    def _expire(self) -> None:
        raise NotImplementedError


class ReadDeadline(_LazyTimer):
    """Raises an exception in the running greenlet if a read outlasts ``seconds``.

    Use it only around a blocking upstream read, never around a write to a client, so
    that a firing timer cannot interrupt gunicorn in the middle of a response. A no-op
    under threads. ``close()`` it when done with it: a timer may still be armed.
    """

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self._expired: BaseException | None = None  # what an overlong read raised
        self._greenlet: Any = None

    def __enter__(self) -> None:
        # begin(), inlined: this runs for every read of every stream.
        loop = self._loop
        if loop is not None:
            self.since = loop.now()
            if self._timer is None:
                import gevent

                self._greenlet = gevent.getcurrent()
                self._arm(self.seconds)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.since = -1.0

    @property
    def enforced(self) -> bool:
        return self._loop is not None

    def fired(self, exc: BaseException) -> bool:
        return exc is self._expired

    def _expire(self) -> None:
        import gevent

        # In the hub: the reading greenlet is parked in its read, so raise it there.
        self._expired = gevent.Timeout(self.seconds)
        self._greenlet.throw(self._expired)


class SendDeadline(_LazyTimer):
    """Calls ``on_expiry()`` in gevent's hub when a write has lasted ``seconds``: wrap
    each write (each yield of a response) in ``begin()`` and ``end()``. A no-op under
    threads, where the server's own write timeouts apply. ``close()`` it when done."""

    def __init__(self, seconds: float, on_expiry: Callable[[], None]) -> None:
        super().__init__(seconds)
        self._on_expiry = on_expiry
        if seconds <= 0:
            self._loop = None  # no deadline

    def begin(self) -> None:
        if self._loop is not None:
            super().begin()

    def _expire(self) -> None:
        self._on_expiry()


class FirstTokenDeadline(ReadDeadline):
    """A ``ReadDeadline`` that counts from its first wait, not from each: it bounds the
    time from an attempt's request to its first chunk, over all the reads before it
    (response headers, SSE comments), and still fires only while a read waits."""

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self._began = -1.0

    def __enter__(self) -> None:
        loop = self._loop
        if loop is not None:
            if self._began < 0:
                self._began = loop.now()
            self.since = self._began
            if self._timer is None:
                import gevent

                self._greenlet = gevent.getcurrent()
                self._arm(max(0.0, self._began + self.seconds - loop.now()))


class Wakeup:
    """A flag that one waiter sleeps on: ``set()`` wakes it; ``wait(timeout)`` returns
    False when ``timeout`` seconds pass without a ``set()``.

    Under gevent the timeout is a ``_LazyTimer`` rather than a ``gevent.Timeout`` made
    for every wait, which a response waiting for each chunk of a stream would pay per
    chunk. ``close()`` it when done with it.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        # The event's own methods, not wrappers: one call less for each chunk relayed.
        self.set: Callable[[], None] = self._event.set
        self.clear: Callable[[], None] = self._event.clear
        self.is_set: Callable[[], bool] = self._event.is_set
        self._timer: _WakeupTimer | None = None
        if gevent_active():
            self._timer = _WakeupTimer(self._event)

    def wait(self, timeout: float) -> bool:
        timer = self._timer
        if timer is None:
            return self._event.wait(timeout)
        if self._event.is_set():
            return True
        if timer.seconds != timeout:
            timer.close()
            timer.seconds = timeout
        timer.timed_out = False
        timer.begin()
        try:
            self._event.wait()
        finally:
            timer.end()
        return not timer.timed_out

    def close(self) -> None:
        if self._timer is not None:
            self._timer.close()


class _WakeupTimer(_LazyTimer):
    def __init__(self, event: threading.Event) -> None:
        super().__init__(0.0)
        self._event = event
        self.timed_out = False

    def _expire(self) -> None:
        self.timed_out = True
        self._event.set()


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
