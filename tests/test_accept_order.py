"""A burst is served in the order it came.

- ``concurrency.accept_in_turn``: a worker's server accepts one connection per turn of
  gevent's loop, so that what a request starts (its stage's relay, which sends the
  upstream request) runs before the next request is read. A real gevent server in this
  process, and plain sockets connected to it before its loop runs.
- ``concurrency.ReadyInTurn``: the requests (``readable_in_turn``, which the worker,
  ``gunicorn_worker``, waits on for a connection's first bytes) and the upstream replies
  that are ready in the same turn of the loop are read in the order they came, where
  libev would run them last first. Real sockets, written to before the loop runs."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest

gevent = pytest.importorskip("gevent")
from gevent.server import StreamServer  # noqa: E402

from stageserver.concurrency import (  # noqa: E402
    ReadyInTurn,
    accept_in_turn,
    next_rank,
    read_watcher,
    readable_in_turn,
    wait_in_turn,
)
from stageserver.upstream.transport.connections import Connection  # noqa: E402

BURST = 8


@pytest.fixture
def default_batch() -> Iterator[None]:
    batch = StreamServer.max_accept
    yield
    StreamServer.max_accept = batch


def _burst(
    handle: Callable[[socket.socket, object], None],
    burst: int,
    *,
    accepted_first: bool,
    done: Callable[[], bool],
) -> None:
    """A gevent server of ``handle`` in this process, and ``burst`` clients that each
    send their number: all connected and sent before the server's loop runs, or
    (``accepted_first``) each accepted, its handler parked, before any sends. Returns
    once ``done()``."""
    server = StreamServer(("127.0.0.1", 0), handle)
    server.start()
    clients: list[socket.socket] = []
    try:
        for _ in range(burst):
            clients.append(socket.create_connection(server.address))
            if accepted_first:
                gevent.sleep(0.01)  # accepted, and its handler parked, in this order
        for n, client in enumerate(clients):
            client.sendall(f"{n}\n".encode())
        while not done():
            gevent.sleep(0.01)
    finally:
        server.stop()
        for client in clients:
            client.close()


def _served(burst: int) -> list[str]:
    """What a server did for a burst of ``burst`` connections, in order: ``h<n>`` as it
    handled request n, ``r<n>`` as the greenlet that request spawned ran."""
    order: list[str] = []

    def handle(sock: socket.socket, _address: object) -> None:
        n = sock.recv(16).decode().strip()
        order.append(f"h{n}")
        gevent.spawn(order.append, f"r{n}")  # what a view spawns: the stage's relay

    _burst(handle, burst, accepted_first=False, done=lambda: len(order) == 2 * burst)
    return order


def test_each_request_starts_what_it_spawned_before_the_next_is_read(
    default_batch: None,
) -> None:
    accept_in_turn()
    assert _served(BURST) == [f"{kind}{n}" for n in range(BURST) for kind in "hr"]


def test_gevents_default_reads_the_whole_burst_first(default_batch: None) -> None:
    """What accept_in_turn changes: by default every request of the burst is read
    before the first one's spawned greenlet runs."""
    order = _served(BURST)
    assert order[:BURST] == [f"h{n}" for n in range(BURST)]


def _woken(wait_for: Callable[[socket.socket, int], None], ranks: list[int]) -> list[int]:
    """The ranks of readers parked on socket pairs, in the order they woke once every
    pair was written to in one turn of the loop."""
    pairs = [socket.socketpair() for _ in ranks]
    woken: list[int] = []

    def reader(sock: socket.socket, rank: int) -> None:
        wait_for(sock, rank)
        woken.append(rank)

    try:
        readers = [gevent.spawn(reader, a, rank) for (a, _), rank in zip(pairs, ranks, strict=True)]
        gevent.sleep(0.01)  # every reader parked
        for _, b in pairs:
            b.send(b"x")
        gevent.joinall(readers, timeout=5)
    finally:
        for a, b in pairs:
            a.close()
            b.close()
    return woken


def _in_turn(sock: socket.socket, rank: int) -> None:
    watcher, _ = read_watcher(sock.fileno())
    try:
        wait_in_turn()(watcher, rank)
    finally:
        watcher.close()


def _libevs_order(sock: socket.socket, _rank: int) -> None:
    watcher, hub_wait = read_watcher(sock.fileno())
    try:
        hub_wait(watcher)
    finally:
        watcher.close()


def test_readers_ready_in_one_turn_are_woken_lowest_rank_first() -> None:
    assert _woken(_in_turn, [0, 1, 2, 3, 4, 5, 6, 7]) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert _woken(_in_turn, [5, 3, 7, 0, 6, 1, 4, 2]) == [0, 1, 2, 3, 4, 5, 6, 7]


def _handled(in_turn: bool, burst: int) -> list[str]:
    """The order in which a server's handlers read a burst of requests whose connections
    were all accepted, and whose bytes all came in one turn of the loop, in the order
    the connections came."""
    order: list[str] = []

    def handle(sock: socket.socket, _address: object) -> None:
        if in_turn:
            assert readable_in_turn(sock, next_rank(), 5.0)
        order.append(sock.recv(16).decode().strip())

    _burst(handle, burst, accepted_first=True, done=lambda: len(order) == burst)
    return order


def test_a_bursts_requests_are_read_in_the_order_their_connections_came() -> None:
    assert _handled(True, BURST) == [f"{n}" for n in range(BURST)]
    assert _handled(False, BURST) == [f"{n}" for n in reversed(range(BURST))]  # libev's


def test_a_connection_that_sends_nothing_is_given_up_on_in_time() -> None:
    a, b = socket.socketpair()
    try:
        assert readable_in_turn(a, next_rank(), 0.05) is False
        b.send(b"x")
        assert readable_in_turn(a, next_rank(), 0.05) is True
    finally:
        a.close()
        b.close()


def test_libev_alone_wakes_them_last_first() -> None:
    """What ReadyInTurn changes: the hub's own wait runs a turn's ready watchers in the
    reverse of the order they became ready."""
    assert _woken(_libevs_order, [0, 1, 2, 3]) == [3, 2, 1, 0]


def test_a_reader_killed_after_its_watcher_fired_is_not_woken_later() -> None:
    """A reader killed in the turn its watcher fired, before the release: the release
    switches to nobody, and the greenlet's next wait is not cut short by it."""
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    e, f = socket.socketpair()
    hub = gevent.get_hub()
    events: list[str] = []

    def reader() -> None:
        try:
            _in_turn(a, 0)
        except gevent.GreenletExit:
            events.append("killed")
        _in_turn(c, 0)  # parked again, on another socket
        events.append("read c")

    filed: list[int] = []

    def kill() -> None:  # in the hub, as gevent's own cancel_wait throws
        killer.stop()
        filed.append(len(ReadyInTurn.of(hub)._ready))
        greenlet.throw(gevent.GreenletExit)

    killer = hub.loop.io(e.fileno(), 1)
    killer.priority = -2  # libev's lowest: runs after the reader's in the same turn
    try:
        greenlet = gevent.spawn(reader)
        gevent.sleep(0.01)
        killer.start(kill)
        b.send(b"x")
        f.send(b"x")
        gevent.sleep(0.05)
        assert filed == [1]  # the reader's watcher had fired and filed it
        assert events == ["killed"]  # still parked on c
        d.send(b"x")
        greenlet.join(timeout=5)
        assert events == ["killed", "read c"]
    finally:
        killer.close()
        for sock in (a, b, c, d, e, f):
            sock.close()


def _read_order(ranks: list[int], *, begun: bool) -> list[bytes]:
    """What connections carrying requests of ``ranks`` read, in the order they read it,
    once their pairs were written to in one turn (pair n writes ``n``)."""
    pairs = [socket.socketpair() for _ in ranks]
    connections = [Connection(a, cooperative=True) for a, _ in pairs]
    for rank, connection in zip(ranks, connections, strict=True):
        connection.carry(rank)
        connection.set_read_timeout(None)  # the watcher's path, as the relay reads
        if begun:
            connection.begun()
    read: list[bytes] = []

    def reader(connection: Connection) -> None:
        read.append(connection.read())

    try:
        readers = [gevent.spawn(reader, connection) for connection in connections]
        gevent.sleep(0.01)
        for n, (_, b) in enumerate(pairs):
            b.send(f"{n}".encode())
        gevent.joinall(readers, timeout=5)
    finally:
        for connection in connections:
            connection.close()
        for _, b in pairs:
            b.close()
    return read


def test_connections_read_in_the_order_their_requests_came() -> None:
    assert _read_order([3, 2, 1, 0], begun=False) == [b"3", b"2", b"1", b"0"]
    assert _read_order([0, 1, 2, 3], begun=False) == [b"0", b"1", b"2", b"3"]


def test_once_a_reply_has_begun_its_reads_skip_the_turn() -> None:
    """The order costs a callback per wake-up, paid until the reply's body begins: then
    the connection is read as libev runs it."""
    assert _read_order([0, 1, 2, 3], begun=True) == [b"3", b"2", b"1", b"0"]
