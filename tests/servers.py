"""Real server processes for tests: gunicorn running stageserver, on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


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


class Gunicorn:
    """stageserver under gunicorn's gevent worker, configured through the environment."""

    def __init__(
        self, env: Mapping[str, str], *, workers: int = 1, port: int | None = None
    ) -> None:
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
            [str(VENV_BIN / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT,
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

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()
