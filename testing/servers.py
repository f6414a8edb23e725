"""Real server processes for tests and benchmarks, each on a free loopback port: gunicorn
running stageserver, nginx running the shipped deploy/nginx.conf, redis-server (several
gunicorn workers need the shared store), and prometheus with deploy/prometheus's files.

nginx and redis-server run as non-daemon children with every file they write in a
temporary directory, so they work as root or not and leave nothing behind.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from stageserver.launcher.supervisor import GUNICORN_ARGS

__all__ = [
    "NGINX",
    "ROOT",
    "VENV_BIN",
    "Gunicorn",
    "Nginx",
    "Prometheus",
    "RedisClusterGroup",
    "RedisServer",
    "free_cluster_port",
    "free_port",
    "gunicorn_server",
    "site_conf",
    "stop_process",
    "wait_for_http",
]

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
SHIPPED_CONF = ROOT / "deploy" / "nginx.conf"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_http(
    url: str, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def stop_process(proc: subprocess.Popen[bytes], signum: int = signal.SIGTERM) -> None:
    """Send ``signum``; kill it if it has not exited 15 s later."""
    if proc.poll() is None:
        proc.send_signal(signum)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{_read(log)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{what} did not listen on {port} within 10 s:\n{_read(log)}")


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


class Gunicorn:
    """stageserver under gunicorn's gevent worker, configured through the environment."""

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        workers: int = 1,
        port: int | None = None,
        root: Path = ROOT,
        args: Sequence[str] | None = None,
    ) -> None:
        """``root``: the checkout to run (another revision's, for a benchmark); ``args``:
        gunicorn's, when not the package's config and app (``gunicorn_args``)."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = ROOT / ".pytest_cache" / f"gunicorn-{self.port}.log"
        self.log_path.parent.mkdir(exist_ok=True)
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("STAGESERVER_")},
            "STAGESERVER_BIND": f"127.0.0.1:{self.port}",
            "STAGESERVER_WORKERS": str(workers),
            **env,
        }
        # Append mode: several workers write to it at once, each line in one write.
        self.log_path.write_bytes(b"")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "python"), "-m", "gunicorn", *(args or gunicorn_args(root))],
            cwd=root,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_http(self.url + "/stages/-", proc=self.proc)
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"gunicorn did not start:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def worker_pids(self) -> list[int]:
        """The workers gunicorn has booted, in order (the newest last)."""
        return [int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", self.log())]

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


@contextmanager
def gunicorn_server(
    env: Mapping[str, str], *, workers: int = 1, forbid: Sequence[str] = ("Traceback",)
) -> Iterator[Gunicorn]:
    """gunicorn with ``env``, stopped when the block ends. If the block did not raise, its
    log must then contain none of ``forbid``; a failure shows the whole log. (A block that
    raised has its own failure to show.)"""
    server = Gunicorn(env, workers=workers)
    try:
        yield server
    finally:
        server.stop()
    log = server.log()
    found = [sign for sign in forbid if sign in log]
    assert not found, f"gunicorn's log has {found}:\n{log}"


def site_conf(upstream_port: int, listen_port: int, proxy_read_timeout: str | None) -> str:
    """deploy/nginx.conf with its addresses (and optionally its read timeout) replaced.
    Each replaced directive must occur exactly once, so a change to the shipped file's
    shape fails here instead of silently testing something else."""
    text = SHIPPED_CONF.read_text()
    edits = [
        (r"server 127\.0\.0\.1:8000;", f"server 127.0.0.1:{upstream_port};"),
        (r"listen 80;", f"listen 127.0.0.1:{listen_port};"),
    ]
    if proxy_read_timeout is not None:
        edits.append((r"proxy_read_timeout \w+;", f"proxy_read_timeout {proxy_read_timeout};"))
    for pattern, replacement in edits:
        text, count = re.subn(pattern, replacement, text)
        assert count == 1, f"deploy/nginx.conf: expected one {pattern!r}, found {count}"
    return text


class Nginx:
    """Debian's nginx with the shipped site file, in front of ``upstream_port``."""

    def __init__(self, upstream_port: int, *, proxy_read_timeout: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="stageserver-nginx-"))
        site = self.dir / "stageserver.conf"
        site.write_text(site_conf(upstream_port, self.port, proxy_read_timeout))
        temp_paths = "\n".join(
            f"    {kind}_temp_path {self.dir / kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        main = self.dir / "nginx.conf"
        main.write_text(
            # As root, nginx's workers would switch to `nobody`, who cannot enter the
            # private temp dir; they keep running as root instead.
            ("user root;\n" if os.geteuid() == 0 else "")
            + "worker_processes 1;\n"
            + "events { worker_connections 1024; }\n"
            + "http {\n"
            + f"    access_log {self.dir / 'access.log'};\n"
            + f"{temp_paths}\n"
            + f"    include {site};\n"
            + "}\n"
        )
        self.error_log = self.dir / "error.log"
        self.proc = subprocess.Popen(
            [
                NGINX,
                "-p", str(self.dir),
                "-c", str(main),
                "-e", str(self.error_log),
                "-g", f"daemon off; pid {self.dir / 'nginx.pid'}; error_log {self.error_log} info;",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            _wait_for_port(self.port, self.proc, "nginx", self.error_log)
        except RuntimeError:
            self.stop()
            raise

    def log(self) -> str:
        return _read(self.error_log)

    def access_log(self) -> str:
        return _read(self.dir / "access.log")

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGTERM)  # nginx's fast shutdown
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Nginx:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class RedisServer:
    """A throwaway redis-server: no persistence, loopback only. ``kill()`` and ``start()``
    again on the same port make a restart. ``replica_of``: a port to replicate. ``port``:
    the port to listen on (a free one by default); ``args``: more of redis-server's
    options."""

    def __init__(
        self,
        *,
        replica_of: int | None = None,
        port: int | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = Path(tempfile.mkdtemp(prefix="stageserver-redis-"))
        self._replica_of = replica_of
        self._args = tuple(args)
        self.start()

    def start(self) -> None:
        log = self.dir / "redis.log"
        replica = ["--replicaof", "127.0.0.1", str(self._replica_of)] if self._replica_of else []
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.dir),
                "--logfile", str(log),
                *replica,
                *self._args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            _wait_for_port(self.port, self.proc, "redis-server", log)
        except RuntimeError:
            self.stop()
            raise

    def log(self) -> str:
        return _read(self.dir / "redis.log")

    def kill(self) -> None:
        stop_process(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGTERM)
        shutil.rmtree(self.dir, ignore_errors=True)


REDIS_SENTINEL = shutil.which("redis-sentinel") or "/usr/bin/redis-sentinel"


class SentinelGroup:
    """Debian's redis-server and redis-sentinel on loopback: one primary, one replica and
    three sentinels watching them as ``mymaster`` (quorum 2, a primary is down after 1 s
    of silence). ``url`` is the ``redis+sentinel://`` form stageserver takes."""

    SERVICE = "mymaster"

    def __init__(self) -> None:
        self.primary = RedisServer()
        self.replica = RedisServer(replica_of=self.primary.port)
        self.dir = Path(tempfile.mkdtemp(prefix="stageserver-sentinel-"))
        self.sentinels: list[subprocess.Popen[bytes]] = []
        self.ports = [free_port() for _ in range(3)]
        try:
            for port in self.ports:
                self.sentinels.append(self._sentinel(port))
        except BaseException:
            self.stop()
            raise
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.ports)
        self.url = f"redis+sentinel://{hosts}/{self.SERVICE}/0"
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        """The replica in sync, and every sentinel knowing it: a failover can happen."""
        import redis

        deadline = time.monotonic() + 30
        replica = redis.Redis(port=self.replica.port, socket_timeout=2)
        try:
            while True:
                link = replica.info("replication").get("master_link_status")
                known = [
                    redis.Redis(port=port, socket_timeout=2).execute_command(  # type: ignore[no-untyped-call]
                        "SENTINEL", "REPLICAS", self.SERVICE
                    )
                    for port in self.ports
                ]
                if link == "up" and all(known):
                    return
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"sentinels not ready: link {link}, replicas {known}")
                time.sleep(0.2)
        finally:
            replica.close()

    def _sentinel(self, port: int) -> subprocess.Popen[bytes]:
        conf = self.dir / f"sentinel-{port}.conf"  # sentinel rewrites it: its own file
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"logfile {self.dir / f'sentinel-{port}.log'}\n"
            f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.primary.port} 2\n"
            f"sentinel down-after-milliseconds {self.SERVICE} 1000\n"
            f"sentinel failover-timeout {self.SERVICE} 5000\n"
            f"sentinel parallel-syncs {self.SERVICE} 1\n"
        )
        proc = subprocess.Popen(
            [REDIS_SENTINEL, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        _wait_for_port(port, proc, "redis-sentinel", self.dir / f"sentinel-{port}.log")
        return proc

    def primary_port(self) -> int:
        """The port the sentinels now name as the primary's."""
        import redis

        client = redis.Redis(port=self.ports[0], socket_timeout=2)
        try:
            _, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.SERVICE)  # type: ignore[no-untyped-call]
        finally:
            client.close()
        return int(port)

    def stop(self) -> None:
        for proc in self.sentinels:
            stop_process(proc, signal.SIGTERM)
        self.replica.stop()
        self.primary.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
#: A cluster node's bus listens on its port + 10000, which must be a port too.
CLUSTER_BUS_OFFSET = 10000
CLUSTER_PORT_MAX = 65535 - CLUSTER_BUS_OFFSET


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port(taken: Sequence[int] = ()) -> int:
    """A free loopback port for a Redis Cluster node, at or below 55535, whose bus port
    (10000 above it) is free too; none of ``taken``, nor their bus ports. Drawn below
    the kernel's ephemeral range where it can be, so that no outgoing connection takes
    it between this check and the node's start."""
    low = 10000
    high = CLUSTER_PORT_MAX
    try:
        first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        first_ephemeral = 0
    if first_ephemeral - CLUSTER_BUS_OFFSET - 1 > low + 1000:
        high = min(high, first_ephemeral - CLUSTER_BUS_OFFSET - 1)
    avoid = {p + d for p in taken for d in (0, CLUSTER_BUS_OFFSET, -CLUSTER_BUS_OFFSET)}
    for _ in range(1000):
        port = random.randint(low, high)
        if port in avoid:
            continue
        if _bindable(port) and _bindable(port + CLUSTER_BUS_OFFSET):
            return port
    raise RuntimeError(f"no port in {low}..{high} with its bus port free, after 1000 tries")


class RedisClusterGroup:
    """A Redis Cluster on loopback: ``primaries`` primaries, each with
    ``replicas_per_primary`` replicas, made by ``redis-cli --cluster create``; a node
    is failed after 1 s of silence, and its replica always stands for election.
    ``url`` is the ``redis+cluster://`` form stageserver takes. A context manager."""

    def __init__(self, primaries: int = 3, replicas_per_primary: int = 0) -> None:
        if not Path(REDIS_CLI).exists():
            raise RuntimeError(f"{REDIS_CLI} is missing: install Debian's redis-tools")
        self.nodes: list[RedisServer] = []
        self.replicas_per_primary = replicas_per_primary
        try:
            for _ in range(primaries * (1 + replicas_per_primary)):
                port = free_cluster_port([node.port for node in self.nodes])
                self.nodes.append(RedisServer(port=port, args=self._cluster_args(port)))
            self.ports = [node.port for node in self.nodes]
            # Every node a seed: stageserver finds the cluster through any that lives.
            self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)
            self._create()
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def _cluster_args(port: int) -> list[str]:
        return [
            "--cluster-enabled", "yes",
            "--cluster-config-file", f"nodes-{port}.conf",  # in the node's own --dir
            "--cluster-node-timeout", "1000",
            # A replica stands for election however long its link has been down: a
            # failover never waits for an operator.
            "--cluster-replica-validity-factor", "0",
        ]  # fmt: skip

    def _create(self) -> None:
        replicas = (
            ["--cluster-replicas", str(self.replicas_per_primary)]
            if self.replicas_per_primary
            else []
        )
        result = subprocess.run(
            [
                REDIS_CLI, "--cluster", "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                *replicas,
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )  # fmt: skip
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise RuntimeError(f"redis-cli --cluster create failed:\n{output}")

    def client(self, port: int) -> Any:
        """A plain client of one node (redis-py types results loosely)."""
        import redis

        return redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=2)

    def _wait_until_ready(self) -> None:
        """Every node knows every other and reports ``cluster_state:ok``; every replica's
        link to its primary is up."""
        deadline = time.monotonic() + 30
        while True:
            states = {port: self._state(port) for port in self.ports}
            if all(state == "ok" for state in states.values()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster is not ready within 30 s: {states}")
            time.sleep(0.1)

    def _state(self, port: int) -> str:
        """``ok``, or what is not yet."""
        client = self.client(port)
        try:
            info = client.cluster("INFO")
            if info.get("cluster_state") != "ok":
                return f"cluster_state:{info.get('cluster_state')}"
            if int(info.get("cluster_known_nodes", 0)) != len(self.ports):
                return f"cluster_known_nodes:{info.get('cluster_known_nodes')}"
            replication = client.info("replication")
            if replication.get("role") == "slave":
                if replication.get("master_link_status") != "up":
                    return f"master_link_status:{replication.get('master_link_status')}"
            return "ok"
        except Exception as exc:  # noqa: BLE001 - a node still starting: not ready yet
            return repr(exc)
        finally:
            client.close()

    def node(self, port: int) -> RedisServer:
        [node] = [node for node in self.nodes if node.port == port]
        return node

    def live_ports(self) -> list[int]:
        return [node.port for node in self.nodes if node.proc.poll() is None]

    def node_id(self, port: int) -> str:
        client = self.client(port)
        try:
            return str(client.execute_command("CLUSTER", "MYID").decode())
        finally:
            client.close()

    def slots(self) -> list[tuple[int, int, int]]:
        """``(first, last, primary's port)`` per slot range, as a live node sees them."""
        ranges: list[tuple[int, int, int]] = []
        for port in self.live_ports():
            client = self.client(port)
            try:
                reply = client.execute_command("CLUSTER", "SLOTS")
            except Exception:  # noqa: BLE001, S112 - another live node may answer
                continue
            finally:
                client.close()
            # [[first, last, [host, port, id, ...], replica, ...], ...]
            for first, last, primary, *_ in reply:
                ranges.append((int(first), int(last), int(primary[1])))
            return sorted(ranges)
        raise RuntimeError("no live cluster node answers CLUSTER SLOTS")

    def primary_for_slot(self, slot: int) -> int:
        """The port of the primary that serves ``slot`` now."""
        for first, last, port in self.slots():
            if first <= slot <= last:
                return port
        raise RuntimeError(f"no node serves slot {slot}")

    def primaries(self) -> list[int]:
        """The ports of the primaries that serve slots now."""
        return sorted({port for _, _, port in self.slots()})

    def replicas_of(self, port: int) -> list[int]:
        """The ports of the live nodes that replicate the primary on ``port``."""
        replicas = []
        for other in self.live_ports():
            client = self.client(other)
            try:
                info = client.info("replication")
                if info.get("role") == "slave" and int(info.get("master_port", 0)) == port:
                    replicas.append(other)
            finally:
                client.close()
        return replicas

    def kill(self, port: int) -> None:
        """SIGKILL the node on ``port``."""
        self.node(port).kill()

    def stop(self) -> None:
        """Every node stopped and its directory removed; again does nothing more."""
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisClusterGroup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def gunicorn_args(root: Path) -> tuple[str, ...]:
    """gunicorn's config and app in the checkout ``root``: the package's own, or, in a
    revision from before the package held them, the files at its top."""
    if (root / "stageserver" / "gunicorn_conf.py").exists():
        return GUNICORN_ARGS
    return ("-c", "gunicorn.conf.py", "wsgi:app")


PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


class Prometheus:
    """Debian's prometheus on a free loopback port, its data in a temporary directory.
    ``config``: the text of its configuration file, written into ``dir`` beside any
    ``files`` (name -> text: the rule files it names)."""

    def __init__(self, config: str, files: Mapping[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="stageserver-prometheus-"))
        for name, text in {"prometheus.yml": config, **(files or {})}.items():
            (self.dir / name).write_text(text)
        self.log_path = self.dir / "prometheus.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={self.dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            cwd=self.dir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while not self._ready():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"prometheus did not start:\n{self.log()}")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        try:
            return requests.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def api(self, path: str, **params: str) -> Any:
        """The ``data`` of an answer of its HTTP API (``/api/v1/<path>``)."""
        response = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]

    def log(self) -> str:
        return _read(self.log_path)

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGTERM)
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
