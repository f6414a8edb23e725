"""What every fault measures, and how: the outcome row, a worker seen from outside, the
settling wait, and the machine's other load.

A worker is read from ``/proc`` and from its own ``/metrics``:

- greenlets: ``stageserver_open_responses`` + ``stageserver_active_streams``. The
  responses following a stage and the stages running are what hold greenlets (and
  descriptors); each should be 0 once every client has its end.
- descriptors: ``/proc/<pid>/fd``, each socket told apart by its peer through
  ``/proc/<pid>/net/tcp``: a client's (its local port is the server's), an upstream's
  (its peer is the fake upstream), the store's (its peer is a redis-server or a
  sentinel), or anything else. The baseline is taken before the fault, without the
  upstream and client sockets of that moment: idle upstream connections are closed by the
  pool's reaper after its keep-alive expiry, so the pool's floor is none, and what is
  left above the baseline is a leak or another pool's floor (redis-py keeps the
  connections it opened).
- RSS: ``VmRSS`` of the worker, minus the baseline's.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import requests

from bench import procs
from stageserver.upstream.transport.connections import KEEPALIVE_EXPIRY, SWEEP_SECONDS
from testing.servers import Gunicorn

# The wait before what is left over is read: past the upstream pool's keep-alive expiry
# and one more period of its reaper, with a second to spare on a shared machine.
SETTLE_SECONDS = KEEPALIVE_EXPIRY + SWEEP_SECONDS + 1.0

_GREENLET_METRICS = ("stageserver_open_responses", "stageserver_active_streams")
_LISTEN = "0A"  # a TCP socket's state in /proc/net/tcp: listening


@dataclass
class Leftover:
    """What a fault left in the surviving worker(s) after settling."""

    greenlets: int
    descriptors: int
    detail: str  # the descriptors above the baseline, by kind, e.g. "redis +3"
    rss_kb: int
    upstream_connections: int


@dataclass
class Outcome:
    """One row of the table, and what did not go as it must."""

    fault: str
    happened: str = ""
    time_to_terminal: float | None = None
    leftover: Leftover | None = None
    other_load: float | None = None
    problems: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # more to say below the table

    def check(self, condition: bool, problem: str) -> bool:
        if not condition:
            self.problems.append(problem)
        return condition


@dataclass
class Snapshot:
    """A worker's descriptors, by kind, and its RSS."""

    kinds: Counter[str]
    rss_kb: int


class WorkerProbe:
    """A gunicorn instance's (newest) worker, seen from outside."""

    def __init__(
        self, server: Gunicorn, upstream_port: int, store_ports: Collection[int] = (),
        name: str = "",
    ) -> None:  # fmt: skip
        """``name``: how the table tells this worker from another's, if there are two."""
        self.server = server
        self.name = name
        self.upstream_port = upstream_port
        self.store_ports = set(store_ports)
        self.pid = server.worker_pids()[-1]
        self.baseline = self.snapshot()

    def follow_new_worker(self, timeout: float = 30.0) -> None:
        """The worker was replaced: read the new one, against the old one's baseline (a
        fresh worker of the same configuration)."""
        old = self.pid
        deadline = time.monotonic() + timeout
        while (pids := self.server.worker_pids())[-1] == old:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no worker replaced {old} within {timeout:g} s")
            time.sleep(0.05)
        self.pid = pids[-1]
        wait_until(lambda: _answers(self.server.url), 20)

    def snapshot(self) -> Snapshot:
        return Snapshot(self._descriptors(), procs.rss_kb([self.pid]))

    def greenlets(self) -> int:
        text = requests.get(f"{self.server.url}/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in _GREENLET_METRICS:
                total += float(line.rsplit(" ", 1)[1])
        return round(total)

    def leftover(self) -> tuple[int, Counter[str], int]:
        """Descriptors above the baseline floor (its upstream and client sockets not
        counted), the same by kind, and the RSS delta in KB."""
        now = self.snapshot()
        floor = self.baseline.kinds.copy()
        floor["upstream"] = floor["client"] = 0
        diff = Counter({k: now.kinds[k] - floor[k] for k in now.kinds | floor})
        return sum(diff.values()), diff, now.rss_kb - self.baseline.rss_kb

    def _descriptors(self) -> Counter[str]:
        peers = procs.socket_peers(self.pid)
        server_port = self.server.port
        kinds: Counter[str] = Counter()
        fd_dir = Path(f"/proc/{self.pid}/fd")
        for name in _listdir(fd_dir):
            with contextlib.suppress(OSError):
                target = os.readlink(fd_dir / name)
                match = re.fullmatch(r"socket:\[(\d+)\]", target)
                if match is None:
                    kinds["file" if target.startswith("/") else "other"] += 1
                    continue
                local, remote, state = peers.get(int(match[1]), (0, 0, ""))
                if state == _LISTEN:
                    kinds["listen"] += 1
                elif remote == self.upstream_port:
                    kinds["upstream"] += 1
                elif remote in self.store_ports:
                    kinds["redis"] += 1
                elif local == server_port:
                    kinds["client"] += 1
                else:
                    kinds["socket"] += 1
        return kinds


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _answers(url: str) -> bool:
    try:
        return requests.get(f"{url}/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def wait_until(predicate: Callable[[], bool], timeout: float, every: float = 0.05) -> float | None:
    """Seconds until ``predicate()`` held (polled every ``every``); None if it never did."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            return None
        time.sleep(every)


def settle(
    outcome: Outcome, probes: list[WorkerProbe], upstream_connections: Callable[[], int]
) -> None:
    """Wait ``SETTLE_SECONDS``, then read what is left over in ``probes``' workers."""
    time.sleep(SETTLE_SECONDS)
    greenlets = descriptors = rss = 0
    kinds: Counter[str] = Counter()
    details = []
    for probe in probes:
        greenlets += probe.greenlets()
        count, by_kind, rss_delta = probe.leftover()
        descriptors += count
        kinds.update(by_kind)
        rss += rss_delta
        mine = ", ".join(f"{k} {v:+d}" for k, v in sorted(by_kind.items()) if v)
        if mine:
            details.append(f"{probe.name}: {mine}" if probe.name else mine)
    detail = "; ".join(details)
    outcome.leftover = Leftover(greenlets, descriptors, detail, rss, upstream_connections())
    outcome.check(greenlets == 0, f"{greenlets} responses or stages still open after settling")
    leaked = {k: v for k, v in kinds.items() if v > 0 and k != "redis"}  # redis: its pool
    outcome.check(not leaked, f"descriptors left above the baseline: {leaked}")
    outcome.check(
        outcome.leftover.upstream_connections == 0,
        f"{outcome.leftover.upstream_connections} upstream connections still open",
    )


class LoadMeter:
    """The cores that something other than this process and its children kept busy."""

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float]:
        ours = procs.cpu_seconds(procs.tree(os.getpid()))
        return time.monotonic(), procs.machine_busy_seconds(), ours

    def cores(self) -> float:
        (t0, busy0, ours0), (t1, busy1, ours1) = self._start, self._read()
        # A child that exited took its CPU time with it: "other" errs on the high side.
        return round(max(0.0, (busy1 - busy0) - (ours1 - ours0)) / max(t1 - t0, 1e-3), 2)


def fault_settings(upstream_url: str, **extra: str) -> dict[str, str]:
    """Every timeout small enough that a fault plays out in seconds."""
    return {
        "STAGESERVER_UPSTREAM_URL": upstream_url,
        "STAGESERVER_OWNER_LEASE_SECONDS": "1",
        "STAGESERVER_HEARTBEAT_SECONDS": "1",
        "STAGESERVER_SEND_TIMEOUT_SECONDS": "2",
        "STAGESERVER_SSE_RETRY_MS": "500",
        "STAGESERVER_GRACEFUL_TIMEOUT": "3",
        **extra,
    }


def check_logs(outcome: Outcome, *servers: Gunicorn) -> None:
    for server in servers:
        tracebacks = server.log().count("Traceback")
        outcome.check(tracebacks == 0, f"{tracebacks} tracebacks in {server.log_path}")


def warm(*servers: Gunicorn) -> None:
    """One stage and one scrape on each server, so that what a worker makes on first use
    (its upstream client, its store connection, the metrics collector) is in the
    baseline."""
    for server in servers:
        body = {
            "stage_id": f"warm-{os.urandom(4).hex()}",
            "model_name": "fake",
            "user_prompt": "hi",
        }
        response = requests.post(f"{server.url}/chat", json=body, timeout=30)
        if response.status_code != 200:
            raise RuntimeError(f"the warm-up stage failed: {response.status_code} {response.text}")
        requests.get(f"{server.url}/metrics", timeout=10)


@dataclass
class Rig:
    """A fault's gunicorn instances, warmed up, a probe on each one's worker, and the
    machine's other load counted from the moment they were ready."""

    servers: list[Gunicorn]
    probes: list[WorkerProbe]
    upstream_connections: Callable[[], int]
    meter: LoadMeter

    @property
    def server(self) -> Gunicorn:
        return self.servers[0]

    @property
    def probe(self) -> WorkerProbe:
        return self.probes[0]

    def settle(self, outcome: Outcome) -> None:
        settle(outcome, self.probes, self.upstream_connections)

    def finish(
        self, outcome: Outcome, *, settled: bool = False, logs: Sequence[Gunicorn] | None = None
    ) -> None:
        """What is left over (unless ``settled`` already), the other load, and no
        traceback in the ``logs`` of the servers (all of them by default)."""
        if not settled:
            self.settle(outcome)
        outcome.other_load = self.meter.cores()
        check_logs(outcome, *(self.servers if logs is None else logs))


def start_rig(
    stack: ExitStack, upstream_url: str, upstream_port: int,
    upstream_connections: Callable[[], int], *, names: Sequence[str] = ("",),
    store_ports: Collection[int] = (), **settings: str,
) -> Rig:  # fmt: skip
    """One gunicorn instance per name (stopped with ``stack``), with ``fault_settings``
    and ``settings``, each warmed up and probed."""
    env = fault_settings(upstream_url, **settings)
    servers = []
    for _ in names:
        server = Gunicorn(env)
        stack.callback(server.stop)
        servers.append(server)
    warm(*servers)
    probes = [
        WorkerProbe(server, upstream_port, store_ports, name)
        for server, name in zip(servers, names, strict=True)
    ]
    return Rig(servers, probes, upstream_connections, LoadMeter())
