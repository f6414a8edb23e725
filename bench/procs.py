"""The processes under test: how each is started, and what it costs, read from /proc.

CPU time is the sum of ``/proc/<pid>/task/<tid>/schedstat`` (nanoseconds on a CPU, user and
system together) over every thread of every process in a tree: the same quantity as
``utime + stime`` in ``/proc/<pid>/stat``, without its 10 ms granularity, which would blur
a window of a few seconds at low concurrency.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from testing.servers import (
    NGINX,
    ROOT,
    Gunicorn,
    RedisClusterGroup,
    RedisServer,
    free_port,
    stop_process,
    wait_for_http,
)

__all__ = [
    "ROOT",
    "Direct",
    "FakeUpstreamProcess",
    "Nginx",
    "Plain",
    "Stageserver",
    "connections_to",
    "cpu_seconds",
    "machine",
    "machine_busy_seconds",
    "raise_nofile_limit",
    "rss_kb",
    "socket_peers",
    "tree",
    "workers",
]

_TICK = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (a gunicorn or nginx master and its workers)."""
    found = [pid]
    for parent in found:  # grows while it is walked: breadth first
        for task in _listdir(f"/proc/{parent}/task"):
            with contextlib.suppress(OSError):
                found.extend(
                    int(c) for c in Path(f"/proc/{parent}/task/{task}/children").read_text().split()
                )
    return found


def workers(pid: int) -> list[int]:
    """The descendants of a master process (gunicorn's or nginx's workers), without it."""
    return tree(pid)[1:]


def cpu_seconds(pids: Iterable[int]) -> float:
    total = 0.0
    for pid in pids:
        if not os.path.exists(f"/proc/{pid}/schedstat"):  # a kernel without SCHED_INFO
            total += _stat_ticks(pid) / _TICK
            continue
        for task in _listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError):  # a thread that just ended
                schedstat = Path(f"/proc/{pid}/task/{task}/schedstat").read_text()
                total += int(schedstat.split()[0]) / 1e9
    return total


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent on anything but idling, since boot (/proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICK


def rss_kb(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def open_fds(pids: Iterable[int]) -> int:
    """The open descriptors of ``pids``, summed (``/proc/<pid>/fd``)."""
    return sum(len(_listdir(f"/proc/{pid}/fd")) for pid in pids)


def socket_peers(pid: int) -> dict[int, tuple[int, int, str]]:
    """inode -> (local port, remote port, state) of every TCP socket in ``pid``'s network
    namespace (``/proc/<pid>/net/tcp`` and ``tcp6``), whoever holds it."""
    peers: dict[int, tuple[int, int, str]] = {}
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                cols = line.split()
                local, remote, state, inode = cols[1], cols[2], cols[3], int(cols[9])
                peers[inode] = (
                    int(local.rsplit(":", 1)[1], 16),
                    int(remote.rsplit(":", 1)[1], 16),
                    state,
                )
    return peers


def socket_inodes(pid: int) -> list[int]:
    """The inodes of the sockets among ``pid``'s open descriptors (``/proc/<pid>/fd``)."""
    inodes = []
    fd_dir = f"/proc/{pid}/fd"
    for name in _listdir(fd_dir):
        with contextlib.suppress(OSError):  # a descriptor closed while it was listed
            target = os.readlink(f"{fd_dir}/{name}")
            if target.startswith("socket:["):
                inodes.append(int(target[8:-1]))
    return inodes


def connections_to(pids: Iterable[int], ports: Iterable[int]) -> dict[int, int]:
    """How many TCP sockets ``pids`` hold whose peer is each of ``ports`` on this host:
    port -> count, in any state (a socket the peer has closed is still held until its
    holder closes it too). Read from ``/proc``, as ``ss -tp`` would, without its cost."""
    wanted = set(ports)
    counts = dict.fromkeys(wanted, 0)
    for pid in pids:
        peers = socket_peers(pid)
        for inode in socket_inodes(pid):
            peer = peers.get(inode)
            if peer is not None and peer[1] in wanted:
                counts[peer[1]] += 1
    return counts


def _stat_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime, stime


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {
        "cpus": str(os.cpu_count()),
        "cpu_model": model,
        "ram_gib": f"{mem_kb / 1024 / 1024:.1f}",
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
    }


def raise_nofile_limit() -> None:
    """Thousands of streams need thousands of descriptors in every process (inherited)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class FakeUpstreamProcess:
    """``python -m testing.fake_upstream`` on a free port: the upstream every target reads."""

    def __init__(self) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "testing.fake_upstream", "--port", str(self.port)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"the fake upstream did not start: {line!r}")
        self.url = line.split()[1]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        _stop(self.proc)


class Stageserver:
    """stageserver under gunicorn: one gevent worker, limits raised for 2,000 streams
    (connections per worker, pooled upstream connections, admitted streams).

    No access log: a line per stream is CPU that the other targets do not spend (nginx
    runs with ``access_log off`` too). stageserver's own line per stage stays, as
    deployed; everything else is at its defaults.
    """

    name = "stageserver"
    # The key of the one principal a ``keys`` target has: a secret of the benchmark only.
    API_KEY = "bench-key-0123456789"

    def __init__(
        self,
        upstream_url: str,
        *,
        shared_store: bool = False,
        cluster: bool = False,
        follower: bool = False,
        keys: bool = False,
        transport: str | None = None,
        replicas: Sequence[str] = (),
        root: Path = ROOT,
        path: str = "/chat",
        flush_window: float | None = None,
    ) -> None:
        """``shared_store``: with a redis-server of its own as the stage store, to see
        what mirroring every event into Redis costs the relay. The server CPU measured
        is still gunicorn's alone; redis-server's own is measured apart (``redis_nodes``:
        each node's port and pid). ``cluster``: the store a Redis Cluster of three
        primaries instead (``redis+cluster://``). ``follower``: a second gunicorn on the
        same store (``follow_port``, ``follow_pid``), through which the load generator
        follows every stage the first one runs. ``keys``: one
        principal, with an API key and limits high enough never to refuse (what
        checking them costs). ``transport``: ``STAGESERVER_UPSTREAM_TRANSPORT``.
        ``replicas``: more URLs of the upstream, which is then a pool (``upstream_url``
        and these), to see what choosing a replica for each stage costs. ``root``: a
        checkout of another revision, to run it side by side. ``path``: the API streamed
        (``/chat``, ``/v1/chat/completions`` or ``/v1/responses``). ``flush_window``:
        the store's, in seconds (``STAGESERVER_STORE_FLUSH_WINDOW_SECONDS``)."""
        self.path = path
        upstream = (
            {"STAGESERVER_UPSTREAMS": json.dumps({"default": {"urls": [upstream_url, *replicas]}})}
            if replicas
            else {"STAGESERVER_UPSTREAM_URL": upstream_url}  # what every revision reads
        )
        env = {
            **upstream,
            "STAGESERVER_WORKER_CONNECTIONS": "3000",
            "STAGESERVER_UPSTREAM_MAX_CONNECTIONS": "3000",
            "STAGESERVER_MAX_ACTIVE_STREAMS": "2900",
            "STAGESERVER_ACCESS_LOG": "",
        }
        self._redis: RedisServer | RedisClusterGroup | None = None
        if cluster:
            self._redis = RedisClusterGroup(primaries=3)
        elif shared_store or follower:
            self._redis = RedisServer()
        #: Every redis-server of the store: (port, pid).
        self.redis_nodes: list[tuple[int, int]] = []
        if isinstance(self._redis, RedisServer):
            self.redis_nodes = [(self._redis.port, self._redis.proc.pid)]
        elif self._redis is not None:
            self.redis_nodes = [(node.port, node.proc.pid) for node in self._redis.nodes]
        if self._redis is not None:
            env["STAGESERVER_STORE_URL"] = self._redis.url
        if flush_window is not None:
            env["STAGESERVER_STORE_FLUSH_WINDOW_SECONDS"] = str(flush_window)
        self.api_key = self.API_KEY if keys else None
        if keys:
            limits = {
                "max_streams": 100_000,
                "requests_per_minute": 10_000_000,
                "tokens_per_minute": 10_000_000_000,
            }
            env["STAGESERVER_API_KEYS"] = json.dumps({"bench": {"key": self.API_KEY, **limits}})
        if transport is not None:
            env["STAGESERVER_UPSTREAM_TRANSPORT"] = transport
        self._follower: Gunicorn | None = None
        try:
            self._server = Gunicorn(env, workers=1, root=root)
            if follower:
                self._follower = Gunicorn(env, workers=1, root=root)
        except BaseException:
            self.stop()
            raise
        self.port = self._server.port
        self.pid = self._server.proc.pid
        self.follow_port = self._follower.port if self._follower is not None else None
        self.follow_pid = self._follower.proc.pid if self._follower is not None else None

    def log(self) -> str:
        log = self._server.log()
        if self._follower is not None:
            log += f"\n--- the following host ---\n{self._follower.log()}"
        return log

    def stop(self) -> None:
        for server in (getattr(self, "_server", None), self._follower):
            if server is not None:
                server.stop()
        if self._redis is not None:
            self._redis.stop()


class Plain:
    """The fixed design written plainly (``bench.plain``) under gunicorn's own gevent worker,
    with the settings ``Stageserver`` gives stageserver's: one worker, 3,000 connections,
    no access log, the same keep-alive. ``bare``: its app without an upstream (the
    ``bare`` target), else the one that relays it through the openai client (``plain``)."""

    path = "/chat"

    def __init__(self, upstream_base: str, *, bare: bool = False) -> None:
        self.name = "bare" if bare else "plain"
        self.port = free_port()
        args = (
            "--worker-class", "gevent", "--workers", "1", "--worker-connections", "3000",
            "--keep-alive", "5", "--bind", f"127.0.0.1:{self.port}",
            f"bench.plain:{self.name}_app",
        )  # fmt: skip
        self._server = Gunicorn(
            {"BENCH_PLAIN_UPSTREAM": f"{upstream_base}/v1"}, port=self.port, args=args
        )
        self.pid = self._server.proc.pid

    def log(self) -> str:
        return self._server.log()

    def stop(self) -> None:
        self._server.stop()


_NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 10000; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp;
    fastcgi_temp_path {dir}/tmp;
    uwsgi_temp_path {dir}/tmp;
    scgi_temp_path {dir}/tmp;
    keepalive_requests 1000000;
    upstream fake {{
        server 127.0.0.1:{upstream_port};
        keepalive 4096;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"""


class Nginx:
    """Debian's nginx, one worker, relaying the fake upstream unbuffered over kept-alive
    HTTP/1.1 connections: what relaying costs when it is done in C."""

    name = "nginx"
    path = "/v1/chat/completions"

    def __init__(self, upstream_port: int, workdir: Path) -> None:
        self.port = free_port()
        workdir = workdir.resolve()
        (workdir / "tmp").mkdir(parents=True, exist_ok=True)
        conf = workdir / "nginx.conf"
        conf.write_text(
            _NGINX_CONF.format(dir=workdir, port=self.port, upstream_port=upstream_port)
        )
        self._errors = workdir / "error.log"
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(workdir), "-c", str(conf), "-e", str(self._errors)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.pid = self.proc.pid
        try:
            wait_for_http(f"http://127.0.0.1:{self.port}/health", proc=self.proc)
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"nginx did not start:\n{self.log()}") from None

    def log(self) -> str:
        return self._errors.read_text(errors="replace") if self._errors.exists() else ""

    def stop(self) -> None:
        _stop(self.proc, signal.SIGQUIT)  # nginx's graceful stop


def checkout(revision: str) -> Path:
    """A checkout of ``revision``, made once in the temporary directory (outside this
    tree, where tools would read it as this project's code): its server runs with this
    checkout's virtualenv."""
    path = Path(tempfile.gettempdir()) / "stageserver-checkouts" / revision
    if not (path / "stageserver").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["git", "worktree", "add", "--detach", "--force", str(path), revision],
            cwd=ROOT, check=True, capture_output=True,
        )  # fmt: skip
    return path


class Direct:
    """No relay: the load generator reads the fake upstream itself (the latency floor)."""

    name = "direct"
    path = "/v1/chat/completions"
    pid: int | None = None

    def __init__(self, upstream_port: int) -> None:
        self.port = upstream_port

    def log(self) -> str:
        return ""

    def stop(self) -> None:
        pass


def _stop(proc: subprocess.Popen[bytes], signum: int = signal.SIGTERM) -> None:
    stop_process(proc, signum)
    if proc.stdout is not None:
        proc.stdout.close()
