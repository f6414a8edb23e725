"""httpx2's own transport, sharded: for ``https://`` upstreams, and for
``STAGESERVER_UPSTREAM_TRANSPORT=httpx``. TLS stays here, where httpx2 has certificate
handling, SNI and ALPN right already (see ``httptools.py`` for the plain-HTTP one)."""

from __future__ import annotations

import select
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpcore2._utils
import httpx2

from ...concurrency import gevent_active, original, real_poll
from .connections import KEEPALIVE_EXPIRY, reap


class ShardedTransport(httpx2.BaseTransport):
    """One client's connections to an upstream, kept in several small pools.

    httpcore walks every connection of a pool, asking each whether it is closed, expired
    or idle, on each request and again on each release; with hundreds of streams that
    walk costs more than relaying the stream's chunks. Here a request goes to the first
    pool with fewer than ``SHARD_SIZE`` requests in flight (the least busy one when all
    are full), so that a walk stays short, and light traffic keeps reusing the
    connections of the first pool. Pools are made as the load needs them; together they
    hold at most ``max_connections``.
    """

    SHARD_SIZE = 16

    def __init__(self, max_connections: int) -> None:
        self._shard_count = max(1, -(-max_connections // self.SHARD_SIZE))
        self._limits = httpx2.Limits(
            max_connections=min(max_connections, self.SHARD_SIZE),
            max_keepalive_connections=min(max_connections, self.SHARD_SIZE),
            keepalive_expiry=KEEPALIVE_EXPIRY,
        )
        self._ssl_context = httpx2.create_ssl_context()  # one for all: each costs ~50 ms
        self._shards: list[httpx2.HTTPTransport] = []
        self._in_flight: list[int] = []
        self._lock = threading.Lock()
        reap(self, gevent_active())

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        index = self._acquire()
        try:
            response = self._shards[index].handle_request(request)
        except BaseException:
            self._release(index)
            raise
        response.stream = _ShardStream(response.stream, self, index)
        return response

    def _acquire(self) -> int:
        with self._lock:
            in_flight = self._in_flight
            index = next((i for i, n in enumerate(in_flight) if n < self.SHARD_SIZE), -1)
            if index < 0:
                if len(in_flight) < self._shard_count:
                    self._shards.append(
                        httpx2.HTTPTransport(verify=self._ssl_context, limits=self._limits)
                    )
                    in_flight.append(0)
                    index = len(in_flight) - 1
                else:
                    index = in_flight.index(min(in_flight))
            in_flight[index] += 1
            return index

    def _release(self, index: int) -> None:
        with self._lock:
            self._in_flight[index] -= 1

    def sweep(self, now: float) -> None:
        """Close the connections idle past their expiry, even when no request comes."""
        for shard in list(self._shards):
            pool: Any = shard._pool  # httpcore2's own expiry pass, as a request runs it
            with pool._optional_thread_lock:
                closing = pool._assign_requests_to_connections()
            pool._close_connections(closing)

    def close(self) -> None:
        for shard in self._shards:
            shard.close()


class _ShardStream(httpx2.SyncByteStream):
    """A response body that gives its request's place in its pool back when closed."""

    __slots__ = ("_stream", "_transport", "_index")

    def __init__(self, stream: Any, transport: ShardedTransport, index: int) -> None:
        self._stream = stream
        self._transport: ShardedTransport | None = transport
        self._index = index

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._stream)  # no generator of its own: one less frame per read

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            transport, self._transport = self._transport, None
            if transport is not None:
                transport._release(self._index)


def unpatch_idle_check() -> None:
    """Give httpcore the real ``select.poll`` under gevent.

    httpcore asks every idle pooled connection whether its socket is readable (a server
    that closed it) with a zero-timeout poll, on each request and each release. gevent's
    poll makes each of those a round trip through the hub; a zero-timeout poll never
    blocks, so the unpatched one is safe, and much cheaper.
    """
    utils: Any = getattr(httpcore2, "_utils", None)
    # A private attribute: a release that moved it keeps gevent's poll (slower, correct).
    if not gevent_active() or not hasattr(utils, "select"):
        return
    if isinstance(utils.select, SimpleNamespace):
        return
    select_ = original("select", "select")
    utils.select = SimpleNamespace(poll=real_poll(), select=select_, POLLIN=select.POLLIN)
