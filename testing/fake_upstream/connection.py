"""One client connection of the fake upstream's HTTP server: the requests read off it
(heads; content-length and chunked bodies), its close noticed while an answer is being
written, and the writer of each answer (raw bytes, pauses, a dropped connection, JSON).

``UpstreamRequest`` is the record of one request: the server fills in what arrived, the
connection when the client closed, and the handler what it sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import struct
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

__all__ = [
    "BadRequest",
    "Connection",
    "PauseSlots",
    "Request",
    "ResponseWriter",
    "UpstreamRequest",
    "compact_json",
    "error_body",
    "response_head",
]

_READ_SIZE = 65536
_MAX_HEAD = 65536
_MAX_BODY = 64 * 1024 * 1024
_LINGER_RST = struct.pack("ii", 1, 0)

compact_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def error_body(
    message: str, code: int, kind: str = "server_error", param: str | None = None
) -> dict[str, object]:
    error: dict[str, object] = {"message": message, "type": kind, "code": code}
    if param is not None:
        error["param"] = param
    return {"error": error}


def response_head(code: int, headers: Sequence[tuple[str, str]], keep_alive: bool) -> bytes:
    """The status line and headers, with ``Connection: close`` when not kept alive."""
    try:
        reason = HTTPStatus(code).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {code} {reason}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass
class UpstreamRequest:
    """What the server saw of one request, and what its handler noted while answering it
    (times are ``time.monotonic()``)."""

    index: int
    connection_id: int
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    model: str | None = None
    options: dict[str, object] = field(default_factory=dict)
    received_at: float = 0.0
    headers_sent_at: float | None = None
    chunks_sent: int = 0
    done_sent: bool = False
    client_closed_at: float | None = None
    finished_at: float | None = None
    status: int | None = None
    stream: bool = False
    #: The URLs of the image parts of its messages, in order (``data:`` URIs whole).
    images: list[str] = field(default_factory=list)


class PauseSlots:
    """Sleeps rounded up to the next millisecond, with one timer per millisecond instead
    of one per sleeper: that keeps the loop's timer heap small with thousands of streams."""

    def __init__(self) -> None:
        self._waiters: dict[int, list[asyncio.Future[None]]] = {}

    def sleep(self, seconds: float) -> asyncio.Future[None]:
        """A future done after ``seconds``, or never when ``seconds`` is infinite."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        if not math.isinf(seconds):
            slot = math.ceil((loop.time() + seconds) * 1000.0)
            waiters = self._waiters.get(slot)
            if waiters is None:
                self._waiters[slot] = waiters = []
                loop.call_at(slot / 1000.0, self._fire, slot)
            waiters.append(fut)
        return fut

    def _fire(self, slot: int) -> None:
        for fut in self._waiters.pop(slot, ()):
            _wake(fut)

    def clear(self) -> None:
        self._waiters.clear()


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class BadRequest(Exception):
    pass


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]
    body: bytes


@dataclass(eq=False)
class Connection:
    id: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    buf: bytearray = field(default_factory=bytearray)
    closed: bool = False  # the client closed (EOF/reset) or the socket is gone
    self_closed: bool = False  # we closed/aborted it on purpose
    record: UpstreamRequest | None = None
    waiter: asyncio.Future[None] | None = None

    def mark_closed(self) -> None:
        if self.closed:
            return
        self.closed = True
        rec = self.record
        if rec is not None and not self.self_closed and rec.client_closed_at is None:
            rec.client_closed_at = time.monotonic()
        if self.waiter is not None:
            _wake(self.waiter)

    async def watch(self) -> None:
        """Keep a read pending while an answer is written, to notice a client close."""
        try:
            while True:
                data = await self.reader.read(_READ_SIZE)
                if not data:
                    break
                self.buf += data  # a pipelined next request: keep it for the parser
        except (ConnectionError, OSError):
            pass
        self.mark_closed()

    async def read_request(self) -> Request | None:
        """The next request, or None when the client closed first."""
        while True:
            head = await self._read_until(b"\r\n\r\n", _MAX_HEAD)
            if head is None:
                return None
            head = head.lstrip(b"\r\n")
            if head:
                break
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise BadRequest("bad request line")
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise BadRequest("bad header line")
            headers[name.strip().lower()] = value.strip()
        if headers.get("expect", "").lower() == "100-continue":
            self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body: bytes | None = b""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = await self._read_chunked_body()
        elif "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise BadRequest("bad content-length") from None
            if not 0 <= length <= _MAX_BODY:
                raise BadRequest("bad content-length")
            body = await self._read_exact(length)
        if body is None:
            return None
        return Request(method, target, version, headers, body)

    async def _read_chunked_body(self) -> bytes | None:
        body = bytearray()
        while True:
            line = await self._read_until(b"\r\n", 1024)
            if line is None:
                return None
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise BadRequest("bad chunk size") from None
            if size == 0:
                while True:  # trailers
                    trailer = await self._read_until(b"\r\n", _MAX_HEAD)
                    if trailer is None:
                        return None
                    if not trailer:
                        return bytes(body)
            data = await self._read_exact(size + 2)
            if data is None:
                return None
            body += data[:-2]
            if len(body) > _MAX_BODY:
                raise BadRequest("body too large")

    async def _read_until(self, sep: bytes, limit: int) -> bytes | None:
        start = 0
        while True:
            pos = self.buf.find(sep, start)
            if pos >= 0:
                out = bytes(self.buf[:pos])
                del self.buf[: pos + len(sep)]
                return out
            if len(self.buf) > limit:
                raise BadRequest("request head too large")
            start = max(0, len(self.buf) - len(sep) + 1)
            data = await self.reader.read(_READ_SIZE)
            if not data:
                return None
            self.buf += data

    async def _read_exact(self, size: int) -> bytes | None:
        while len(self.buf) < size:
            data = await self.reader.read(max(_READ_SIZE, size - len(self.buf)))
            if not data:
                return None
            self.buf += data
        out = bytes(self.buf[:size])
        del self.buf[:size]
        return out


class ResponseWriter:
    """Writes one answer. ``send`` and ``pause`` return False once the client is gone."""

    __slots__ = ("record", "keep_alive", "_conn", "_slots")

    def __init__(
        self,
        conn: Connection,
        slots: PauseSlots,
        record: UpstreamRequest | None,
        keep_alive: bool,
    ) -> None:
        self.record = record
        self.keep_alive = keep_alive  # whether the request allows another on its connection
        self._conn = conn
        self._slots = slots

    async def send(self, data: bytes) -> bool:
        conn = self._conn
        if conn.closed or conn.self_closed:
            return False
        writer = conn.writer
        if writer.transport.is_closing():  # lost under a write: asyncio only logs more
            conn.mark_closed()
            return False
        writer.write(data)
        if writer.transport.get_write_buffer_size():  # the socket took less than all of it
            try:
                await writer.drain()
            except (ConnectionError, OSError):
                conn.mark_closed()
                return False
        return not conn.closed

    async def pause(self, seconds: float) -> bool:
        """Sleep (forever when ``seconds`` is infinite), waking early if the client closes."""
        conn = self._conn
        if conn.closed:
            return False
        if seconds <= 0:
            return True
        conn.waiter = self._slots.sleep(seconds)
        try:
            await conn.waiter
        finally:
            conn.waiter = None
        return not conn.closed

    async def drop(self, reset: bool) -> None:
        """Close the connection mid-answer: a FIN, or with ``reset`` an RST."""
        conn = self._conn
        conn.self_closed = True
        if reset:
            sock = conn.writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            conn.writer.transport.abort()
        else:
            conn.writer.close()

    async def send_json(
        self,
        code: int,
        obj: object,
        *,
        gzip: bool = False,
        drop: bool | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> bool:
        """A whole JSON answer, with ``headers`` besides its own; with ``drop``, half of its
        body and then ``drop(drop)``. True when the connection may serve another request."""
        payload = compact_json(obj).encode()
        headers = [("Content-Type", "application/json"), *headers]
        if gzip:
            comp = zlib.compressobj(6, zlib.DEFLATED, 31)
            payload = comp.compress(payload) + comp.flush()
            headers.append(("Content-Encoding", "gzip"))
        headers.append(("Content-Length", str(len(payload))))
        data = response_head(code, headers, self.keep_alive)
        data += payload if drop is None else payload[: len(payload) // 2]
        rec = self.record
        if rec is not None:
            rec.status = code
        ok = await self.send(data)
        if ok and rec is not None:
            rec.headers_sent_at = time.monotonic()
        if drop is not None:
            await self.drop(drop)
            return False
        return ok and self.keep_alive
