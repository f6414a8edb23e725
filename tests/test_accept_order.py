"""``concurrency.accept_in_turn``: a worker's server accepts one connection per turn of
gevent's loop, so that what a request starts (its stage's relay, which sends the
upstream request) runs before the next request is read: a burst is served in the order
it came. A real gevent server in this process, and plain sockets connected to it before
its loop runs."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

gevent = pytest.importorskip("gevent")
from gevent.server import StreamServer  # noqa: E402

from stageserver.concurrency import accept_in_turn  # noqa: E402

BURST = 8


@pytest.fixture
def default_batch() -> Iterator[None]:
    batch = StreamServer.max_accept
    yield
    StreamServer.max_accept = batch


def _served(burst: int) -> list[str]:
    """What a server did for a burst of ``burst`` connections, in order: ``h<n>`` as it
    handled request n, ``r<n>`` as the greenlet that request spawned ran."""
    order: list[str] = []

    def handle(sock: socket.socket, _address: object) -> None:
        n = sock.recv(16).decode().strip()
        order.append(f"h{n}")
        gevent.spawn(order.append, f"r{n}")  # what a view spawns: the stage's relay

    server = StreamServer(("127.0.0.1", 0), handle)
    server.start()
    clients = []
    try:
        for n in range(burst):  # all connected and sent before the server's loop runs
            client = socket.create_connection(server.address)
            client.sendall(f"{n}\n".encode())
            clients.append(client)
        while len(order) < 2 * burst:
            gevent.sleep(0.01)
    finally:
        server.stop()
        for client in clients:
            client.close()
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
