"""An HTTP/1.1 client transport for the openai client that parses responses with llhttp.

``HttpToolsTransport`` is an ``httpx2.BaseTransport``: the openai client builds and sends
its requests through it as through httpx2's own, and gets an ``httpx2.Response`` whose
body is read straight from the socket and parsed by ``httptools.HttpResponseParser``
(llhttp, in C), never by h11 or httpcore. Under gevent a read parks the greenlet on a
libev watcher and then reads the descriptor once (see ``connections.Connection``).
Under threads (``flask run``) the same code reads blocking sockets, each read bounded by
the read timeout, and a thread may shut the socket down under a reader (the response's
``extensions["network_stream"].get_extra_info("socket")``, as httpcore offers it).

What it does:

- HTTP/1.1 only, over plain TCP (``http://``). ``https://`` URLs are refused with
  ``httpx2.UnsupportedProtocol``: stageserver sends those through the httpx2 transport
  (``sharded.ShardedTransport``), which has the certificate handling, SNI and ALPN
  right already, and where TLS costs more per chunk than the parsing saved here.
- Keep-alive: a connection goes back to its pool (``connections.ConnectionPool``) only when its
  response body was read to its end and llhttp says the connection may stay open. A
  response closed before its end closes its socket: that close is what tells an upstream
  to stop generating. So does a read interrupted by gevent (a timeout or a cancel thrown
  into the reader), a parse error, and any byte that follows a response's end.
- ``Connection: close`` from the upstream, or an HTTP/1.0 response without keep-alive:
  the body is read to its end, then the socket is closed.
- Bodies framed by ``Content-Length`` or chunked encoding, and bodies that end when the
  connection closes (no length, no chunking), which are never reused. Chunk extensions
  (``5;name=value``) are skipped and trailers read and dropped, both by llhttp.
- 1xx interim responses are skipped; 101 is an error (no upgrade was asked for). 204 and
  304 have no body (llhttp knows). A response to ``HEAD`` is returned without a body and
  its connection closed, as llhttp cannot be told that the request was a ``HEAD``.
- Timeouts come from the request's ``extensions["timeout"]``, as httpx2 passes them:
  ``connect``, ``write`` (sending the request) and ``pool`` (waiting for a place among
  ``max_connections``). ``read`` bounds each read when set (threads); under gevent the
  stage sets none, keeps its own deadlines, and a read costs no timer.
- A request that fails on a reused connection before any byte of a response arrived
  (the upstream closed it as the request went out) is sent once more on a new
  connection; never once a response byte has arrived.
- The request body is read whole and sent with the head in one write.

What it does not do: HTTP/2, TLS, proxies, ``Expect: 100-continue`` waits, compression.
The client asks for ``Accept-Encoding: identity``; a body an upstream compresses anyway is
returned as it came, and ``response.iter_bytes()`` decodes it (httpx2 does, above here).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterator
from typing import Any

import httptools
import httpx2

from ...concurrency import cooperative_socket_module, gevent_active, next_rank
from .connections import KEEPALIVE_EXPIRY, Connection, ConnectionPool, Origin, reap

# RFC 9110's token for names; values may not hold CR, LF or NUL (no header injection).
_BAD_NAME = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9A-Za-z]")
_BAD_VALUE = re.compile(rb"[\r\n\0]")


class _NoResponse(Exception):
    """The request failed before any response byte arrived; ``error`` says how."""

    def __init__(self, error: httpx2.TransportError) -> None:
        super().__init__(str(error))
        self.error = error


class HttpToolsTransport(httpx2.BaseTransport):
    """One upstream's connections in this process, at most ``max_connections`` in use.

    ``cooperative`` (default: whether gevent patched this process) reads through gevent's
    hub; tests pass it to run the gevent path in a process that is not patched.
    """

    def __init__(
        self,
        max_connections: int,
        *,
        keepalive_expiry: float = KEEPALIVE_EXPIRY,
        cooperative: bool | None = None,
    ) -> None:
        self._cooperative = gevent_active() if cooperative is None else cooperative
        self.pool = ConnectionPool(max_connections, keepalive_expiry)
        reap(self.pool, self._cooperative)

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        url = request.url
        if url.scheme != "http":
            raise httpx2.UnsupportedProtocol(
                f"HttpToolsTransport speaks plain http, not {url.scheme!r}: "
                "send https through httpx2.HTTPTransport"
            )
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        origin = (url.raw_host, url.port or 80)
        message = _request_bytes(request)
        rank = next_rank()
        pool = self.pool
        pool.acquire(timeouts.get("pool"))
        try:
            conn = pool.take(origin)
            reused = conn is not None
            while True:
                if conn is None:
                    conn = self._connect(origin, timeouts.get("connect"))
                try:
                    conn.carry(rank)
                    return self._exchange(conn, origin, message, request.method, timeouts)
                except _NoResponse as exc:
                    if not reused:
                        raise exc.error from exc.__cause__
                    conn, reused = None, False
        except BaseException:
            pool.release()
            raise

    def _connect(self, origin: Origin, timeout: float | None) -> Connection:
        address = (origin[0].decode("ascii"), origin[1])
        try:
            if self._cooperative:
                sock = _connect_to(cooperative_socket_module(), address, timeout)
            else:
                sock = _connect_to(socket, address, timeout)
        except TimeoutError as exc:
            raise httpx2.ConnectTimeout(str(exc) or "timed out connecting") from exc
        except OSError as exc:
            raise httpx2.ConnectError(str(exc)) from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return Connection(sock, self._cooperative)

    def _exchange(
        self,
        conn: Connection,
        origin: Origin,
        message: bytes,
        method: str,
        timeouts: dict[str, float | None],
    ) -> httpx2.Response:
        """Send the request and read the response's head; the body stays on the socket."""
        body = _Body(self.pool, origin, conn, head_only=method == "HEAD")
        received = False
        try:
            try:
                conn.sock.settimeout(timeouts.get("write"))
                conn.sock.sendall(message)
            except TimeoutError as exc:
                raise httpx2.WriteTimeout(str(exc) or "timed out sending the request") from exc
            except OSError as exc:
                raise _NoResponse(httpx2.WriteError(str(exc))) from exc
            conn.set_read_timeout(timeouts.get("read"))
            while body.status == 0:
                try:
                    data = conn.read()
                except TimeoutError as exc:
                    raise httpx2.ReadTimeout(str(exc) or "timed out") from exc
                except OSError as exc:
                    if received:
                        raise httpx2.ReadError(str(exc)) from exc
                    raise _NoResponse(httpx2.ReadError(str(exc))) from exc
                if not data:
                    if received:
                        raise httpx2.RemoteProtocolError("Server disconnected mid-head.")
                    closed = "Server disconnected without sending a response."
                    raise _NoResponse(httpx2.RemoteProtocolError(closed))
                received = True
                body.feed(data)
        except BaseException:
            body.detach()
            conn.close()
            raise
        return httpx2.Response(
            body.status,
            headers=body.headers,
            stream=body,
            extensions={
                "http_version": body.http_version,
                "reason_phrase": body.reason,
                "network_stream": conn,
            },
        )

    def close(self) -> None:
        self.pool.close()


def _connect_to(sockets: Any, address: tuple[str, int], timeout: float | None) -> Any:
    """A connected socket of the ``sockets`` module (gevent's or the standard one). An
    address that is an IP literal needs no resolver: under gevent that is a trip through
    its thread pool (and a greenlet waiting for a thread) for each new connection."""
    host, port = address
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return sockets.create_connection(address, timeout)
    sock = sockets.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class _Body(httpx2.SyncByteStream):
    """A response, from its head on: the parser's callbacks, then its body as a stream.

    llhttp hands each piece of body to ``list.append`` itself (``on_body``): a piece costs
    no Python frame of its own, and ``__iter__`` yields the pieces as h11 would, one per
    chunk, or per part of one when a chunk comes in several reads.
    """

    __slots__ = (
        "_pool", "_origin", "_conn", "_parser", "_pieces", "_head_only", "status", "reason",
        "headers", "http_version", "_interim", "_until_close", "_complete", "_reusable",
    )  # fmt: skip

    def __init__(
        self, pool: ConnectionPool, origin: Origin, conn: Connection, *, head_only: bool
    ) -> None:
        self._pool: ConnectionPool | None = pool
        self._origin = origin
        self._conn: Connection | None = conn
        self._pieces: list[bytes] = []
        self._head_only = head_only
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.http_version = b"HTTP/1.1"
        self._interim = False
        self._until_close = False
        self._complete = False
        self._reusable = True
        self._parser: Any = httptools.HttpResponseParser(self)

    # -- llhttp's callbacks (looked up once, when the parser is made) ---------------------

    def on_message_begin(self) -> None:
        if self._complete:
            self._reusable = False  # bytes after the response's end: junk

    def on_status(self, reason: bytes) -> None:
        self.reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.status == 0:  # after the head: a trailer, dropped
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status: int = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._interim = True  # 100 Continue, 103 Early Hints: the response follows
            self.headers = []
            return
        if status == 101:
            raise httpx2.RemoteProtocolError("upstream switched protocols unasked (101)")
        self.status = status
        self.http_version = b"HTTP/" + parser.get_http_version().encode()
        self._reusable = self._reusable and parser.should_keep_alive()
        self._until_close = not any(
            n.lower() == b"content-length"
            or (n.lower() == b"transfer-encoding" and v.lower().rstrip().endswith(b"chunked"))
            for n, v in self.headers
        )
        if self._head_only:
            self._complete = True
            self._reusable = False

    @property
    def on_body(self) -> Any:
        return self._pieces.append

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
        elif self._complete:
            self._reusable = False
        else:
            self._complete = True

    # -- reading --------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if not self._complete:
                if isinstance(exc.__context__, httpx2.HTTPError):
                    raise exc.__context__ from None
                raise httpx2.RemoteProtocolError(f"malformed response: {exc}") from exc
            self._reusable = False  # junk after the end: the body itself is whole
        if self._head_only:
            self._pieces.clear()

    def __iter__(self) -> Iterator[bytes]:
        pieces = self._pieces
        conn = self._conn
        if conn is None:
            return
        read = conn.read
        feed = self.feed
        begun: Callable[[], None] | None = conn.begun
        while True:
            if pieces:
                if begun is not None:  # the reads up to here went in turn
                    begun()
                    begun = None
                # One piece per chunk, as h11 gives them: joining them would save nothing
                # in the usual read of one chunk, and hide where each chunk ended.
                yield from pieces
                pieces.clear()
            if self._complete:
                return
            try:
                data = read()
            except TimeoutError as exc:
                raise httpx2.ReadTimeout(str(exc) or "timed out") from exc
            except OSError as exc:
                raise httpx2.ReadError(str(exc)) from exc
            if data:
                feed(data)
            elif self._until_close:
                self._complete = True
                self._reusable = False
            else:
                raise httpx2.RemoteProtocolError(
                    "peer closed connection without sending complete message body"
                )

    def close(self) -> None:
        pool, conn = self._pool, self._conn
        self.detach()
        if pool is None or conn is None:
            return
        if self._complete and self._reusable:
            pool.put(self._origin, conn)
        else:
            conn.close()
        pool.release()

    def detach(self) -> None:
        """Forget the connection and the parser (which refers back to this object)."""
        self._pool = self._conn = self._parser = None


def _request_bytes(request: httpx2.Request) -> bytes:
    url = request.url
    lines = [b"%s %s HTTP/1.1\r\n" % (request.method.encode("ascii"), url.raw_path)]
    chunked = False
    for name, value in request.headers.raw:
        if _BAD_NAME.search(name) or not name or _BAD_VALUE.search(value):
            raise httpx2.LocalProtocolError(f"invalid request header {name!r}: {value!r}")
        lines.append(b"%s: %s\r\n" % (name, value))
        chunked = chunked or (name.lower() == b"transfer-encoding" and b"chunked" in value.lower())
    lines.append(b"\r\n")
    content = b"".join(request.stream)  # type: ignore[arg-type]
    if chunked:
        content = (b"%x\r\n%s\r\n" % (len(content), content) if content else b"") + b"0\r\n\r\n"
    lines.append(content)
    return b"".join(lines)
