"""A loopback TCP proxy that forwards bytes both ways and cuts every connection on command.

A test puts it between a client and the server to drop a stream the way a network does:
``cut()`` closes both sides of every open connection at once, wherever the bytes are,
and the proxy goes on accepting new connections, so the client can come back through
it. It keeps what clients sent, for tests to check what they asked on their way back,
and what the target sent them, for tests to check the bytes a client was given.
"""

from __future__ import annotations

import socket
import threading
from types import TracebackType
from typing import Self

_READ_SIZE = 65536


class _Link:
    """One client connection and its connection to the target."""

    def __init__(self, client: socket.socket, target: socket.socket) -> None:
        self.client = client
        self.target = target
        self._closed = False
        self._lock = threading.Lock()

    def close(self) -> bool:
        """Close both sides; False when they were closed already."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
        for sock in (self.client, self.target):
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked on it
            except OSError:
                pass
            sock.close()
        return True


class CuttingProxy:
    """Listens on 127.0.0.1 (``url``) and forwards to ``127.0.0.1:target_port``."""

    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._links: set[_Link] = set()
        self._sent: list[bytes] = []
        self._received: list[bytes] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def cut(self) -> int:
        """Drop every open connection now; the number dropped."""
        with self._lock:
            links, self._links = self._links, set()
        return sum(link.close() for link in links)

    def sent_by_clients(self) -> bytes:
        """Every byte clients sent through the proxy, in the order it arrived."""
        with self._lock:
            return b"".join(self._sent)

    def received_by_clients(self) -> bytes:
        """Every byte the target sent to clients, in the order it arrived (the raw HTTP
        responses, status lines and chunked framing included)."""
        with self._lock:
            return b"".join(self._received)

    def close(self) -> None:
        self._listener.close()
        self.cut()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                target = socket.create_connection(self._target)
            except OSError:
                client.close()
                continue
            link = _Link(client, target)
            with self._lock:
                self._links.add(link)
            for source, sink, record in (
                (client, target, self._sent),
                (target, client, self._received),
            ):
                threading.Thread(
                    target=self._pump, args=(link, source, sink, record), daemon=True
                ).start()

    def _pump(
        self, link: _Link, source: socket.socket, sink: socket.socket, record: list[bytes]
    ) -> None:
        try:
            while data := source.recv(_READ_SIZE):
                with self._lock:
                    record.append(data)
                sink.sendall(data)
        except OSError:
            pass
        # Either side leaving ends the link, as it would end a connection without a proxy.
        link.close()
        with self._lock:
            self._links.discard(link)
