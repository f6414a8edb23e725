"""The llhttp transport (stageserver/transport.py) over real loopback sockets.

What it could get wrong that httpcore and h11 had right: odd wire shapes are served by
``RawServer``, a small threaded server that answers each request with given bytes; the
openai-shaped streams come from the fake upstream. Every case runs twice: reading
through gevent's hub (``cooperative``, as a gunicorn worker does, here in a process that
gevent did not patch) and through blocking sockets (threads, as ``flask run`` does).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2
import openai
import pytest
import requests

from stageserver.config import ConfigError, apply_defaults, upstream_configs
from stageserver.upstream.transport.httptools import HttpToolsTransport
from stageserver.upstream.transport.sharded import ShardedTransport
from testing.fake_upstream import FakeUpstream
from testing.servers import Gunicorn
from testing.sse import parse_events, terminal

Respond = Callable[[socket.socket, int], bool]


class RawServer:
    """Reads HTTP/1.1 requests on loopback and has ``respond(sock, number)`` answer each
    (``number`` counts requests over all connections); it returns whether to keep the
    connection open. Counts connections accepted and connections the client closed."""

    def __init__(self, respond: Respond) -> None:
        self.respond = respond
        self.heads: list[bytes] = []
        self.accepted = 0
        self.client_closed = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._stopped = False
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def stop(self) -> None:
        self._stopped = True
        for thread in self._threads:
            thread.join(5)
        self._listener.close()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(0.05)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with sock:
            buffer = b""
            while not self._stopped:
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                except ConnectionError:
                    data = b""
                if not data:
                    self.client_closed += 1
                    return
                buffer += data
                head, sep, rest = buffer.partition(b"\r\n\r\n")
                if not sep:
                    continue
                length = next(
                    (int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                     if line.startswith(b"content-length:")),
                    0,
                )  # fmt: skip
                if len(rest) < length:
                    continue
                buffer = rest[length:]
                self.heads.append(head)
                if not self.respond(sock, len(self.heads) - 1):
                    return


def replies(*wires: bytes, per_byte: bool = False) -> Respond:
    """Answer request n with ``wires[n]`` (the last one again after that)."""

    def respond(sock: socket.socket, number: int) -> bool:
        wire = wires[min(number, len(wires) - 1)]
        if per_byte:
            for i in range(len(wire)):
                sock.sendall(wire[i : i + 1])
                time.sleep(0.0005)
        else:
            sock.sendall(wire)
        return True

    return respond


@pytest.fixture
def serve() -> Iterator[Callable[[Respond], RawServer]]:
    servers: list[RawServer] = []

    def start(respond: Respond) -> RawServer:
        servers.append(RawServer(respond))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(params=[True, False], ids=["gevent", "threads"])
def cooperative(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def http_client(cooperative: bool) -> Iterator[httpx2.Client]:
    # No read timeout, as under gevent in a worker: reads then go through the hub's watcher.
    transport = HttpToolsTransport(10, cooperative=cooperative)
    with httpx2.Client(transport=transport, timeout=httpx2.Timeout(5, read=None)) as http_client:
        yield http_client


def pool_idle(client: httpx2.Client) -> int:
    transport = client._transport
    assert isinstance(transport, HttpToolsTransport)
    return transport.pool.idle_count()


def sleep(seconds: float, cooperative: bool) -> None:
    """Let time pass; under gevent, let the hub run meanwhile (the reaper is a timer)."""
    if cooperative:
        import gevent

        gevent.sleep(seconds)
    else:
        time.sleep(seconds)


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
EVENTS = [b"data: h\xc3\xa9llo\r\n\r\n", b"data: [DONE]\n\n\r\n"]
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n"
    + b"".join(b"%x\r\n%s\r\n" % (len(event), event) for event in EVENTS)
    + b"0\r\n\r\n"
)


def test_chunked_framing_split_at_every_byte(
    serve: Callable[[Respond], RawServer], http_client: httpx2.Client
) -> None:
    server = serve(replies(CHUNKED, per_byte=True))
    for _ in range(2):
        with http_client.stream("GET", server.url) as response:
            assert response.headers["content-type"] == "text/event-stream"
            assert b"".join(response.iter_raw()) == b"".join(EVENTS)
    assert server.accepted == 1  # read to its end: the connection was reused


@pytest.mark.parametrize(
    "wire",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'5;name=value\r\nhello\r\n6;x="a;b"\r\n world\r\n0;last\r\n\r\n',
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: 42\r\nX-Other: 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world",
    ],
    ids=["chunk-extensions", "trailers", "content-length", "interim-1xx"],
)
def test_framings_give_the_body_and_keep_the_connection(
    serve: Callable[[Respond], RawServer], http_client: httpx2.Client, wire: bytes
) -> None:
    server = serve(replies(wire))
    for _ in range(3):
        response = http_client.get(server.url)
        assert (response.status_code, response.content) == (200, b"hello world")
        assert "x-checksum" not in response.headers and "link" not in response.headers
    assert server.accepted == 1
    assert pool_idle(http_client) == 1


def test_no_body_statuses_and_head(
    serve: Callable[[Respond], RawServer], http_client: httpx2.Client
) -> None:
    server = serve(
        replies(
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",  # to the HEAD
        )
    )
    assert http_client.get(server.url).status_code == 204
    response = http_client.get(server.url)
    assert (response.status_code, response.content) == (304, b"")
    assert server.accepted == 1
    response = http_client.head(server.url)
    assert (response.status_code, response.headers["content-length"]) == (200, "5")
    assert response.content == b""
    assert server.wait_for(lambda: server.client_closed == 1)  # a HEAD's connection closes
    assert pool_idle(http_client) == 0


def test_a_body_that_ends_at_close(
    serve: Callable[[Respond], RawServer], http_client: httpx2.Client
) -> None:
    def respond(sock: socket.socket, number: int) -> bool:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello ")
        time.sleep(0.05)
        sock.sendall(b"world")
        return False

    server = serve(respond)
    assert http_client.get(server.url).content == b"hello world"
    assert http_client.get(server.url).content == b"hello world"
    assert (server.accepted, pool_idle(http_client)) == (2, 0)


@pytest.mark.parametrize(
    "wire",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    ],
    ids=["connection-close", "http-1.0"],
)
def test_upstream_that_closes_after_the_response(
    serve: Callable[[Respond], RawServer], http_client: httpx2.Client, wire: bytes
) -> None:
    server = serve(replies(wire))
    assert http_client.get(server.url).content == b"hello"
    assert server.wait_for(lambda: server.client_closed == 1)  # we closed our end
    assert http_client.get(server.url).content == b"hello"
    assert (server.accepted, pool_idle(http_client)) == (2, 0)


def test_idle_connection_closed_by_the_upstream_is_not_reused(
    serve: Callable[[Respond], RawServer], http_client: httpx2.Client
) -> None:
    closed = threading.Event()

    def respond(sock: socket.socket, number: int) -> bool:
        sock.sendall(OK)
        closed.set()
        return False  # closes without saying so first

    server = serve(respond)
    assert http_client.get(server.url).content == b"ok"
    assert closed.wait(5) and pool_idle(http_client) == 1
    time.sleep(0.05)  # the FIN reaches our idle socket
    assert http_client.get(server.url).content == b"ok"
    assert server.accepted == 2
    assert len(server.heads) == 2  # found dead before use: no request was lost on it


def test_junk_after_a_response_is_not_reused(
    serve: Callable[[Respond], RawServer], http_client: httpx2.Client
) -> None:
    server = serve(replies(OK + b"HTTP/1.1 200 OK\r\n", OK))
    assert http_client.get(server.url).content == b"ok"
    assert http_client.get(server.url).content == b"ok"
    assert server.accepted == 2


def test_reused_connection_reset_as_the_request_is_sent_is_retried_once(
    serve: Callable[[Respond], RawServer], http_client: httpx2.Client
) -> None:
    def respond(sock: socket.socket, number: int) -> bool:
        if number == 1:  # the second request, on the reused connection: reset, no answer
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            return False
        sock.sendall(OK)
        return True

    server = serve(respond)
    assert http_client.get(server.url).content == b"ok"
    assert http_client.get(server.url).content == b"ok"
    assert (server.accepted, len(server.heads)) == (2, 3)


def test_no_retry_once_response_bytes_arrived(
    serve: Callable[[Respond], RawServer], http_client: httpx2.Client
) -> None:
    def respond(sock: socket.socket, number: int) -> bool:
        sock.sendall(OK if number == 0 else b"HTTP/1.1 200 OK\r\nContent-Le")
        return number == 0

    server = serve(respond)
    assert http_client.get(server.url).content == b"ok"
    with pytest.raises(httpx2.RemoteProtocolError):
        http_client.get(server.url)
    assert (server.accepted, len(server.heads)) == (1, 2)


def test_a_new_connection_that_fails_is_not_retried(
    serve: Callable[[Respond], RawServer], http_client: httpx2.Client
) -> None:
    server = serve(lambda sock, number: False)
    with pytest.raises(httpx2.RemoteProtocolError, match="without sending a response"):
        http_client.get(server.url)
    assert server.accepted == 1


def test_truncated_body_is_an_error_and_not_reused(
    serve: Callable[[Respond], RawServer], http_client: httpx2.Client
) -> None:
    def respond(sock: socket.socket, number: int) -> bool:
        sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        return False

    server = serve(respond)
    with http_client.stream("GET", server.url) as response:
        with pytest.raises(httpx2.RemoteProtocolError, match="complete message body"):
            for _ in response.iter_raw():
                pass
    assert pool_idle(http_client) == 0


def test_response_closed_early_closes_the_upstream_connection(
    upstream: FakeUpstream, cooperative: bool
) -> None:
    transport = HttpToolsTransport(10, cooperative=cooperative)
    with openai.OpenAI(
        base_url=upstream.url,
        api_key="-",
        max_retries=0,
        http_client=httpx2.Client(transport=transport),
    ) as client:
        body = {"model": "fake?chunks=200&interval=0.02", "messages": [], "stream": True}
        response = client.post("/chat/completions", body=body, cast_to=httpx2.Response, stream=True)
        assert next(response.iter_raw()).startswith(b"data: ")
        response.close()
        assert upstream.wait_for(lambda: upstream.requests[0].client_closed_at is not None)
        assert not upstream.requests[0].done_sent
        assert transport.pool.idle_count() == 0


def test_interrupted_read_closes_the_connection(
    serve: Callable[[Respond], RawServer],
) -> None:
    import gevent

    def respond(sock: socket.socket, number: int) -> bool:
        sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        return True  # and nothing more, until the client goes

    server = serve(respond)
    with httpx2.Client(transport=HttpToolsTransport(10, cooperative=True)) as client:
        with client.stream("GET", server.url) as response:
            reads = response.iter_raw()
            assert next(reads) == b"hello"
            with pytest.raises(gevent.Timeout), gevent.Timeout(0.1):
                next(reads)
        assert server.wait_for(lambda: server.client_closed == 1)
        assert pool_idle(client) == 0


def test_read_timeout_is_honoured_when_set(
    serve: Callable[[Respond], RawServer], http_client: httpx2.Client
) -> None:
    server = serve(lambda sock, number: True)  # never answers
    with pytest.raises(httpx2.ReadTimeout):
        http_client.get(server.url, timeout=httpx2.Timeout(5, read=0.1))
    assert server.wait_for(lambda: server.client_closed == 1)


def test_connect_failure_and_https(http_client: httpx2.Client) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(httpx2.ConnectError):
        http_client.get(f"http://127.0.0.1:{port}/")
    with pytest.raises(httpx2.UnsupportedProtocol):
        http_client.get(f"https://127.0.0.1:{port}/")


def test_gzip_body_is_decoded_by_iter_bytes(
    upstream: FakeUpstream, http_client: httpx2.Client
) -> None:
    body = json.dumps({"model": "fake?chunks=3&gzip=1&created=7", "messages": [], "stream": True})
    request = http_client.build_request(
        "POST", f"{upstream.url}/chat/completions", content=body,
        headers={"Accept-Encoding": "identity"},
    )  # fmt: skip
    response = http_client.send(request, stream=True)
    assert response.headers["content-encoding"] == "gzip"
    decoded = zlib.decompress(b"".join(response.iter_raw()), 31)  # closes it at the end
    response = http_client.send(request, stream=True)
    second = b"".join(response.iter_bytes())
    assert second == decoded.replace(
        b"fake-%d" % upstream.requests[0].index, b"fake-%d" % upstream.requests[1].index
    )
    assert second.endswith(b"data: [DONE]\n\n") and b'"content":"tok2 "' in second


def test_idle_connections_expire_without_new_requests(
    serve: Callable[[Respond], RawServer], cooperative: bool
) -> None:
    server = serve(replies(OK))
    transport = HttpToolsTransport(10, keepalive_expiry=0.5, cooperative=cooperative)
    with httpx2.Client(transport=transport) as client:
        request = client.build_request("GET", server.url)
        responses = [client.send(request, stream=True) for _ in range(3)]  # 3 connections
        for response in responses:
            response.read()
            response.close()
        assert (server.accepted, transport.pool.idle_count()) == (3, 3)
        sleep(2.0, cooperative)  # past the expiry and a sweep of the reaper
        assert transport.pool.idle_count() == 0
        assert server.wait_for(lambda: server.client_closed == 3)


def test_httpx_fallback_pools_expire_without_new_requests(
    serve: Callable[[Respond], RawServer],
) -> None:
    server = serve(replies(OK))
    with httpx2.Client(transport=ShardedTransport(10)) as client:
        assert client.get(server.url).content == b"ok"
        # Its keep-alive expiry is 4 s; the reaper sweeps each second.
        assert server.wait_for(lambda: server.client_closed == 1, timeout=7)


def test_transport_setting_is_checked() -> None:
    config: dict[str, object] = {
        "STAGESERVER_UPSTREAM_URL": "http://127.0.0.1:1/v1",
        "STAGESERVER_UPSTREAM_TRANSPORT": "h11",
    }
    apply_defaults(config, {})
    with pytest.raises(ConfigError, match="STAGESERVER_UPSTREAM_TRANSPORT must be"):
        upstream_configs(config)


def _worker_descriptors(master: int) -> int:
    [worker] = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return len(os.listdir(f"/proc/{worker}/fd"))


@pytest.mark.processes
@pytest.mark.parametrize("transport", ["httptools", "httpx"])
def test_a_worker_relays_and_lets_idle_upstream_connections_go(
    upstream: FakeUpstream, transport: str
) -> None:
    """Both settings relay a stream; after a burst, the worker's descriptors come back
    down without another request (issue "Nothing hangs", item 4)."""
    gunicorn = Gunicorn(
        {"STAGESERVER_UPSTREAM_URL": upstream.url, "STAGESERVER_UPSTREAM_TRANSPORT": transport}
    )
    try:
        url = f"{gunicorn.url}/chat"
        body: dict[str, str | bool] = {
            "model_name": "fake?chunks=20&interval=0.02",
            "user_prompt": "hi",
            "stream": True,
        }
        requests.post(url, json=body | {"stage_id": "warm"}, timeout=30)
        before = _worker_descriptors(gunicorn.proc.pid)
        burst = [
            threading.Thread(
                target=requests.post, args=(url,),
                kwargs={"json": body | {"stage_id": f"b{n}"}, "timeout": 30},
            )
            for n in range(20)
        ]  # fmt: skip
        for thread in burst:
            thread.start()
        for thread in burst:
            thread.join()
        assert _worker_descriptors(gunicorn.proc.pid) >= before + 15  # pooled, idle
        response = requests.post(url, json=body | {"stage_id": "last"}, timeout=30)
        assert terminal(parse_events(response.content))[0]["data"]["stage_id"] == "last"
        time.sleep(6)
        assert _worker_descriptors(gunicorn.proc.pid) <= before
    finally:
        gunicorn.stop()
    assert "Traceback" not in gunicorn.log(), gunicorn.log()
