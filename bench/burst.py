"""One burst: B streams sent at once, each on a new connection, to a fresh server; what
the burst costs the server's worker, and in what order the server answers it.

Run as ``python -m bench.burst --port P --target stageserver --concurrency 200 ...``, the
command line of ``bench.load`` (a ``LoadSpec``, whose ``concurrency`` is the burst's
size); it prints one JSON object. ``bench.run`` runs it for ``--burst B`` (streams of the
run's shape) and ``--new-streams N`` (streams of one chunk: what a new stream costs).

First one stream warms the target up (what it loads lazily), then the idle resident set
is read. Then B connections are opened at once, and each writes its request as soon as
it is connected; each reads its stream to the end and closes. What is measured:

- **connections**: those opened for the burst, counted as each is made: B.

- **arrival order**: the order in which the requests were written. This process is one
  thread, so the writes are sequential, and each is timestamped as it is made; all B
  take a few milliseconds (``send_spread_ms``). On loopback a request is in the server's
  socket when its write returns: this is the order in which they reached the server.
- **first-token order**: the order in which the first chunk event of each stream was
  read here, timestamped as each read returned. When several streams' first tokens wait
  at once, they are read in the order epoll reports them ready, which is the order they
  became ready; so this order is the server's, blurred by what this process was busy
  with. The blur is measured, not assumed: the same burst to ``direct`` (the fake
  upstream, which answers in the order it accepts) and to ``nginx``, in the same run,
  gives the correlation that the harness itself can show.
- **time to first token**, per stream: from writing its request to reading its first
  chunk event; its p50, p90 and the last (the largest).
- **rank correlation**: Spearman's ρ between the two orders, over the whole streams (ties
  take their mean rank): 1 is first come, first served; 0 no relation; −1 the last
  served first.
- **worker CPU**: the target's workers (its process tree without the master, which
  idles), every thread, from ``/proc`` as ``bench.load`` reads it. ``start_cpu_ms``: from
  just before the first connection to the last first token, what starting the burst
  cost; ``first_token_cpu_p50_ms``: to the median first token (the first tokens' p50
  counted in the worker's CPU instead of the clock, which another process taking the
  core does not lengthen); ``burst_cpu_ms``: to the end of the burst, every stream
  ended and the worker quiet (its CPU grew by less than ``QUIET_CPU_SECONDS`` in
  ``QUIET_PERIOD``, at most ``QUIET_LIMIT`` later), so that what a stream costs after
  its last event (reading the upstream's end, finishing the stage, the client's close)
  counts. Per stream, and per relayed chunk.
- **memory per open stream**: the target's resident set when every stream had its first
  token, if none had ended yet, less the idle one, divided by B (none otherwise, as for
  streams of one chunk, which end at once).
- **Redis connections** (``--redis``, once per node): the clients each node of the
  store counts (``INFO clients``: ``connected_clients``, less this process's own), every
  ``REDIS_SAMPLE_PERIOD`` through the burst (the peak, summed over the nodes) and
  ``AFTER_SECONDS`` after its last stream ended (after); with a cluster, the peak and
  the after of the node that had the most are reported too (a cluster's bound is per
  node). The store is the target's own, and its worker is its only other client (with
  ``+follow``, the following host is one too), so these are the worker's connections:
  the worker's own sockets whose peer is a node (``/proc/<pid>/fd`` against
  ``/proc/<pid>/net/tcp``) are counted too, after the burst, to show it. They are not
  what is sampled, because reading ``/proc/net/tcp`` walks the kernel's whole table of
  connections (10–20 ms on this machine), where an ``INFO`` is a round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from . import procs
from .load import LoadGenerator, LoadSpec, Stream, parse_spec, percentile, redis_info

QUIET_CPU_SECONDS = 0.0005
QUIET_PERIOD = 0.1
QUIET_LIMIT = 5.0
REDIS_SAMPLE_PERIOD = 0.02
AFTER_SECONDS = 1.0
_CONNECTED = re.compile(rb"^connected_clients:(\d+)", re.MULTILINE)


@dataclass
class BurstResult:
    target: str
    concurrency: int  # the burst's size, B
    chunks_per_stream: int
    interval: float
    prefill: float
    streams: int = 0  # streams that ended, whole or not
    connections: int = 0  # opened to the target for the burst: B
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    send_spread_ms: float | None = None  # from the first request written to the last
    burst_seconds: float | None = None  # from the first connection to the last stream's end
    ttft_p50_ms: float | None = None
    ttft_p90_ms: float | None = None
    ttft_last_ms: float | None = None
    rank_correlation: float | None = None
    start_ms: float | None = None  # from the first connection to the last first token
    start_cpu_ms: float | None = None  # the worker's CPU meanwhile
    first_token_cpu_p50_ms: float | None = None  # its CPU by the median first token
    burst_cpu_ms: float | None = None
    server_cpu_us_per_stream: float | None = None
    server_cpu_us_per_chunk: float | None = None
    chunks: int = 0
    upstream_cpu_us_per_chunk: float | None = None
    loadgen_cpu_us_per_chunk: float | None = None
    other_cpu_cores: float | None = None
    rss_idle_kb: int | None = None
    rss_open_kb: int | None = None
    memory_per_stream_kb: float | None = None
    redis_connections_before: int | None = None  # after the warm-up stream
    redis_connections_peak: int | None = None  # summed over the nodes
    redis_connections_peak_per_node: int | None = None  # the largest node's peak
    redis_connections_after: int | None = None  # summed over the nodes
    redis_connections_after_per_node: int | None = None  # the largest node's
    redis_connections_peak_by_node: dict[int, int] | None = None  # port -> peak
    redis_worker_sockets_after: int | None = None  # from /proc, when "after" is read


@dataclass
class _Reading:
    """CPU seconds at one moment, and when: the target's workers', the rest of its tree
    (its master), the upstream's, the store's redis-servers', this process's, and the
    whole machine's (busy)."""

    at: float
    worker: float | None
    master: float | None
    upstream: float | None
    redis: float
    own: float
    busy: float


class BurstGenerator(LoadGenerator):
    """The streams of ``bench.load``, each on a new connection, all sent at once."""

    def __init__(self, spec: LoadSpec) -> None:
        super().__init__(spec)
        shape = spec.shape
        self.outcome = BurstResult(
            spec.target, spec.concurrency, shape.chunks, shape.interval, shape.prefill
        )
        self._workers: list[int] = []
        self._first_tokens = 0
        self._first_cpu: list[float] = []  # the worker's CPU at each first token
        self._streams: list[Stream] = []
        self._start_cpu: float | None = None
        self._start_at: float | None = None
        self._last_end = 0.0
        self._store: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    # -- the hooks of LoadGenerator that its streams call --------------------------------

    def opened(self, index: int) -> None:
        """A stream's first token: at the last one, what starting the burst cost, and the
        memory of B open streams if none has ended yet."""
        if index < 0:  # the warm-up stream
            return
        self._first_tokens += 1
        cpu = self._worker_cpu()
        if cpu is not None:
            self._first_cpu.append(cpu)
        if self._first_tokens < self.spec.concurrency:
            return
        self._start_cpu, self._start_at = cpu, time.monotonic()
        if self.result.streams == 0:
            self.outcome.rss_open_kb = self._rss()

    def finished_stream(self, stream: Stream) -> None:
        super().finished_stream(stream)
        if stream.index >= 0:
            self._last_end = time.monotonic()

    # -- the burst ----------------------------------------------------------------------

    def _worker_cpu(self) -> float | None:
        return procs.cpu_seconds(self._workers) if self.spec.server_pid is not None else None

    def _read(self) -> _Reading:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        master, upstream = self.spec.server_pid, self.spec.upstream_pid
        return _Reading(
            at=time.monotonic(),
            worker=self._worker_cpu(),
            master=None if master is None else procs.cpu_seconds([master]),
            upstream=None if upstream is None else procs.cpu_seconds([upstream]),
            redis=procs.cpu_seconds(pid for _, pid in self.spec.redis),
            own=usage.ru_utime + usage.ru_stime,
            busy=procs.machine_busy_seconds(),
        )

    async def burst(self) -> BurstResult:
        spec, out = self.spec, self.outcome
        await self._one_stream()
        await asyncio.sleep(0.2)
        if spec.server_pid is not None:
            self._workers = procs.workers(spec.server_pid)
        out.rss_idle_kb = self._rss()
        self.result.streams = self.result.errors = self.result.connections = 0
        self.result.error_samples.clear()
        stop_sampling = asyncio.Event()
        sampler = None
        if spec.redis:
            for port, _ in spec.redis:
                self._store.append(await asyncio.open_connection("127.0.0.1", port))
            out.redis_connections_before = sum((await self._store_clients()).values())
            sampler = asyncio.ensure_future(self._sample_store(stop_sampling))
        self.window_open = time.monotonic()  # every chunk from here on is the burst's
        before = self._read()
        self._streams = [Stream(self, index, once=True) for index in range(spec.concurrency)]
        runs = [asyncio.ensure_future(self._run_one(stream)) for stream in self._streams]
        limit = spec.shape.seconds * 3 + spec.concurrency * 0.05 + 30
        _, late = await asyncio.wait(runs, timeout=limit)
        if late:
            self.stopping = True
            self.record_error(f"{len(late)} streams still open {limit:g} s after the burst")
            for run in late:
                run.cancel()
        if self.followers:
            await asyncio.wait(set(self.followers), timeout=spec.shape.seconds + 10)
        after = await self._quiet(before)
        if sampler is not None:
            await asyncio.sleep(max(0.0, self._last_end + AFTER_SECONDS - time.monotonic()))
            stop_sampling.set()
            await sampler
            after_by_node = await self._store_clients()
            out.redis_connections_after = sum(after_by_node.values())
            out.redis_connections_after_per_node = max(after_by_node.values())
            ports = [port for port, _ in spec.redis]
            sockets = procs.connections_to(self._workers, ports)
            out.redis_worker_sockets_after = sum(sockets.values())
            for _, writer in self._store:
                writer.close()
        self._report_burst(before, after)
        return out

    async def _run_one(self, stream: Stream) -> None:
        try:
            await self.loop.create_connection(stream.itself, "127.0.0.1", self.spec.port)
        except OSError as exc:
            self.record_error(f"connect: {exc}")
            return
        await stream.closed

    async def _quiet(self, before: _Reading) -> _Reading:
        """The reading at the end of the burst: once the worker has stopped working."""
        reading = self._read()
        if reading.worker is None:
            return reading
        deadline = reading.at + QUIET_LIMIT
        while reading.at < deadline:
            await asyncio.sleep(QUIET_PERIOD)
            last, reading = reading, self._read()
            assert reading.worker is not None and last.worker is not None
            if reading.worker - last.worker < QUIET_CPU_SECONDS:
                break
        return reading

    async def _store_clients(self) -> dict[int, int]:
        """Each node's clients but this process: port -> count."""
        counts = {}
        for (port, _), (reader, writer) in zip(self.spec.redis, self._store, strict=True):
            found = _CONNECTED.search(await redis_info(reader, writer, b"clients"))
            if found is None:
                raise RuntimeError(f"redis on {port}: no connected_clients in INFO clients")
            counts[port] = int(found[1]) - 1
        return counts

    async def _sample_store(self, stop: asyncio.Event) -> None:
        out = self.outcome
        out.redis_connections_peak = 0
        by_node: dict[int, int] = {}
        out.redis_connections_peak_by_node = by_node
        while not stop.is_set():
            counts = await self._store_clients()
            out.redis_connections_peak = max(out.redis_connections_peak, sum(counts.values()))
            for port, count in counts.items():
                by_node[port] = max(by_node.get(port, 0), count)
            out.redis_connections_peak_per_node = max(by_node.values())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), REDIS_SAMPLE_PERIOD)

    def _report_burst(self, before: _Reading, after: _Reading) -> None:
        out, res = self.outcome, self.result
        out.streams, out.errors, out.error_samples = res.streams, res.errors, res.error_samples
        out.connections = res.connections
        sends = [stream.sent_at for stream in self._streams if stream.number]
        if sends:
            out.send_spread_ms = round((max(sends) - min(sends)) * 1000, 2)
        if self._last_end:
            out.burst_seconds = round(self._last_end - before.at, 3)
        out.chunks = self.window_chunks
        if self.firsts:
            ttfts = sorted(first - sent for sent, first in self.firsts)
            out.ttft_p50_ms = round(percentile(ttfts, 50) * 1000, 2)
            out.ttft_p90_ms = round(percentile(ttfts, 90) * 1000, 2)
            out.ttft_last_ms = round(ttfts[-1] * 1000, 2)
            sent, first = zip(*self.firsts, strict=True)
            correlation = rank_correlation(sent, first)
            out.rank_correlation = None if correlation is None else round(correlation, 3)
        per_chunk = 1e6 / self.window_chunks if self.window_chunks else float("nan")
        worker = None
        if after.worker is not None and before.worker is not None:
            worker = after.worker - before.worker
            out.burst_cpu_ms = round(worker * 1000, 1)
            out.server_cpu_us_per_stream = round(worker * 1e6 / self.spec.concurrency, 1)
            out.server_cpu_us_per_chunk = round(worker * per_chunk, 1)
        if self._start_at is not None:
            out.start_ms = round((self._start_at - before.at) * 1000, 1)
        if self._start_cpu is not None and before.worker is not None:
            out.start_cpu_ms = round((self._start_cpu - before.worker) * 1000, 1)
        if self._first_cpu and before.worker is not None:
            median = percentile(sorted(self._first_cpu), 50) - before.worker
            out.first_token_cpu_p50_ms = round(median * 1000, 1)
        upstream = None
        if after.upstream is not None and before.upstream is not None:
            upstream = after.upstream - before.upstream
            out.upstream_cpu_us_per_chunk = round(upstream * per_chunk, 1)
        own = after.own - before.own
        out.loadgen_cpu_us_per_chunk = round(own * per_chunk, 1)
        # What kept the machine busy besides this run's processes: well above zero, the
        # run shared the CPUs and its latencies are not to be trusted.
        master = after.master - before.master if after.master and before.master else 0.0
        ours = own + (worker or 0.0) + master + (upstream or 0.0) + after.redis - before.redis
        seconds = max(after.at - before.at, 1e-3)
        out.other_cpu_cores = round(max(0.0, after.busy - before.busy - ours) / seconds, 2)
        if out.rss_open_kb is not None and out.rss_idle_kb is not None:
            per_stream = (out.rss_open_kb - out.rss_idle_kb) / self.spec.concurrency
            out.memory_per_stream_kb = round(per_stream, 1)


def ranks(values: Sequence[float]) -> list[float]:
    """Each value's rank among ``values``, from 1; equal values share their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            result[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return result


def rank_correlation(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's ρ: the Pearson correlation of the ranks of ``xs`` and ``ys`` (paired).
    None for fewer than two pairs, or when either side is all one value."""
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} values against {len(ys)}: rank correlation pairs them")
    if len(xs) < 2:
        return None
    rx, ry = ranks(xs), ranks(ys)
    mean = (len(xs) + 1) / 2  # of the ranks 1..n, ties or not
    covariance = sum((a - mean) * (b - mean) for a, b in zip(rx, ry, strict=True))
    spread_x = sum((a - mean) ** 2 for a in rx)
    spread_y = sum((b - mean) ** 2 for b in ry)
    if not spread_x or not spread_y:
        return None
    return float(covariance / (spread_x * spread_y) ** 0.5)


def main(argv: Sequence[str] | None = None) -> int:
    spec = parse_spec(argv, "B streams at once on new connections; prints JSON.")
    procs.raise_nofile_limit()

    async def burst() -> BurstResult:
        return await BurstGenerator(spec).burst()

    json.dump(asdict(asyncio.run(burst())), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
