"""The deployment's other real parts, for tests: nginx running the shipped
deploy/nginx.conf, and redis-server (several gunicorn workers need the shared store).

Both run as non-daemon children on 127.0.0.1, with every file they write in a temporary
directory, so they work as root or not and leave nothing behind.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.servers import ROOT, free_port, stop_process

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
SHIPPED_CONF = ROOT / "deploy" / "nginx.conf"


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


class RedisServer:
    """A throwaway redis-server: no persistence, loopback only. ``kill()`` and ``start()``
    again on the same port make a restart."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = Path(tempfile.mkdtemp(prefix="stageserver-redis-"))
        self.start()

    def start(self) -> None:
        log = self.dir / "redis.log"
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.dir),
                "--logfile", str(log),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            _wait_for_port(self.port, self.proc, "redis-server", log)
        except RuntimeError:
            self.stop()
            raise

    def kill(self) -> None:
        stop_process(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGTERM)
        shutil.rmtree(self.dir, ignore_errors=True)
