"""The load generator: N concurrent SSE streams from one asyncio process.

It must cost far less than what it measures, on the same two cores: each connection is
an ``asyncio.Protocol`` that decodes HTTP chunking and counts events with ``bytes.count``
on whole events; nothing is parsed as JSON. Its own CPU time is reported.

Each of N clients keeps one keep-alive connection and runs streams back to back (with
``--new-connections``, each stream on a connection of its own, closed at its end: what a
client that does not keep its connection alive costs, the parsing of a new connection's
first request included). The clients start spread evenly over one stream's length, so
that streams begin and end at all times rather than in lock-step, and the measured
window opens once all N run:

- time to first token: from writing the request to reading the first chunk event, for
  every stream that starts in the window;
- chunks: chunk events read in the window;
- connections: those opened to the target after the warm-up stream, for every stream
  (not only the window's): N with kept-alive connections, one per stream without;
- CPU: the target's process tree (master and workers), the fake upstream and this
  process, over the window;
- memory: the target's resident set at the moment all N streams are open and none has
  ended yet (the first round), minus its resident set when idle (after one stream,
  before the load), per open stream; finished stages kept for replay are not in it;
- the shared store (``--redis PORT:PID``, once per node): the commands every node ran
  over the window (the difference of two ``INFO commandstats``, the calls of every
  ``cmdstat_*`` line, Lua's own included) and its redis-server processes' CPU;
- the relay→durable delay (``--metrics``): the histogram
  ``stageserver_store_write_delay_seconds`` of the target's ``/metrics``, read at the
  window's start and end; its p50 and p99 are the upper bounds of the buckets they fall
  in (``inf``: beyond the largest finite one), None when the server has no such
  histogram or observed nothing;
- followers (``--follow-port``): each stream's stage followed through ``GET
  /stages/<id>/events`` on another host of the same store, opened at the stream's first
  chunk; their events are counted apart, never as relayed chunks.

Run as ``python -m bench.load --port P --target stageserver ...``; prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import procs

_MARKERS = {
    # target kind -> (one chunk, the normal end, abnormal ends)
    "stageserver": (
        b"event: chat_completion_chunk\n",
        b"event: done\n",
        (b"event: error\n", b"event: cancel\n"),
    ),
    "openai": (b"data: {", b"data: [DONE]", ()),
    "responses": (
        b"event: response.output_text.delta\n",
        b"event: response.completed\n",
        (b"event: response.failed\n", b"event: response.cancelled\n"),
    ),
    "messages": (b"event: content_block_delta\n", b"event: message_stop\n", (b"event: error\n",)),
}


def api_of(target: str, path: str) -> str:
    """Which API a target is streamed through: the seed's, Chat Completions', Responses',
    the Messages API's."""
    if path == "/v1/responses":
        return "responses"
    if path == "/v1/messages":
        return "messages"
    return "stageserver" if path == "/chat" else "openai"


@dataclass
class Shape:
    """What each stream asks of the fake upstream."""

    chunks: int
    interval: float
    prefill: float

    @property
    def model(self) -> str:
        return f"fake?chunks={self.chunks}&interval={self.interval:g}&prefill={self.prefill:g}"

    @property
    def seconds(self) -> float:
        return self.prefill + self.interval * max(self.chunks - 1, 0)

    @property
    def events(self) -> int:
        # Content chunks, the finish_reason chunk, the usage chunk (stream_options).
        return self.chunks + 2


@dataclass
class LoadSpec:
    """What a load generator is asked to do; ``argv`` is its command line (``bench.run``
    starts ``bench.load`` and ``bench.burst`` in processes of their own), which
    ``parse_spec`` reads back."""

    port: int
    target: str  # its name in bench.run: stageserver, direct, nginx, and variants
    path: str  # the API streamed: /chat, /v1/chat/completions, /v1/responses
    shape: Shape
    concurrency: int  # streams open at once; a burst's size
    duration: float = 10.0  # the measured window, in seconds (not a burst's)
    server_pid: int | None = None  # the target's master process: its CPU and memory
    upstream_pid: int | None = None
    profile: str | None = None  # py-spy the server over the window, to this file
    api_key: str | None = None
    redis: list[tuple[int, int]] = field(default_factory=list)  # the store's (port, pid)s
    metrics: bool = False  # read the relay→durable delay from the server's /metrics
    follow_port: int | None = None  # follow every stage on this host too
    follow_pid: int | None = None
    new_connections: bool = False  # each stream on a connection of its own

    def argv(self) -> list[str]:
        args = [
            "--port", str(self.port),
            "--target", self.target,
            "--path", self.path,
            "--concurrency", str(self.concurrency),
            "--chunks", str(self.shape.chunks),
            "--interval", repr(self.shape.interval),
            "--prefill", repr(self.shape.prefill),
            "--duration", repr(self.duration),
        ]  # fmt: skip
        optional = {
            "--server-pid": self.server_pid,
            "--upstream-pid": self.upstream_pid,
            "--profile": self.profile,
            "--api-key": self.api_key,
            "--follow-port": self.follow_port,
            "--follow-pid": self.follow_pid,
        }
        for flag, value in optional.items():
            if value is not None:
                args += [flag, str(value)]
        for port, pid in self.redis:
            args += ["--redis", f"{port}:{pid}"]
        if self.metrics:
            args.append("--metrics")
        if self.new_connections:
            args.append("--new-connections")
        return args


@dataclass
class Result:
    target: str
    concurrency: int
    chunks_per_stream: int
    interval: float
    prefill: float
    window_seconds: float = 0.0
    streams: int = 0
    streams_measured: int = 0
    connections: int = 0  # opened to the target, after the warm-up stream
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    chunks: int = 0
    chunks_per_second: float = 0.0
    server_cpu_seconds: float | None = None
    server_cpu_us_per_chunk: float | None = None
    upstream_cpu_us_per_chunk: float | None = None
    loadgen_cpu_us_per_chunk: float | None = None
    other_cpu_cores: float | None = None
    rss_idle_kb: int | None = None
    rss_open_kb: int | None = None
    rss_peak_kb: int | None = None
    memory_per_stream_kb: float | None = None
    redis_commands: int | None = None
    redis_commands_by_name: dict[str, int] | None = None
    redis_commands_per_chunk: float | None = None
    redis_cpu_us_per_chunk: float | None = None
    durable_writes: int | None = None
    durable_p50_ms: float | None = None
    durable_p99_ms: float | None = None
    follow_streams: int = 0
    follow_errors: int = 0
    follow_chunks: int = 0
    follow_server_cpu_us_per_chunk: float | None = None


@dataclass
class _Snapshot:
    """What the window's start and end each read."""

    server: float | None  # CPU seconds of the target's process tree
    upstream: float | None
    own: float
    busy: float  # the whole machine's
    redis: float | None  # CPU seconds of every redis-server of the store
    follow_server: float | None  # the following host's tree
    redis_calls: dict[str, int] | None  # commands run, by name, summed over the store's nodes
    durable: dict[float, float] | None  # the delay histogram: upper bound -> cumulative count


class _Chunked(asyncio.Protocol):
    """An HTTP/1.1 response read as it comes: its head, then its chunked body, piece by
    piece (``_body``), to its last chunk (``_end``)."""

    def __init__(self, gen: LoadGenerator) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.events = b""
        self.in_head = True
        self.in_flight = False
        self.close_after = False
        self.count = 0
        self.ended = b""
        self.failed = False
        self.closed = gen.loop.create_future()

    def itself(self) -> _Chunked:
        """The protocol factory for this one connection."""
        return self

    def _complete(self, piece: bytes) -> bytes | None:
        """The whole events read so far, once ``piece`` ends one; the rest is kept."""
        events = self.events + piece if self.events else piece
        end = events.rfind(b"\n\n")
        if end < 0:
            self.events = events
            return None
        self.events = events[end + 2 :]
        return events[: end + 2] if self.events else events

    def _ending(self, complete: bytes) -> None:
        gen = self.gen
        if gen.done_marker in complete:
            self.ended = gen.done_marker
        else:
            for marker in gen.fail_markers:
                if marker in complete:
                    self.ended = marker

    def _body(self, piece: bytes, now: float) -> None:
        raise NotImplementedError

    def _end(self, now: float) -> None:
        raise NotImplementedError

    def _fail(self, why: str) -> None:
        raise NotImplementedError

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        buf = self.buf
        buf += data
        if self.in_head:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            del buf[: end + 4]
            self.in_head = False
            status = head[9:12]
            if status != b"200" or b"transfer-encoding: chunked" not in head:
                self._fail(f"HTTP {status.decode(errors='replace')}, not a chunked 200")
                return
            self.close_after = b"connection: close" in head
        pos = 0
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(buf[pos:eol], 16)
            stop = eol + 2 + size
            if len(buf) < stop + 2:
                break
            if size == 0:
                del buf[: stop + 2]
                self._end(now)
                return
            self._body(bytes(buf[eol + 2 : stop]), now)
            pos = stop + 2
        if pos:
            del buf[:pos]


class Stream(_Chunked):
    """One client: a keep-alive connection running streams back to back."""

    def __init__(self, gen: LoadGenerator, index: int, *, once: bool = False) -> None:
        super().__init__(gen)
        self.index = index
        self.once = once
        self.number = 0
        self.sent_at = 0.0
        self.first_at: float | None = None

    # -- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.gen.result.connections += 1
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.in_flight:
            self.in_flight = False
            self.gen.record_error(f"connection lost mid-stream: {exc or 'closed'}")
        if not self.closed.done():
            self.closed.set_result(None)

    # -- one stream ----------------------------------------------------------------------

    def _send(self) -> None:
        assert self.transport is not None
        self.number += 1
        self.in_head = True
        self.in_flight = True
        self.first_at = None
        self.count = 0
        self.ended = b""
        self.events = b""
        self.buf.clear()
        self.sent_at = time.monotonic()
        self.transport.write(self.gen.request(self.index, self.number))

    def _body(self, piece: bytes, now: float) -> None:
        complete = self._complete(piece)
        if complete is None:
            return
        gen = self.gen
        count = complete.count(gen.chunk_marker)
        if count:
            if self.first_at is None:
                self.first_at = now
                gen.opened(self.index)
                if gen.spec.follow_port is not None:
                    gen.follow(stage_id(self.index, self.number))
            self.count += count
            if gen.window_open <= now < gen.window_close:
                gen.window_chunks += count
        self._ending(complete)

    def _end(self, now: float) -> None:
        self.in_flight = False
        gen = self.gen
        gen.finished_stream(self)
        if self.once or self.close_after or now >= gen.window_close or gen.stopping:
            assert self.transport is not None
            self.transport.close()
        else:
            self._send()

    def _fail(self, why: str) -> None:
        self.in_flight = False
        self.failed = True  # the client waits a little before it tries again
        self.gen.record_error(why)
        if self.transport is not None:
            self.transport.close()


def stage_id(index: int, number: int) -> str:
    """The id the load generator gives the ``number``-th stage of client ``index``."""
    return f"bench-{index}-{number}"


class _Follower(_Chunked):
    """One client following one stage, from its first event to its terminal one, through
    ``GET /stages/<id>/events`` on the following host; on a connection of its own."""

    def __init__(self, gen: LoadGenerator, stage: str) -> None:
        super().__init__(gen)
        self.stage = stage

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.in_flight = True
        transport.write(self.gen.follow_request(self.stage))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.in_flight:
            self.in_flight = False
            self.gen.record_follow_error(f"connection lost mid-stream: {exc or 'closed'}")
        if not self.closed.done():
            self.closed.set_result(None)

    def _body(self, piece: bytes, now: float) -> None:
        complete = self._complete(piece)
        if complete is None:
            return
        gen = self.gen
        count = complete.count(gen.chunk_marker)
        if count:
            self.count += count
            if gen.window_open <= now < gen.window_close:
                gen.result.follow_chunks += count
        self._ending(complete)

    def _end(self, now: float) -> None:
        self.in_flight = False
        self.gen.finished_follow(self)
        assert self.transport is not None
        self.transport.close()

    def _fail(self, why: str) -> None:
        self.in_flight = False
        self.failed = True
        self.gen.record_follow_error(f"{self.stage}: {why}")
        if self.transport is not None:
            self.transport.close()


class LoadGenerator:
    """N clients running streams back to back over a measured window, on kept-alive
    connections (or each stream on a new one: ``LoadSpec.new_connections``)."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.followers: set[asyncio.Future[None]] = set()
        self.loop = asyncio.get_running_loop()
        port, path, shape, follow_port = spec.port, spec.path, spec.shape, spec.follow_port
        kind = api_of(spec.target, path)
        self.chunk_marker, self.done_marker, self.fail_markers = _MARKERS[kind]
        auth = f"Authorization: Bearer {spec.api_key}\r\n" if spec.api_key else ""
        self._head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\n{auth}"
        ).encode()
        self._follow_head = (
            f"HTTP/1.1\r\nHost: 127.0.0.1:{follow_port}\r\nAccept: text/event-stream\r\n{auth}\r\n"
        ).encode()
        # A followed stage outlives its client's disconnect, as a watched one would.
        self._resumable = ',"resumable":true' if follow_port is not None else ""
        self._kind = kind
        # Every API relays each stream's upstream chunks (``shape.events``); Responses'
        # and the Messages API's have an event for each content chunk only, and the finish
        # and usage chunks are counted for them when a stream ends.
        per_content = kind in ("responses", "messages")
        self.unseen_per_stream = shape.events - shape.chunks if per_content else 0
        self._openai_body = json.dumps(
            {
                "model": shape.model,
                "messages": [{"role": "user", "content": "bench"}],
                "max_tokens": 512,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        ).encode()
        inf = float("inf")
        self.window_open = inf
        self.window_close = inf
        self.window_chunks = 0
        self.stopping = False
        # (sent, first token) of every whole stream sent in the window, in monotonic seconds.
        self.firsts: list[tuple[float, float]] = []
        self._first_round: set[int] | None = set()
        self.result = Result(
            spec.target, spec.concurrency, shape.chunks, shape.interval, shape.prefill
        )

    def request(self, index: int, number: int) -> bytes:
        if self._kind == "stageserver":
            body = (
                f'{{"stage_id":"{stage_id(index, number)}","model_name":"{self.spec.shape.model}",'
                f'"user_prompt":"bench","stream":true{self._resumable}}}'
            ).encode()
        elif self._kind == "responses":
            body = json.dumps(
                {"model": self.spec.shape.model, "input": "bench", "stream": True}
            ).encode()
        elif self._kind == "messages":
            body = json.dumps(
                {
                    "model": self.spec.shape.model,
                    "max_tokens": 512,
                    "messages": [{"role": "user", "content": "bench"}],
                    "stream": True,
                }
            ).encode()
        else:
            body = self._openai_body
        return self._head + b"Content-Length: %d\r\n\r\n" % len(body) + body

    def follow_request(self, stage: str) -> bytes:
        return b"GET /stages/%s/events " % stage.encode() + self._follow_head

    def follow(self, stage: str) -> None:
        """Follow ``stage`` on the following host, from its first event to its end."""
        task = asyncio.ensure_future(self._follow(stage))
        self.followers.add(task)
        task.add_done_callback(self.followers.discard)

    async def _follow(self, stage: str) -> None:
        assert self.spec.follow_port is not None
        follower = _Follower(self, stage)
        try:
            await self.loop.create_connection(follower.itself, "127.0.0.1", self.spec.follow_port)
        except OSError as exc:
            self.record_follow_error(f"connect: {exc}")
            return
        await follower.closed

    def record_follow_error(self, why: str) -> None:
        self.result.follow_errors += 1
        self.record_error(f"follower: {why}")

    def finished_follow(self, follower: _Follower) -> None:
        self.result.follow_streams += 1
        if follower.ended != self.done_marker or follower.count != self.spec.shape.events:
            self.record_follow_error(
                f"{follower.stage} ended with "
                f"{follower.ended.decode().strip() or 'no end event'} "
                f"after {follower.count} of {self.spec.shape.events} chunks"
            )

    def opened(self, index: int) -> None:
        """A client has its first token: once all have, none has finished yet (they start
        within one stream's length), and the target's memory holds N open streams."""
        if self._first_round is None or index < 0:  # index -1: the warm-up stream
            return
        self._first_round.add(index)
        if len(self._first_round) == self.spec.concurrency:
            self._first_round = None
            self.result.rss_open_kb = self._rss()

    def record_error(self, why: str) -> None:
        self.result.errors += 1
        if len(self.result.error_samples) < 5:
            self.result.error_samples.append(why)

    def finished_stream(self, stream: Stream) -> None:
        self.result.streams += 1
        relayed = stream.count + self.unseen_per_stream
        if self.unseen_per_stream and self.window_open <= time.monotonic() < self.window_close:
            self.window_chunks += self.unseen_per_stream
        if stream.ended != self.done_marker or relayed != self.spec.shape.events:
            self.record_error(
                f"stream ended with {stream.ended.decode().strip() or 'no end event'} "
                f"after {stream.count} of {self.spec.shape.events} chunks"
            )
        elif self.window_open <= stream.sent_at < self.window_close:
            assert stream.first_at is not None
            self.firsts.append((stream.sent_at, stream.first_at))

    async def _connect(self, index: int, delay: float) -> None:
        await asyncio.sleep(delay)
        while not self.stopping and time.monotonic() < self.window_close:
            stream = Stream(self, index, once=self.spec.new_connections)
            try:
                await self.loop.create_connection(stream.itself, "127.0.0.1", self.spec.port)
            except OSError as exc:
                self.record_error(f"connect: {exc}")
                await asyncio.sleep(0.1)
                continue
            await stream.closed
            if stream.failed:
                await asyncio.sleep(0.1)

    async def _one_stream(self) -> None:
        """Before the load: one stream, so that the target has loaded what it loads lazily
        (and the following host too, which follows it)."""
        stream = Stream(self, -1, once=True)
        await self.loop.create_connection(stream.itself, "127.0.0.1", self.spec.port)
        await stream.closed
        if self.followers:
            await asyncio.wait(set(self.followers), timeout=self.spec.shape.seconds + 10)

    async def _start_profiler(self) -> asyncio.subprocess.Process | None:
        """py-spy on the server's processes for the window, as collapsed stacks (text)."""
        if self.spec.profile is None or self.spec.server_pid is None:
            return None
        spy = Path(sys.executable).with_name("py-spy")
        return await asyncio.create_subprocess_exec(
            str(spy), "record", "--pid", str(self.spec.server_pid), "--subprocesses",
            "--nonblocking", "--rate", "200", "--duration", str(max(1, int(self.spec.duration))),
            "--format", "raw", "--output", self.spec.profile,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip

    async def _snapshot(self, *, opening: bool) -> _Snapshot:
        """CPU, the store's commands and the delay histogram, read together: the histogram
        outermost (first at the start, last at the end), then the store's commands, the
        CPU innermost, so that what the readings cost is outside the CPU window."""
        durable = await self._durable() if opening and self.spec.metrics else None
        calls = await self._redis_calls() if opening else None
        usage = resource.getrusage(resource.RUSAGE_SELF)
        spec = self.spec
        server, upstream, follow_pid = spec.server_pid, spec.upstream_pid, spec.follow_pid
        snapshot = _Snapshot(
            server=None if server is None else procs.cpu_seconds(procs.tree(server)),
            upstream=None if upstream is None else procs.cpu_seconds([upstream]),
            own=usage.ru_utime + usage.ru_stime,
            busy=procs.machine_busy_seconds(),
            redis=procs.cpu_seconds(pid for _, pid in spec.redis) if spec.redis else None,
            follow_server=None if follow_pid is None else procs.cpu_seconds(procs.tree(follow_pid)),
            redis_calls=calls,
            durable=durable,
        )
        if not opening:
            snapshot.redis_calls = await self._redis_calls()
            snapshot.durable = await self._durable() if self.spec.metrics else None
        return snapshot

    async def _redis_calls(self) -> dict[str, int] | None:
        """Commands run so far, summed over the store's nodes: the ``calls`` of every
        ``cmdstat_*`` line of ``INFO commandstats`` (a script's commands are counted there
        too). An INFO is counted once it has run: each reading's own shows in the next."""
        if not self.spec.redis:
            return None
        total: dict[str, int] = {}
        for port, _ in self.spec.redis:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                text = await redis_info(reader, writer, b"commandstats")
            finally:
                writer.close()
                await writer.wait_closed()
            for name, calls in _CALLS.findall(text):
                total[name.decode()] = total.get(name.decode(), 0) + int(calls)
        return total

    async def _durable(self) -> dict[float, float] | None:
        """The relay→durable delay histogram from the target's ``/metrics``, its label sets
        summed by bucket; None when the server has no such histogram."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.spec.port)
        try:
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            text = await reader.read()  # to the close
        finally:
            writer.close()
            await writer.wait_closed()
        return durable_histogram(text)

    def _rss(self) -> int | None:
        if self.spec.server_pid is None:
            return None
        return procs.rss_kb(procs.tree(self.spec.server_pid))

    async def run(self) -> Result:
        res = self.result
        await self._one_stream()
        await asyncio.sleep(0.2)
        res.rss_idle_kb = self._rss()
        res.streams = res.errors = res.follow_streams = res.follow_errors = res.connections = 0
        res.error_samples.clear()

        spread = self.spec.shape.seconds
        start = time.monotonic()
        # Open the window once every client has started and had time to reach the middle of
        # its first stream, and then its second one, so that all N are open throughout.
        self.window_open = start + spread + self.spec.shape.seconds / 2 + 0.5
        self.window_close = self.window_open + self.spec.duration
        clients = [
            asyncio.ensure_future(self._connect(i, spread * i / self.spec.concurrency))
            for i in range(self.spec.concurrency)
        ]
        await asyncio.sleep(self.window_open - time.monotonic())
        spy = await self._start_profiler()
        before = await self._snapshot(opening=True)
        peak = 0
        while (left := self.window_close - time.monotonic()) > 0:
            peak = max(peak, self._rss() or 0)
            await asyncio.sleep(min(0.5, left))
        after = await self._snapshot(opening=False)
        res.window_seconds = self.spec.duration
        if spy is not None:
            await spy.wait()
        # Streams that began in the window end after it: wait for them, bounded.
        grace = self.spec.shape.seconds * 3 + 10
        deadline = time.monotonic() + grace
        _, pending = await asyncio.wait(clients, timeout=grace)
        if pending:
            self.stopping = True
            self.record_error(f"{len(pending)} clients still streaming {grace:g} s after the end")
            for task in pending:
                task.cancel()
        if self.followers:
            left = max(0.1, deadline - time.monotonic())
            _, late = await asyncio.wait(set(self.followers), timeout=left)
            if late:
                self.record_follow_error(f"{len(late)} still following {grace:g} s after the end")
                for follower in late:
                    follower.cancel()
        self._report(before, after, peak)
        return res

    def _report(self, before: _Snapshot, after: _Snapshot, peak: int) -> None:
        res = self.result
        res.streams_measured = len(self.firsts)
        res.chunks = self.window_chunks
        res.chunks_per_second = round(self.window_chunks / self.spec.duration, 1)
        per_chunk = 1e6 / self.window_chunks if self.window_chunks else float("nan")
        pairs = {
            "server": (before.server, after.server),
            "upstream": (before.upstream, after.upstream),
            "redis": (before.redis, after.redis),
            "follow_server": (before.follow_server, after.follow_server),
        }
        spent = {name: a - b for name, (b, a) in pairs.items() if a is not None and b is not None}
        # Whatever else kept the machine's cores busy meanwhile: a number well above zero
        # means the run shared the CPUs and its latencies are not to be trusted.
        ours = (after.own - before.own) + sum(spent.values())
        other = max(0.0, after.busy - before.busy - ours)
        res.other_cpu_cores = round(other / self.spec.duration, 2)
        if "server" in spent:
            res.server_cpu_seconds = round(spent["server"], 3)
            res.server_cpu_us_per_chunk = round(spent["server"] * per_chunk, 1)
        if "upstream" in spent:
            res.upstream_cpu_us_per_chunk = round(spent["upstream"] * per_chunk, 1)
        if "redis" in spent:
            res.redis_cpu_us_per_chunk = round(spent["redis"] * per_chunk, 1)
        if "follow_server" in spent:
            res.follow_server_cpu_us_per_chunk = round(spent["follow_server"] * per_chunk, 1)
        if before.redis_calls is not None and after.redis_calls is not None:
            by_name = {
                name: calls - before.redis_calls.get(name, 0)
                for name, calls in after.redis_calls.items()
            }
            # Less the opening INFO of each node, counted in the closing reading.
            by_name["info"] = by_name.get("info", 0) - len(self.spec.redis)
            res.redis_commands_by_name = dict(
                sorted(((n, c) for n, c in by_name.items() if c), key=lambda item: -item[1])
            )
            res.redis_commands = sum(by_name.values())
            res.redis_commands_per_chunk = round(res.redis_commands * per_chunk / 1e6, 2)
        if before.durable is not None and after.durable is not None:
            window = {le: n - before.durable.get(le, 0.0) for le, n in after.durable.items()}
            res.durable_writes = int(window.get(math.inf, 0.0))
            res.durable_p50_ms = bucket_quantile_ms(window, 0.50)
            res.durable_p99_ms = bucket_quantile_ms(window, 0.99)
        res.loadgen_cpu_us_per_chunk = round((after.own - before.own) * per_chunk, 1)
        if self.firsts:
            ordered = sorted(first - sent for sent, first in self.firsts)
            res.ttft_p50_ms = round(percentile(ordered, 50) * 1000, 2)
            res.ttft_p99_ms = round(percentile(ordered, 99) * 1000, 2)
        res.rss_peak_kb = peak or None
        # Below ten streams the difference is within the resident set's own jitter.
        if self.spec.concurrency >= 10 and res.rss_idle_kb is not None and res.rss_open_kb:
            per_stream = (res.rss_open_kb - res.rss_idle_kb) / self.spec.concurrency
            res.memory_per_stream_kb = round(per_stream, 1)


async def redis_info(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, section: bytes
) -> bytes:
    """One ``INFO <section>`` on a connection to a redis-server: the text of its answer."""
    writer.write(b"INFO " + section + b"\r\n")
    head = await reader.readline()  # a bulk string: $<length>
    if not head.startswith(b"$"):
        raise RuntimeError(f"redis answered INFO {section.decode()} with {head!r}")
    return await reader.readexactly(int(head[1:]) + 2)


_CALLS = re.compile(rb"^cmdstat_([^:]+):calls=(\d+)", re.MULTILINE)
DURABLE_METRIC = b"stageserver_store_write_delay_seconds"
_BUCKET = re.compile(rb"^" + DURABLE_METRIC + rb"_bucket\{([^}]*)\}\s+(\S+)", re.MULTILINE)
_LE = re.compile(rb'le="([^"]+)"')


def durable_histogram(text: bytes) -> dict[float, float] | None:
    """The cumulative count of each bucket (upper bound in seconds, ``inf`` for
    ``+Inf``) of the delay histogram in a Prometheus exposition, every label set summed;
    None when it has none."""
    buckets: dict[float, float] = {}
    for labels, value in _BUCKET.findall(text):
        le = _LE.search(labels)
        if le is not None:
            bound = float(le.group(1))  # "+Inf" reads as inf
            buckets[bound] = buckets.get(bound, 0.0) + float(value)
    return buckets or None


def bucket_quantile_ms(cumulative: dict[float, float], q: float) -> float | None:
    """The ``q`` quantile of a histogram's observations as the upper bound, in ms, of the
    bucket it falls in (so a bound, never an estimate within a bucket; ``inf`` beyond
    the largest finite bound). ``cumulative``: each bucket's count of observations at or
    below its bound. None when there was none."""
    bounds = sorted(cumulative)
    total = cumulative[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank = max(1.0, math.ceil(total * q))  # nearest rank, as percentile
    for bound in bounds:
        if cumulative[bound] >= rank:
            return bound * 1000 if math.isfinite(bound) else math.inf
    return math.inf


def percentile(ordered: Sequence[float], pct: float) -> float:
    """Nearest rank: the smallest value with at least ``pct`` % of the values at or below."""
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


async def run(spec: LoadSpec) -> Result:
    return await LoadGenerator(spec).run()


def _port_pid(text: str) -> tuple[int, int]:
    port, _, pid = text.partition(":")
    try:
        return int(port), int(pid)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PORT:PID, got {text!r}") from None


def spec_parser(description: str) -> argparse.ArgumentParser:
    """The command line of a load generator: a ``LoadSpec``, as ``LoadSpec.argv`` writes it."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target", required=True, help="stageserver, nginx or direct")
    parser.add_argument("--path", required=True)
    parser.add_argument(
        "--concurrency", type=int, required=True, help="streams at once (a burst's size)"
    )
    parser.add_argument("--chunks", type=int, default=50)
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--prefill", type=float, default=0.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--server-pid", type=int, help="the target's master process")
    parser.add_argument("--upstream-pid", type=int, help="the fake upstream's process")
    parser.add_argument("--profile", help="py-spy the server over the window, to this file")
    parser.add_argument("--api-key", help="sent as Authorization: Bearer")
    parser.add_argument(
        "--redis",
        action="append",
        default=[],
        type=_port_pid,
        metavar="PORT:PID",
        help="a redis-server of the store (once per node): its commands and CPU are read",
    )
    parser.add_argument(
        "--metrics", action="store_true", help="read the relay→durable delay from /metrics"
    )
    parser.add_argument("--follow-port", type=int, help="follow every stage on this host too")
    parser.add_argument("--follow-pid", type=int, help="the following host's master process")
    parser.add_argument(
        "--new-connections", action="store_true", help="each stream on a connection of its own"
    )
    return parser


def parse_spec(argv: Sequence[str] | None, description: str) -> LoadSpec:
    args = spec_parser(description).parse_args(argv)
    return LoadSpec(
        port=args.port,
        target=args.target,
        path=args.path,
        shape=Shape(args.chunks, args.interval, args.prefill),
        concurrency=args.concurrency,
        duration=args.duration,
        server_pid=args.server_pid,
        upstream_pid=args.upstream_pid,
        profile=args.profile,
        api_key=args.api_key,
        redis=args.redis,
        metrics=args.metrics,
        follow_port=args.follow_port,
        follow_pid=args.follow_pid,
        new_connections=args.new_connections,
    )


def main(argv: Sequence[str] | None = None) -> int:
    spec = parse_spec(argv, "Concurrent SSE streams over a window; prints JSON.")
    procs.raise_nofile_limit()
    result = asyncio.run(run(spec))
    json.dump(asdict(result), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
