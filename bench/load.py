"""The load generator: N concurrent SSE streams from one asyncio process.

It must cost far less than what it measures, on the same two cores: each connection is
an ``asyncio.Protocol`` that decodes HTTP chunking and counts events with ``bytes.count``
on whole events; nothing is parsed as JSON. Its own CPU time is reported.

Each of N clients keeps one keep-alive connection and runs streams back to back. The
clients start spread evenly over one stream's length, so that streams begin and end at
all times rather than in lock-step, and the measured window opens once all N run:

- time to first token: from writing the request to reading the first chunk event, for
  every stream that starts in the window;
- chunks: chunk events read in the window;
- CPU: the target's process tree (master and workers), the fake upstream and this
  process, over the window;
- memory: the target's resident set at the moment all N streams are open and none has
  ended yet (the first round), minus its resident set when idle (after one stream,
  before the load), per open stream; finished stages kept for replay are not in it.

Run as ``python -m bench.load --port P --target stageserver ...``; prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
}


def api_of(target: str, path: str) -> str:
    """Which API a target is streamed through: the seed's, Chat Completions', Responses'."""
    if path == "/v1/responses":
        return "responses"
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
class Result:
    target: str
    concurrency: int
    chunks_per_stream: int
    interval: float
    prefill: float
    window_seconds: float = 0.0
    streams: int = 0
    streams_measured: int = 0
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


class _Stream(asyncio.Protocol):
    """One client: a keep-alive connection running streams back to back."""

    def __init__(self, gen: LoadGenerator, index: int, *, once: bool = False) -> None:
        self.gen = gen
        self.index = index
        self.once = once
        self.transport: asyncio.Transport | None = None
        self.number = 0
        self.buf = bytearray()
        self.events = b""
        self.in_head = True
        self.in_flight = False
        self.close_after = False
        self.sent_at = 0.0
        self.first_at: float | None = None
        self.count = 0
        self.ended = b""
        self.failed = False
        self.closed = gen.loop.create_future()

    def itself(self) -> _Stream:
        """The protocol factory for this one connection."""
        return self

    # -- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._send()

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
        events = self.events + piece if self.events else piece
        end = events.rfind(b"\n\n")
        if end < 0:
            self.events = events
            return
        self.events = events[end + 2 :]
        complete = events[: end + 2] if self.events else events
        gen = self.gen
        count = complete.count(gen.chunk_marker)
        if count:
            if self.first_at is None:
                self.first_at = now
                gen.opened(self.index)
            self.count += count
            if gen.window_open <= now < gen.window_close:
                gen.window_chunks += count
        if gen.done_marker in complete:
            self.ended = gen.done_marker
        else:
            for marker in gen.fail_markers:
                if marker in complete:
                    self.ended = marker

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


class LoadGenerator:
    def __init__(
        self,
        *,
        port: int,
        target: str,
        path: str,
        shape: Shape,
        concurrency: int,
        duration: float,
        server_pid: int | None,
        upstream_pid: int | None,
        profile: str | None = None,
        api_key: str | None = None,
    ) -> None:
        self.profile = profile
        self.loop = asyncio.get_running_loop()
        self.port = port
        self.target = target
        self.path = path
        self.shape = shape
        self.concurrency = concurrency
        self.duration = duration
        self.server_pid = server_pid
        self.upstream_pid = upstream_pid
        kind = api_of(target, path)
        self.chunk_marker, self.done_marker, self.fail_markers = _MARKERS[kind]
        auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        self._head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\n{auth}"
        ).encode()
        self._kind = kind
        # Every API relays each stream's upstream chunks (``shape.events``); Responses'
        # has an event for each content chunk only, and the finish and usage chunks are
        # counted for it when its stream ends.
        self.unseen_per_stream = shape.events - shape.chunks if kind == "responses" else 0
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
        self.ttfts: list[float] = []
        self._first_round: set[int] | None = set()
        self.result = Result(target, concurrency, shape.chunks, shape.interval, shape.prefill)

    def request(self, index: int, number: int) -> bytes:
        if self._kind == "stageserver":
            body = (
                f'{{"stage_id":"bench-{index}-{number}","model_name":"{self.shape.model}",'
                '"user_prompt":"bench","stream":true}'
            ).encode()
        elif self._kind == "responses":
            body = json.dumps(
                {"model": self.shape.model, "input": "bench", "stream": True}
            ).encode()
        else:
            body = self._openai_body
        return self._head + b"Content-Length: %d\r\n\r\n" % len(body) + body

    def opened(self, index: int) -> None:
        """A client has its first token: once all have, none has finished yet (they start
        within one stream's length), and the target's memory holds N open streams."""
        if self._first_round is None:
            return
        self._first_round.add(index)
        if len(self._first_round) == self.concurrency:
            self._first_round = None
            self.result.rss_open_kb = self._rss()

    def record_error(self, why: str) -> None:
        self.result.errors += 1
        if len(self.result.error_samples) < 5:
            self.result.error_samples.append(why)

    def finished_stream(self, stream: _Stream) -> None:
        self.result.streams += 1
        relayed = stream.count + self.unseen_per_stream
        if self.unseen_per_stream and self.window_open <= time.monotonic() < self.window_close:
            self.window_chunks += self.unseen_per_stream
        if stream.ended != self.done_marker or relayed != self.shape.events:
            self.record_error(
                f"stream ended with {stream.ended.decode().strip() or 'no end event'} "
                f"after {stream.count} of {self.shape.events} chunks"
            )
        elif self.window_open <= stream.sent_at < self.window_close:
            assert stream.first_at is not None
            self.ttfts.append(stream.first_at - stream.sent_at)

    async def _connect(self, index: int, delay: float) -> None:
        await asyncio.sleep(delay)
        while not self.stopping and time.monotonic() < self.window_close:
            stream = _Stream(self, index)
            try:
                await self.loop.create_connection(stream.itself, "127.0.0.1", self.port)
            except OSError as exc:
                self.record_error(f"connect: {exc}")
                await asyncio.sleep(0.1)
                continue
            await stream.closed
            if stream.failed:
                await asyncio.sleep(0.1)

    async def _one_stream(self) -> None:
        """Before the load: one stream, so that the target has loaded what it loads lazily."""
        stream = _Stream(self, -1, once=True)
        await self.loop.create_connection(stream.itself, "127.0.0.1", self.port)
        await stream.closed

    async def _start_profiler(self) -> asyncio.subprocess.Process | None:
        """py-spy on the server's processes for the window, as collapsed stacks (text)."""
        if self.profile is None or self.server_pid is None:
            return None
        spy = Path(sys.executable).with_name("py-spy")
        return await asyncio.create_subprocess_exec(
            str(spy), "record", "--pid", str(self.server_pid), "--subprocesses",
            "--nonblocking", "--rate", "200", "--duration", str(max(1, int(self.duration))),
            "--format", "raw", "--output", self.profile,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip

    def _cpu(self) -> tuple[float | None, float | None, float, float]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return (
            None if self.server_pid is None else procs.cpu_seconds(procs.tree(self.server_pid)),
            None if self.upstream_pid is None else procs.cpu_seconds([self.upstream_pid]),
            usage.ru_utime + usage.ru_stime,
            procs.machine_busy_seconds(),
        )

    def _rss(self) -> int | None:
        if self.server_pid is None:
            return None
        return procs.rss_kb(procs.tree(self.server_pid))

    async def run(self) -> Result:
        res = self.result
        await self._one_stream()
        await asyncio.sleep(0.2)
        res.rss_idle_kb = self._rss()
        res.streams = res.errors = 0
        res.error_samples.clear()

        spread = self.shape.seconds
        start = time.monotonic()
        # Open the window once every client has started and had time to reach the middle of
        # its first stream, and then its second one, so that all N are open throughout.
        self.window_open = start + spread + self.shape.seconds / 2 + 0.5
        self.window_close = self.window_open + self.duration
        clients = [
            asyncio.ensure_future(self._connect(i, spread * i / self.concurrency))
            for i in range(self.concurrency)
        ]
        await asyncio.sleep(self.window_open - time.monotonic())
        spy = await self._start_profiler()
        before = self._cpu()
        peak = 0
        while (left := self.window_close - time.monotonic()) > 0:
            peak = max(peak, self._rss() or 0)
            await asyncio.sleep(min(0.5, left))
        after = self._cpu()
        res.window_seconds = self.duration
        if spy is not None:
            await spy.wait()
        # Streams that began in the window end after it: wait for them, bounded.
        grace = self.shape.seconds * 3 + 10
        _, pending = await asyncio.wait(clients, timeout=grace)
        if pending:
            self.stopping = True
            self.record_error(f"{len(pending)} clients still streaming {grace:g} s after the end")
            for task in pending:
                task.cancel()
        self._report(before, after, peak)
        return res

    def _report(
        self,
        before: tuple[float | None, float | None, float, float],
        after: tuple[float | None, float | None, float, float],
        peak: int,
    ) -> None:
        res = self.result
        res.streams_measured = len(self.ttfts)
        res.chunks = self.window_chunks
        res.chunks_per_second = round(self.window_chunks / self.duration, 1)
        per_chunk = 1e6 / self.window_chunks if self.window_chunks else float("nan")
        server_b, upstream_b, own_b, busy_b = before
        server_a, upstream_a, own_a, busy_a = after
        # Whatever else kept the machine's cores busy meanwhile: a number well above zero
        # means the run shared the CPUs and its latencies are not to be trusted.
        ours = (own_a - own_b) + sum(
            a - b
            for a, b in ((server_a, server_b), (upstream_a, upstream_b))
            if a is not None and b is not None
        )
        res.other_cpu_cores = round(max(0.0, busy_a - busy_b - ours) / self.duration, 2)
        if server_b is not None and server_a is not None:
            res.server_cpu_seconds = round(server_a - server_b, 3)
            res.server_cpu_us_per_chunk = round((server_a - server_b) * per_chunk, 1)
        if upstream_b is not None and upstream_a is not None:
            res.upstream_cpu_us_per_chunk = round((upstream_a - upstream_b) * per_chunk, 1)
        res.loadgen_cpu_us_per_chunk = round((own_a - own_b) * per_chunk, 1)
        if self.ttfts:
            ordered = sorted(self.ttfts)
            res.ttft_p50_ms = round(_percentile(ordered, 50) * 1000, 2)
            res.ttft_p99_ms = round(_percentile(ordered, 99) * 1000, 2)
        res.rss_peak_kb = peak or None
        # Below ten streams the difference is within the resident set's own jitter.
        if self.concurrency >= 10 and res.rss_idle_kb is not None and res.rss_open_kb:
            per_stream = (res.rss_open_kb - res.rss_idle_kb) / self.concurrency
            res.memory_per_stream_kb = round(per_stream, 1)


def _percentile(ordered: Sequence[float], pct: float) -> float:
    """Nearest rank: the smallest value with at least ``pct`` % of the values at or below."""
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


async def run(
    *,
    port: int,
    target: str,
    path: str,
    shape: Shape,
    concurrency: int,
    duration: float,
    server_pid: int | None = None,
    upstream_pid: int | None = None,
    profile: str | None = None,
    api_key: str | None = None,
) -> Result:
    gen = LoadGenerator(
        profile=profile,
        api_key=api_key,
        port=port,
        target=target,
        path=path,
        shape=shape,
        concurrency=concurrency,
        duration=duration,
        server_pid=server_pid,
        upstream_pid=upstream_pid,
    )
    return await gen.run()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Concurrent SSE streams; prints JSON.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target", required=True, help="stageserver, nginx or direct")
    parser.add_argument("--path", required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=50)
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--prefill", type=float, default=0.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--server-pid", type=int, help="the target's master process")
    parser.add_argument("--upstream-pid", type=int, help="the fake upstream's process")
    parser.add_argument("--profile", help="py-spy the server over the window, to this file")
    parser.add_argument("--api-key", help="sent as Authorization: Bearer")
    args = parser.parse_args(argv)
    procs.raise_nofile_limit()
    result = asyncio.run(
        run(
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
        )
    )
    json.dump(asdict(result), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
