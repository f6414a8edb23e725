"""A small but real OpenAI-compatible upstream with fault modes, for tests and benchmarks.

One asyncio event loop serves every connection (no thread per connection), so it can hold
thousands of slow streams.  HTTP/1.1 with keep-alive; endpoints:

* ``POST /v1/chat/completions`` (also ``/chat/completions``): streaming (SSE, one event per
  HTTP chunk) or non-streaming chat completions.
* ``GET /v1/models`` (also ``/models``): one model, ``"fake"``.
* ``GET /health``: ``{"status":"ok"}``.
* ``GET /_fake/requests`` (records as JSON), ``POST /_fake/reset``, ``GET|POST /_fake/defaults``
  (read / merge server-wide default options): control endpoints, never recorded.

Options are chosen per request through the model name, ``"fake?mode=drop&after=3&chunks=10"``
(parsed with :func:`urllib.parse.parse_qs`; per-request values win over ``FakeUpstream.defaults``):

``chunks`` (5), ``interval`` (0 s between content chunks), ``prefill`` (0 s before the first chunk),
``headers_first`` (1), ``text`` (split into ``chunks`` nearly-equal pieces by characters; default
pieces are ``"tok0 "``, ``"tok1 "``, ...), ``mode`` (``normal``, ``status`` + ``status=<code>``,
``hang``, ``drop`` + ``after``/``reset``, ``malformed`` + ``after``, ``error_object`` + ``after``),
``after_done`` (``hang`` | ``reset``), and wire shapes ``crlf``, ``split``, ``multiline``,
``comments``, ``gzip``.  ``max_tokens``/``max_completion_tokens`` in the body cap the number of
pieces (one token each; finish_reason ``"length"``).  ``prompt_tokens`` is the number of
whitespace-separated words in the messages' text.

In-process::

    with FakeUpstream(defaults={"interval": "0.02"}) as fake:
        ...  # fake.url, fake.requests, fake.wait_for(...)

As a process: ``python -m tests.fake_upstream --port 8001 [--default key=value ...]`` prints
``READY <url>`` when listening and exits on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import signal
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs

__all__ = ["FakeUpstream", "UpstreamRequest", "main"]

_READ_SIZE = 65536
_MAX_HEAD = 65536
_MAX_BODY = 64 * 1024 * 1024
_CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
_MODEL_PATHS = frozenset({"/v1/models", "/models"})
_MODES = frozenset({"normal", "status", "hang", "drop", "malformed", "error_object"})
_AFTER_DONE = frozenset({"", "none", "hang", "reset"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})
_LINGER_RST = struct.pack("ii", 1, 0)
_MALFORMED = '{"id": not json'
_ERROR_OBJECT = '{"error":{"message":"fake upstream error object","type":"server_error"}}'
_END = b"0\r\n\r\n"


_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _flag(value: str) -> bool:
    low = value.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"not a 0/1 flag: {value!r}")


def _seconds(value: str) -> float:
    result = float(value)
    if math.isnan(result) or result < 0:
        raise ValueError(f"not a duration: {value!r}")
    return result


def _count(value: str) -> int:
    result = int(value)
    if result < 0:
        raise ValueError(f"negative count: {value!r}")
    return result


@dataclass
class _Options:
    chunks: int = 5
    interval: float = 0.0
    prefill: float = 0.0
    headers_first: bool = True
    text: str | None = None
    mode: str = "normal"
    status: int = 500
    after: int = 2
    reset: bool = False
    after_done: str = ""
    crlf: bool = False
    split: bool = False
    multiline: bool = False
    comments: bool = False
    gzip: bool = False
    created: int | None = None  # a fixed "created" stamp, so tests can compare exact bytes


_CONVERTERS: dict[str, Callable[[str], object]] = {
    "chunks": _count,
    "interval": _seconds,
    "prefill": _seconds,
    "headers_first": _flag,
    "text": str,
    "mode": lambda v: v.strip().lower() or "normal",
    "status": int,
    "after": _count,
    "reset": _flag,
    "after_done": lambda v: v.strip().lower(),
    "crlf": _flag,
    "split": _flag,
    "multiline": _flag,
    "comments": _flag,
    "gzip": _flag,
    "created": int,
}


def _resolve_options(
    defaults: Mapping[str, object], query: str
) -> tuple[_Options, dict[str, object]]:
    """Merge server defaults and the model-name query; return typed options and the record."""
    raw = {str(key): str(value) for key, value in defaults.items()}
    for key, values in parse_qs(query, keep_blank_values=True).items():
        raw[key] = values[-1]
    opts = _Options()
    extras: dict[str, object] = {}
    for key, value in raw.items():
        convert = _CONVERTERS.get(key)
        if convert is None:
            extras[key] = value
            continue
        try:
            setattr(opts, key, convert(value))
        except ValueError as exc:
            raise ValueError(f"bad option {key}={value!r}: {exc}") from None
    if opts.mode not in _MODES:
        raise ValueError(f"unknown mode {opts.mode!r}")
    if opts.after_done not in _AFTER_DONE:
        raise ValueError(f"unknown after_done {opts.after_done!r}")
    if not 100 <= opts.status <= 599:
        raise ValueError(f"bad status {opts.status}")
    if math.isinf(opts.interval):
        raise ValueError("interval must be finite")
    record: dict[str, object] = {name: getattr(opts, name) for name in _CONVERTERS}
    record.update(extras)
    return opts, record


def _pieces(opts: _Options) -> list[str]:
    if opts.text is None:
        return [f"tok{i} " for i in range(opts.chunks)]
    text = opts.text
    count = min(opts.chunks, len(text))
    if count == 0:
        return []
    size = len(text)
    return [text[i * size // count : (i + 1) * size // count] for i in range(count)]


def _prompt_tokens(body: Mapping[str, Any]) -> int:
    total = 0
    messages = body.get("messages")
    if not isinstance(messages, list):
        return 0
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            total += len(content.split())
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += len(part["text"].split())
    return total


def _reason(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Unknown"


def _head(code: int, headers: Sequence[tuple[str, str]], keep_alive: bool) -> bytes:
    lines = [f"HTTP/1.1 {code} {_reason(code)}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


_STREAM_HEADS: dict[tuple[bool, bool], bytes] = {
    (gz, keep): _head(
        200,
        [
            ("Content-Type", "text/event-stream"),
            ("Cache-Control", "no-cache"),
            ("Transfer-Encoding", "chunked"),
            *([("Content-Encoding", "gzip")] if gz else []),
        ],
        keep,
    )
    for gz in (False, True)
    for keep in (False, True)
}


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _awkward_parts(data: bytes) -> list[bytes]:
    """Split an SSE event at awkward places: after ``data:``, between CR and LF, inside a
    multi-byte UTF-8 character, in the middle, and before the final byte."""
    cuts = {5, len(data) // 2, len(data) - 1}
    first_crlf = data.find(b"\r\n")
    if first_crlf >= 0:
        cuts.add(first_crlf + 1)
        cuts.add(data.rfind(b"\r\n") + 1)
    for pos, byte in enumerate(data):
        if byte >= 0xC0:
            cuts.add(pos + 1)
            break
    edges = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False) if b > a]


class _Wire:
    """Per-response SSE encoder: line endings, comments, multiline data, gzip, chunk framing."""

    __slots__ = ("eol", "comment", "multiline", "split", "comp", "pending", "simple")

    def __init__(self, opts: _Options, head: bytes) -> None:
        self.eol = "\r\n" if opts.crlf else "\n"
        self.comment = ": keep-alive" + self.eol if opts.comments else ""
        self.multiline = opts.multiline
        self.split = opts.split
        self.comp = zlib.compressobj(6, zlib.DEFLATED, 31) if opts.gzip else None
        self.pending = head  # response head not yet written (headers_first=0)
        self.simple = not (opts.split or opts.gzip)  # one write per event, no transformation

    def event(self, payload: str, *, pretty: bool = True) -> bytes:
        eol = self.eol
        if self.multiline and pretty:
            lines = json.dumps(json.loads(payload), indent=1, ensure_ascii=False).split("\n")
            data = "".join(f"data: {line}{eol}" for line in lines)
        else:
            data = f"data: {payload}{eol}"
        return (self.comment + data + eol).encode()

    def frames(self, sse: bytes) -> list[bytes]:
        if self.comp is not None:
            body = self.comp.compress(sse) + self.comp.flush(zlib.Z_SYNC_FLUSH)
            if not self.split:
                return [_chunk(body)]
            half = len(body) // 2
            return [_chunk(part) for part in (body[:half], body[half:]) if part]
        if not self.split:
            return [_chunk(sse)]
        return [_chunk(part) for part in _awkward_parts(sse)]

    def end(self) -> bytes:
        if self.comp is None:
            return _END
        tail = self.comp.flush()
        return (_chunk(tail) if tail else b"") + _END


@dataclass
class UpstreamRequest:
    """What the fake upstream saw for one request (times are ``time.monotonic()``)."""

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


class _BadRequest(Exception):
    pass


@dataclass(eq=False)
class _Conn:
    id: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    buf: bytearray = field(default_factory=bytearray)
    closed: bool = False  # the client closed (EOF/reset) or the socket is gone
    self_closed: bool = False  # we closed/aborted it on purpose
    record: UpstreamRequest | None = None
    waiter: asyncio.Future[None] | None = None
    watcher: asyncio.Task[None] | None = None


@dataclass
class _Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]
    body: bytes


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class FakeUpstream:
    """OpenAI-compatible fake upstream server; see the module docstring for the options."""

    def __init__(
        self,
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        defaults: Mapping[str, str | int | float] | None = None,
    ) -> None:
        self.defaults: dict[str, str | int | float] = dict(defaults or {})
        self.connections_opened = 0
        self._host = host
        self._requested_port = port
        self._port: int | None = None
        self._records: list[UpstreamRequest] = []
        self._next_index = 0
        self._next_conn_id = 0
        self._conns: set[_Conn] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._slots: dict[int, list[asyncio.Future[None]]] = {}
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_errors: list[BaseException] = []

    # ----------------------------------------------------------------- public API
    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeUpstream is not running")
        return self._port

    @property
    def base(self) -> str:
        host = "127.0.0.1" if self._host in ("", "0.0.0.0", "::") else self._host
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/v1"

    @property
    def requests(self) -> list[UpstreamRequest]:
        return list(self._records)

    def reset(self) -> None:
        """Forget all records and zero ``connections_opened`` (indices and ids keep counting)."""
        self._records.clear()
        self.connections_opened = 0

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    def start(self) -> FakeUpstream:
        """Run the server on an event loop in a daemon thread; return once it listens."""
        if self._thread is not None:
            raise RuntimeError("already started")
        self._started.clear()
        self._start_errors.clear()
        self._thread = threading.Thread(target=self._thread_main, name="fake-upstream", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_errors:
            self._thread.join()
            self._thread = None
            raise RuntimeError("FakeUpstream failed to start") from self._start_errors[0]
        return self

    def stop(self, timeout: float = 5.0) -> None:
        thread, loop, event = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        if loop is not None and event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)
        thread.join(timeout)
        self._thread = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def start_async(self) -> None:
        """Start listening on the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(
            self._on_connect, self._host, self._requested_port, backlog=4096
        )
        self._port = int(self._server.sockets[0].getsockname()[1])

    async def aclose(self) -> None:
        """Stop listening and drop every connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for conn in list(self._conns):
            conn.self_closed = True
            conn.writer.transport.abort()
        tasks = [task for task in self._tasks if not task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()
        self._slots.clear()
        for _ in range(3):  # let the transports' connection_lost callbacks run
            await asyncio.sleep(0)

    async def serve(
        self, ready: Callable[[str], None] | None = None, *, handle_signals: bool = False
    ) -> None:
        """Listen, call ``ready(url)``, and serve until stopped (or SIGTERM/SIGINT)."""
        self._stop_event = asyncio.Event()
        await self.start_async()
        if handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop_event.set)
        try:
            if ready is not None:
                ready(self.url)
            await self._stop_event.wait()
        finally:
            await self.aclose()

    # ----------------------------------------------------------------- machinery
    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self.serve(lambda _url: self._started.set()))
        except BaseException as exc:  # reported to start()
            self._start_errors.append(exc)
        finally:
            self._started.set()
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._next_conn_id += 1
        self.connections_opened += 1
        conn = _Conn(self._next_conn_id, reader, writer)
        self._conns.add(conn)
        try:
            await self._serve_connection(conn)
        except (asyncio.CancelledError, ConnectionError, OSError):
            pass
        finally:
            self._conns.discard(conn)
            if task is not None:
                self._tasks.discard(task)
            if conn.closed or conn.self_closed:
                writer.transport.abort()
            else:
                writer.close()

    async def _serve_connection(self, conn: _Conn) -> None:
        while not conn.closed and not conn.self_closed:
            try:
                req = await self._read_request(conn)
            except _BadRequest as exc:
                await self._send_json(conn, None, 400, _error(str(exc), 400), False)
                return
            if req is None:
                return
            keep_alive = req.version == "HTTP/1.1" and (
                "close" not in req.headers.get("connection", "").lower()
            )
            path = req.target.split("?", 1)[0]
            if path.startswith("/_fake/"):
                if not await self._control(conn, req.method, path, req.body, keep_alive):
                    return
                continue
            body: Any = None
            if req.body:
                try:
                    body = json.loads(req.body)
                except ValueError:
                    body = None
            self._next_index += 1
            rec = UpstreamRequest(
                index=self._next_index - 1,
                connection_id=conn.id,
                method=req.method,
                path=req.target,
                headers=req.headers,
                body=body,
                received_at=time.monotonic(),
            )
            self._records.append(rec)
            conn.record = rec
            conn.watcher = asyncio.get_running_loop().create_task(self._watch(conn))
            try:
                keep_alive = await self._dispatch(conn, rec, req.method, path, body, keep_alive)
            finally:
                rec.finished_at = time.monotonic()
                conn.record = None
                watcher, conn.watcher = conn.watcher, None
                if watcher is not None and not watcher.done():
                    watcher.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await watcher
            if not keep_alive:
                return

    async def _read_until(self, conn: _Conn, sep: bytes, limit: int) -> bytes | None:
        start = 0
        while True:
            pos = conn.buf.find(sep, start)
            if pos >= 0:
                out = bytes(conn.buf[:pos])
                del conn.buf[: pos + len(sep)]
                return out
            if len(conn.buf) > limit:
                raise _BadRequest("request head too large")
            start = max(0, len(conn.buf) - len(sep) + 1)
            data = await conn.reader.read(_READ_SIZE)
            if not data:
                return None
            conn.buf += data

    async def _read_exact(self, conn: _Conn, size: int) -> bytes | None:
        while len(conn.buf) < size:
            data = await conn.reader.read(max(_READ_SIZE, size - len(conn.buf)))
            if not data:
                return None
            conn.buf += data
        out = bytes(conn.buf[:size])
        del conn.buf[:size]
        return out

    async def _read_request(self, conn: _Conn) -> _Request | None:
        while True:
            head = await self._read_until(conn, b"\r\n\r\n", _MAX_HEAD)
            if head is None:
                return None
            head = head.lstrip(b"\r\n")
            if head:
                break
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise _BadRequest("bad request line")
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadRequest("bad header line")
            headers[name.strip().lower()] = value.strip()
        if headers.get("expect", "").lower() == "100-continue":
            conn.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body: bytes | None = b""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = await self._read_chunked_body(conn)
        elif "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise _BadRequest("bad content-length") from None
            if not 0 <= length <= _MAX_BODY:
                raise _BadRequest("bad content-length")
            body = await self._read_exact(conn, length)
        if body is None:
            return None
        return _Request(method, target, version, headers, body)

    async def _read_chunked_body(self, conn: _Conn) -> bytes | None:
        body = bytearray()
        while True:
            line = await self._read_until(conn, b"\r\n", 1024)
            if line is None:
                return None
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _BadRequest("bad chunk size") from None
            if size == 0:
                while True:  # trailers
                    trailer = await self._read_until(conn, b"\r\n", _MAX_HEAD)
                    if trailer is None:
                        return None
                    if not trailer:
                        return bytes(body)
            data = await self._read_exact(conn, size + 2)
            if data is None:
                return None
            body += data[:-2]
            if len(body) > _MAX_BODY:
                raise _BadRequest("body too large")

    async def _watch(self, conn: _Conn) -> None:
        """Keep a read pending while a response is produced, to notice a client close."""
        try:
            while True:
                data = await conn.reader.read(_READ_SIZE)
                if not data:
                    break
                conn.buf += data  # a pipelined next request: keep it for the parser
        except (ConnectionError, OSError):
            pass
        self._mark_closed(conn)

    def _mark_closed(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        rec = conn.record
        if rec is not None and not conn.self_closed and rec.client_closed_at is None:
            rec.client_closed_at = time.monotonic()
        if conn.waiter is not None:
            _wake(conn.waiter)

    async def _pause(self, conn: _Conn, seconds: float) -> bool:
        """Sleep, waking early if the client closes; return whether the client is still there."""
        if conn.closed:
            return False
        if seconds <= 0:
            return True
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        if not math.isinf(seconds):
            # Coalesce wake-ups into 1 ms slots: one timer per slot instead of one per stream
            # keeps the loop's timer heap small with thousands of streams.
            slot = math.ceil((loop.time() + seconds) * 1000.0)
            waiters = self._slots.get(slot)
            if waiters is None:
                self._slots[slot] = waiters = []
                loop.call_at(slot / 1000.0, self._fire_slot, slot)
            waiters.append(fut)
        conn.waiter = fut
        try:
            await fut
        finally:
            conn.waiter = None
        return not conn.closed

    def _fire_slot(self, slot: int) -> None:
        for fut in self._slots.pop(slot, ()):
            if not fut.done():
                fut.set_result(None)

    async def _send(self, conn: _Conn, data: bytes) -> bool:
        if conn.closed or conn.self_closed:
            return False
        writer = conn.writer
        writer.write(data)
        if writer.transport.get_write_buffer_size():  # the socket took less than all of it
            try:
                await writer.drain()
            except (ConnectionError, OSError):
                self._mark_closed(conn)
                return False
        return not conn.closed

    async def _drop(self, conn: _Conn, reset: bool) -> None:
        conn.self_closed = True
        if reset:
            sock = conn.writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            conn.writer.transport.abort()
        else:
            conn.writer.close()

    async def _send_json(
        self,
        conn: _Conn,
        rec: UpstreamRequest | None,
        code: int,
        obj: object,
        keep_alive: bool,
        *,
        gzip: bool = False,
        drop: bool | None = None,
    ) -> bool:
        """Send a JSON response; ``drop`` = send half the body and close (True = RST)."""
        payload = _dumps(obj).encode()
        headers = [("Content-Type", "application/json")]
        if gzip:
            comp = zlib.compressobj(6, zlib.DEFLATED, 31)
            payload = comp.compress(payload) + comp.flush()
            headers.append(("Content-Encoding", "gzip"))
        headers.append(("Content-Length", str(len(payload))))
        data = _head(code, headers, keep_alive)
        data += payload if drop is None else payload[: len(payload) // 2]
        if rec is not None:
            rec.status = code
        ok = await self._send(conn, data)
        if ok and rec is not None:
            rec.headers_sent_at = time.monotonic()
        if drop is not None:
            await self._drop(conn, drop)
            return False
        return ok and keep_alive

    async def _control(
        self, conn: _Conn, method: str, path: str, raw: bytes, keep_alive: bool
    ) -> bool:
        obj: object
        code = 200
        if path == "/_fake/requests" and method == "GET":
            obj = [dataclasses.asdict(rec) for rec in self.requests]
        elif path == "/_fake/reset" and method == "POST":
            self.reset()
            obj = {"status": "ok"}
        elif path == "/_fake/defaults" and method in ("GET", "POST"):
            if method == "POST":
                try:
                    update = json.loads(raw or b"{}")
                except ValueError:
                    update = None
                if not isinstance(update, dict):
                    return await self._send_json(
                        conn, None, 400, _error("expected a JSON object", 400), keep_alive
                    )
                self.defaults.update({str(k): str(v) for k, v in update.items()})
            obj = dict(self.defaults)
        else:
            code, obj = 404, _error(f"no such control endpoint: {method} {path}", 404)
        return await self._send_json(conn, None, code, obj, keep_alive)

    async def _dispatch(
        self,
        conn: _Conn,
        rec: UpstreamRequest,
        method: str,
        path: str,
        body: Any,
        keep_alive: bool,
    ) -> bool:
        if path in _CHAT_PATHS and method == "POST":
            return await self._chat(conn, rec, body, keep_alive)
        if path in _MODEL_PATHS and method == "GET":
            models = {
                "object": "list",
                "data": [{"id": "fake", "object": "model", "created": 0, "owned_by": "fake"}],
            }
            return await self._send_json(conn, rec, 200, models, keep_alive)
        if path == "/health" and method == "GET":
            return await self._send_json(conn, rec, 200, {"status": "ok"}, keep_alive)
        err = _error(f"no route for {method} {path}", 404, "invalid_request_error")
        return await self._send_json(conn, rec, 404, err, keep_alive)

    async def _chat(self, conn: _Conn, rec: UpstreamRequest, body: Any, keep_alive: bool) -> bool:
        if not isinstance(body, dict):
            err = _error("request body must be a JSON object", 400, "invalid_request_error")
            return await self._send_json(conn, rec, 400, err, keep_alive)
        model_name = body.get("model")
        base, _, query = (model_name if isinstance(model_name, str) else "fake").partition("?")
        model = base or "fake"
        rec.model = model
        rec.stream = body.get("stream") is True
        try:
            opts, rec.options = _resolve_options(dict(self.defaults), query)
        except ValueError as exc:
            err = _error(str(exc), 400, "invalid_request_error")
            return await self._send_json(conn, rec, 400, err, keep_alive)

        if opts.mode == "hang":
            await self._pause(conn, math.inf)
            return False
        if opts.mode == "status":
            if not await self._pause(conn, opts.prefill):
                return False
            err = _error("fake upstream failure", opts.status)
            return await self._send_json(conn, rec, opts.status, err, keep_alive)

        pieces = _pieces(opts)
        finish = "stop"
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        if isinstance(limit, int) and not isinstance(limit, bool) and 0 <= limit < len(pieces):
            pieces = pieces[:limit]
            finish = "length"
        prompt = _prompt_tokens(body)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": len(pieces),
            "total_tokens": prompt + len(pieces),
        }
        ident = f"chatcmpl-fake-{rec.index}"
        created = int(time.time()) if opts.created is None else opts.created
        if not rec.stream:
            delay = opts.prefill + opts.interval * max(len(pieces) - 1, 0)
            if not await self._pause(conn, delay):
                return False
            obj = {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(pieces)},
                        "finish_reason": finish,
                    }
                ],
                "usage": usage,
            }
            drop = opts.reset if opts.mode == "drop" else None
            keep_alive = await self._send_json(
                conn, rec, 200, obj, keep_alive, gzip=opts.gzip, drop=drop
            )
            if keep_alive:
                rec.chunks_sent = len(pieces)
            return keep_alive

        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        return await self._stream(
            conn,
            rec,
            opts,
            pieces,
            finish,
            usage if include_usage else None,
            keep_alive,
            ident=ident,
            created=created,
            model=model,
        )

    async def _emit(self, conn: _Conn, rec: UpstreamRequest, wire: _Wire, sse: bytes) -> bool:
        if wire.simple and not wire.pending:
            return await self._send(conn, b"%x\r\n%s\r\n" % (len(sse), sse))
        for number, frame in enumerate(wire.frames(sse)):
            if number and not await self._pause(conn, 0.001):
                return False
            head = wire.pending
            if head:
                wire.pending = b""
                if not await self._send(conn, head + frame):
                    return False
                rec.headers_sent_at = time.monotonic()
            elif not await self._send(conn, frame):
                return False
        return True

    async def _stream(
        self,
        conn: _Conn,
        rec: UpstreamRequest,
        opts: _Options,
        pieces: list[str],
        finish: str,
        usage: dict[str, int] | None,
        keep_alive: bool,
        *,
        ident: str,
        created: int,
        model: str,
    ) -> bool:
        head = _STREAM_HEADS[(opts.gzip, keep_alive)]
        rec.status = 200
        wire = _Wire(opts, b"" if opts.headers_first else head)
        if opts.headers_first:
            if not await self._send(conn, head):
                return False
            rec.headers_sent_at = time.monotonic()
        if not await self._pause(conn, opts.prefill):
            return False

        prefix = (
            f'{{"id":{_dumps(ident)},"object":"chat.completion.chunk","created":{created},'
            f'"model":{_dumps(model)},"choices":'
        )
        first_prefix = prefix + '[{"index":0,"delta":{"role":"assistant","content":'
        next_prefix = prefix + '[{"index":0,"delta":{"content":'
        suffix = '},"finish_reason":null}]}'
        fault = opts.mode if opts.mode in ("drop", "malformed", "error_object") else None
        fault_at = min(opts.after, len(pieces))

        for i in range(len(pieces) + 1):
            if fault is not None and i == fault_at:
                if fault == "drop":
                    if wire.pending and await self._send(conn, wire.pending):
                        rec.headers_sent_at = time.monotonic()
                    await self._drop(conn, opts.reset)
                    return False
                if fault == "malformed":
                    if not await self._emit(conn, rec, wire, wire.event(_MALFORMED, pretty=False)):
                        return False
                else:  # error_object: the error event, then [DONE] and a clean end
                    if not await self._emit(conn, rec, wire, wire.event(_ERROR_OBJECT)):
                        return False
                    return await self._finish(conn, rec, wire, opts, keep_alive)
            if i == len(pieces):
                break
            if i and not await self._pause(conn, opts.interval):
                return False
            payload = (first_prefix if i == 0 else next_prefix) + _dumps(pieces[i]) + suffix
            if not await self._emit(conn, rec, wire, wire.event(payload)):
                return False
            rec.chunks_sent += 1

        delta = '{"role":"assistant"}' if not pieces else "{}"
        final = prefix + f'[{{"index":0,"delta":{delta},"finish_reason":{_dumps(finish)}}}]}}'
        if not await self._emit(conn, rec, wire, wire.event(final)):
            return False
        if usage is not None:
            usage_event = prefix + f'[],"usage":{_dumps(usage)}}}'
            if not await self._emit(conn, rec, wire, wire.event(usage_event)):
                return False
        return await self._finish(conn, rec, wire, opts, keep_alive)

    async def _finish(
        self, conn: _Conn, rec: UpstreamRequest, wire: _Wire, opts: _Options, keep_alive: bool
    ) -> bool:
        """Send ``data: [DONE]`` and the terminating chunk (or misbehave per ``after_done``)."""
        if not await self._emit(conn, rec, wire, wire.event("[DONE]", pretty=False)):
            return False
        rec.done_sent = True
        if opts.after_done == "hang":
            await self._pause(conn, math.inf)
            return False
        if opts.after_done == "reset":
            await self._drop(conn, True)
            return False
        return await self._send(conn, wire.end()) and keep_alive


def _error(message: str, code: int, kind: str = "server_error") -> dict[str, object]:
    return {"error": {"message": message, "type": kind, "code": code}}


def _raise_nofile_limit() -> None:
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fake OpenAI-compatible upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--default",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="server-wide default option (repeatable), e.g. --default interval=0.05",
    )
    args = parser.parse_args(argv)
    defaults: dict[str, str | int | float] = {}
    for item in args.default:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--default expects KEY=VALUE, got {item!r}")
        defaults[key] = value
    try:
        _resolve_options(defaults, "")
    except ValueError as exc:
        parser.error(str(exc))
    _raise_nofile_limit()
    fake = FakeUpstream(args.port, host=args.host, defaults=defaults)

    def ready(url: str) -> None:
        print(f"READY {url}", flush=True)

    asyncio.run(fake.serve(ready, handle_signals=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
