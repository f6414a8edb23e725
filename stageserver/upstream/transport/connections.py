"""Keep-alive connections to upstreams: the connection, the pool and the reaper.

Used by ``httptools.py``. A ``ConnectionPool`` belongs to one transport, so to one
upstream, in one process. It bounds the requests in flight (so the connections open,
with one origin) by ``max_connections`` and keeps the connections whose response was
read to its end, most recently used first. An idle connection is reused only when it is
younger than ``KEEPALIVE_EXPIRY`` and not readable: on an idle HTTP/1.1 connection,
readable means the upstream closed it or sent junk, so it is closed instead.

The ``Reaper`` closes idle connections past their expiry even when no request comes: one
timer per process that never keeps the gevent loop alive (``ref=False``), or one daemon
thread under threads. It sweeps anything with a ``sweep(now)`` method, so the httpx
fallback (``sharded.ShardedTransport``) is swept by it too.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import httpx2

from ...concurrency import every, read_watcher, real_poll, wait_in_turn

# Below the 5 s idle timeout common to upstream servers, so that a pooled connection is
# not reused just as the upstream closes it.
KEEPALIVE_EXPIRY = 4.0
SWEEP_SECONDS = 1.0
READ_SIZE = 65536

Origin = tuple[bytes, int]


class Connection:
    """One socket to an upstream.

    ``cooperative`` (gevent): the socket is gevent's; a read parks the greenlet on a
    libev watcher of its own, then reads the descriptor once, with no timer and no
    ``EAGAIN`` try first. Until its reply's body begins (``begun()``), readers woken in
    the same turn of the loop go in the order their requests came (``carry(rank)``,
    ``concurrency.ReadyInTurn``): a burst's first tokens go out first come, first served.
    Otherwise a read is the socket's blocking ``recv``, bounded by its timeout.
    ``get_extra_info("socket")`` is what httpcore's network stream offers, so a thread
    can shut the socket down under a reader (``stages._shutdown``).
    """

    __slots__ = (
        "sock",
        "fd",
        "wait",
        "watcher",
        "rank",
        "idle_since",
        "_in_turn",
        "_poll",
        "_hub_wait",
        "_wait_in_turn",
    )

    def __init__(self, sock: socket.socket, cooperative: bool) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.idle_since = 0.0
        self._poll = real_poll()()
        self._poll.register(self.fd, select.POLLIN)
        self.wait: Callable[[Any], None] | None = None
        self._hub_wait: Callable[[Any], None] | None = None
        self._wait_in_turn: Callable[[Any, int], None] | None = None
        self.rank = 0
        self._in_turn = False
        self.watcher: Any = None
        if cooperative:
            self.watcher, self._hub_wait = read_watcher(self.fd)
            self._wait_in_turn = wait_in_turn()

    def set_read_timeout(self, seconds: float | None) -> None:
        """Bound each read by ``seconds``; under gevent, a read with a bound goes through
        gevent's own ``recv``, whose timer the watcher path does without."""
        self.sock.settimeout(seconds)
        self.wait = self._hub_wait if seconds is None else None

    def read(self) -> bytes:
        wait = self.wait
        if wait is None:
            return self.sock.recv(READ_SIZE)
        while True:
            if self._in_turn and self._wait_in_turn is not None:
                self._wait_in_turn(self.watcher, self.rank)
            else:
                wait(self.watcher)
            try:
                return os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                continue

    def carry(self, rank: int) -> None:
        """This connection carries the request of ``rank`` (``concurrency.next_rank()``,
        taken as the request came: its connect and send may finish in another order)
        now: its reads go in turn until ``begun()``."""
        self.rank = rank
        self._in_turn = True

    def begun(self) -> None:
        """The reply's body has begun: later reads go as the loop runs them."""
        self._in_turn = False

    def readable(self) -> bool:
        return bool(self._poll.poll(0))

    def get_extra_info(self, name: str) -> Any:
        return self.sock if name == "socket" else None

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
            self.watcher = None
        self.sock.close()


class ConnectionPool:
    def __init__(self, max_connections: int, expiry: float = KEEPALIVE_EXPIRY) -> None:
        self.expiry = expiry
        self._slots = threading.Semaphore(max_connections)
        self._idle: dict[Origin, deque[Connection]] = {}
        self._lock = threading.Lock()
        # A pool dropped unclosed (an app of a test, say) closes its idle connections: not
        # in a __del__, which the garbage collector may call after the sockets' own.
        weakref.finalize(self, _close_all, self._idle)

    def acquire(self, timeout: float | None) -> None:
        """A place for one request; ``release()`` it when its response is closed."""
        if not self._slots.acquire(timeout=timeout):
            raise httpx2.PoolTimeout(f"no upstream connection became free within {timeout} s")

    def release(self) -> None:
        self._slots.release()

    def take(self, origin: Origin) -> Connection | None:
        """The most recently used live idle connection to ``origin``, if there is one."""
        stale: list[Connection] = []
        found = None
        oldest = time.monotonic() - self.expiry
        with self._lock:
            idle = self._idle.get(origin)
            while idle:
                conn = idle.pop()
                if conn.idle_since > oldest and not conn.readable():
                    found = conn
                    break
                stale.append(conn)
        for conn in stale:
            conn.close()
        return found

    def put(self, origin: Origin, conn: Connection) -> None:
        conn.idle_since = time.monotonic()
        with self._lock:
            idle = self._idle.get(origin)
            if idle is None:
                idle = self._idle[origin] = deque()
            idle.append(conn)

    def sweep(self, now: float) -> None:
        """Close the connections idle since before ``now - expiry``: the oldest come first."""
        expired: list[Connection] = []
        oldest = now - self.expiry
        with self._lock:
            for idle in self._idle.values():
                while idle and idle[0].idle_since <= oldest:
                    expired.append(idle.popleft())
        for conn in expired:
            conn.close()

    def idle_count(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    def close(self) -> None:
        self.sweep(float("inf"))


def _close_all(idle: dict[Origin, deque[Connection]]) -> None:
    for connections in idle.values():
        while connections:
            connections.pop().close()


class Sweepable(Protocol):
    def sweep(self, now: float) -> None: ...


class Reaper:
    """Sweeps every registered pool each ``SWEEP_SECONDS``; started by the first one."""

    def __init__(self, cooperative: bool) -> None:
        self._cooperative = cooperative
        self._pools: weakref.WeakSet[Sweepable] = weakref.WeakSet()
        self._pid = 0
        self._timer: Any = None

    def add(self, pool: Sweepable) -> None:
        self._pools.add(pool)
        if self._pid != os.getpid():  # not started, or started by the parent of a fork
            self._pid = os.getpid()
            self._start()

    def _start(self) -> None:
        if self._cooperative:
            # The sweep runs in a greenlet of its own, where closing sockets and taking
            # locks may wait.
            self._timer = every(SWEEP_SECONDS, self.sweep)
        else:
            threading.Thread(target=self._run, name="upstream-reaper", daemon=True).start()

    def _run(self) -> None:
        pid = self._pid
        while pid == os.getpid():
            time.sleep(SWEEP_SECONDS)
            self.sweep()

    def sweep(self) -> None:
        now = time.monotonic()
        for pool in list(self._pools):
            pool.sweep(now)


_REAPERS = {True: Reaper(cooperative=True), False: Reaper(cooperative=False)}


def reap(pool: Sweepable, cooperative: bool) -> None:
    """Have the process's reaper sweep ``pool`` from now on, as long as it lives."""
    _REAPERS[cooperative].add(pool)
