"""An HTTP/1.1 server on one asyncio event loop, the ground floor of the fake upstream.

It accepts connections, serves requests on each in turn (HTTP/1.1 keep-alive), keeps a
record of each request it hands on, and lets a handler write each answer; reading a
request, noticing a client's close and writing are the connection's (``connection.py``).
It knows nothing of what it serves.

One event loop serves every connection (no thread per connection), so it holds thousands
of slow streams. Control endpoints, never recorded nor handed to the handler:
``GET /_fake/requests`` (the records as JSON), ``POST /_fake/reset`` (forget them),
``GET|POST /_fake/defaults`` (read, or merge a JSON object into, the server-wide defaults)
and ``GET /_fake/connections`` (``{"open", "opened"}``: the client connections open now,
the asking one not counted, and opened since the last reset).

The seam is one call per recorded request::

    async def handler(request: UpstreamRequest, response: ResponseWriter,
                      defaults: Mapping[str, object]) -> bool

``request`` is what arrived (method, target, headers, the body parsed as JSON, or None),
which the handler may annotate (``model``, ``chunks_sent``, ``done_sent``, ...);
``response`` writes the answer; ``defaults`` are the server-wide options. The handler
returns whether the connection may serve another request.

It runs on an event loop in a daemon thread (``start``/``stop``, or ``with``), or as a
process's whole life (``serve``, stopped by SIGTERM or SIGINT).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Self

from .connection import (
    BadRequest,
    Connection,
    PauseSlots,
    Request,
    ResponseWriter,
    UpstreamRequest,
    error_body,
)

__all__ = ["Handler", "HttpServer"]

Handler = Callable[[UpstreamRequest, ResponseWriter, Mapping[str, object]], Awaitable[bool]]


class HttpServer:
    """The server; ``handler`` answers every request but the control endpoints."""

    def __init__(
        self,
        handler: Handler,
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        defaults: Mapping[str, str | int | float] | None = None,
    ) -> None:
        self.defaults: dict[str, str | int | float] = dict(defaults or {})
        self.connections_opened = 0
        self._handler = handler
        self._host = host
        self._requested_port = port
        self._port: int | None = None
        self._records: list[UpstreamRequest] = []
        self._next_index = 0
        self._next_conn_id = 0
        self._conns: set[Connection] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._slots = PauseSlots()
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_errors: list[BaseException] = []

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{type(self).__name__} is not running")
        return self._port

    @property
    def base(self) -> str:
        host = "127.0.0.1" if self._host in ("", "0.0.0.0", "::") else self._host
        return f"http://{host}:{self.port}"

    @property
    def requests(self) -> list[UpstreamRequest]:
        return list(self._records)

    @property
    def open_connections(self) -> int:
        """Client connections open now: a relay's pooled ones as well as those answering."""
        return len(self._conns)

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

    # -- in a thread, or as the whole process ---------------------------------------------

    def start(self) -> Self:
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
            raise RuntimeError(f"{type(self).__name__} failed to start") from self._start_errors[0]
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

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def serve(
        self, ready: Callable[[], None] | None = None, *, handle_signals: bool = False
    ) -> None:
        """Listen, call ``ready()``, and serve until stopped (or SIGTERM/SIGINT)."""
        self._stop_event = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(
            self._on_connect, self._host, self._requested_port, backlog=4096
        )
        self._port = int(self._server.sockets[0].getsockname()[1])
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, self._stop_event.set)
        try:
            if ready is not None:
                ready()
            await self._stop_event.wait()
        finally:
            await self._close()

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self.serve(self._started.set))
        except BaseException as exc:  # reported to start()
            self._start_errors.append(exc)
        finally:
            self._started.set()
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _close(self) -> None:
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

    # -- connections ------------------------------------------------------------------------

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._next_conn_id += 1
        self.connections_opened += 1
        conn = Connection(self._next_conn_id, reader, writer)
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

    async def _serve_connection(self, conn: Connection) -> None:
        while not conn.closed and not conn.self_closed:
            try:
                req = await conn.read_request()
            except BadRequest as exc:
                refusal = ResponseWriter(conn, self._slots, None, False)
                await refusal.send_json(400, error_body(str(exc), 400))
                return
            if req is None:
                return
            keep_alive = req.version == "HTTP/1.1" and (
                "close" not in req.headers.get("connection", "").lower()
            )
            path = req.target.split("?", 1)[0]
            if path.startswith("/_fake/"):
                control = ResponseWriter(conn, self._slots, None, keep_alive)
                if not await self._control(control, req.method, path, req.body, conn):
                    return
                continue
            if not await self._answer(conn, req, keep_alive):
                return

    async def _answer(self, conn: Connection, req: Request, keep_alive: bool) -> bool:
        """Record the request and let the handler answer it, watching for a client close."""
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
        watcher = asyncio.get_running_loop().create_task(conn.watch())
        try:
            response = ResponseWriter(conn, self._slots, rec, keep_alive)
            return await self._handler(rec, response, self.defaults)
        finally:
            rec.finished_at = time.monotonic()
            conn.record = None
            if not watcher.done():
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher

    async def _control(
        self, response: ResponseWriter, method: str, path: str, raw: bytes, conn: Connection
    ) -> bool:
        obj: object
        code = 200
        if path == "/_fake/requests" and method == "GET":
            obj = [dataclasses.asdict(rec) for rec in self.requests]
        elif path == "/_fake/connections" and method == "GET":
            others = len(self._conns - {conn})
            obj = {"open": others, "opened": self.connections_opened}
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
                    return await response.send_json(400, error_body("expected a JSON object", 400))
                self.defaults.update({str(k): str(v) for k, v in update.items()})
            obj = dict(self.defaults)
        else:
            code, obj = 404, error_body(f"no such control endpoint: {method} {path}", 404)
        return await response.send_json(code, obj)
