"""deploy/systemd/ with systemd's own tools (Debian's ``systemd`` package).

- ``systemd-analyze verify`` passes on both units, silently. It checks that ExecStart's
  binary exists, so it reads a copy of the units, in a temporary directory, whose
  ExecStart names this checkout's virtualenv's gunicorn instead of /opt/stageserver's:
  that path is the one line changed.
- The numbers that must agree: TimeoutStopSec above gunicorn's graceful timeout (the
  settings' default and deploy/systemd/env's); the metrics directory in the
  RuntimeDirectory; the reload a HUP; the hardening in place.
- Socket activation for real: ``systemd-socket-activate`` holds the socket's address and
  runs ExecStart with it, as systemd does; gunicorn serves on that socket and binds
  nothing of its own, the first request waits in the socket's backlog while gunicorn
  starts, and ExecReload's HUP replaces the worker while the socket stays.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from stageserver.settings import PROCESS_SETTINGS
from testing.fake_upstream import FakeUpstream
from testing.servers import ROOT, VENV_BIN, free_port, stop_process
from testing.sse import parse_events, post_chat, terminal

UNITS = ROOT / "deploy" / "systemd"
SHIPPED_GUNICORN = "/opt/stageserver/bin/gunicorn"

Unit = dict[str, dict[str, list[str]]]


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    assert path, f"{name} is missing: apt-get install systemd (scripts/setup.sh --dev does)"
    return path


def parse_unit(text: str) -> Unit:
    """A unit file's sections, each key's values in order (a key may repeat)."""
    unit: Unit = {}
    section: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = unit.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def one(unit: Unit, section: str, key: str) -> str:
    values = unit[section].get(key, [])
    assert len(values) == 1, f"[{section}] {key}: {values}"
    return values[0]


SERVICE = parse_unit((UNITS / "stageserver.service").read_text())
SOCKET = parse_unit((UNITS / "stageserver.socket").read_text())


def env_file() -> dict[str, str]:
    """deploy/systemd/env, the example of /etc/stageserver/env: its settings."""
    pairs = {}
    for line in (UNITS / "env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def rendered_units(directory: Path) -> list[Path]:
    """Copies of both units in ``directory``, ExecStart naming this venv's gunicorn."""
    paths = []
    for name in ("stageserver.socket", "stageserver.service"):
        text = (UNITS / name).read_text()
        if name.endswith(".service"):
            assert text.count(SHIPPED_GUNICORN) == 1, f"{name}: expected one {SHIPPED_GUNICORN}"
            text = text.replace(SHIPPED_GUNICORN, str(VENV_BIN / "gunicorn"))
        (directory / name).write_text(text)
        paths.append(directory / name)
    return paths


@pytest.mark.processes
def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    paths = rendered_units(tmp_path)
    done = subprocess.run(
        [tool("systemd-analyze"), "verify", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = done.stdout + done.stderr
    # It exits 0 on an unknown key, with a warning: any word from it is a failure.
    assert (done.returncode, output) == (0, ""), output


def test_the_stop_timeout_covers_the_graceful_timeout() -> None:
    """systemd SIGKILLs what is left at TimeoutStopSec: it must come after gunicorn's
    graceful timeout (streams finish or are handed off within it), with a margin for the
    arbiter's own exit. KillMode=mixed: the SIGTERM goes to the arbiter alone."""
    timeout = int(one(SERVICE, "Service", "TimeoutStopSec").removesuffix("s"))
    graceful = [
        int(PROCESS_SETTINGS["STAGESERVER_GRACEFUL_TIMEOUT"][0]),
        int(env_file()["STAGESERVER_GRACEFUL_TIMEOUT"]),
    ]
    assert timeout >= max(graceful) + 5, (timeout, graceful)
    assert one(SERVICE, "Service", "KillMode") == "mixed"


def test_the_service_reloads_with_hup_and_keeps_its_metrics_in_its_runtime_directory() -> None:
    assert one(SERVICE, "Service", "ExecReload") == "/bin/kill -s HUP $MAINPID"
    assert one(SERVICE, "Service", "Type") == "notify"  # gunicorn says when it is ready
    assert one(SERVICE, "Unit", "Requires") == "stageserver.socket"
    assert one(SERVICE, "Service", "EnvironmentFile") == "/etc/stageserver/env"
    [metrics_dir] = [
        value.partition("=")[2]
        for value in SERVICE["Service"]["Environment"]
        if value.startswith("PROMETHEUS_MULTIPROC_DIR=")
    ]
    runtime = one(SERVICE, "Service", "RuntimeDirectory").split()
    assert metrics_dir.removeprefix("/run/") in runtime, (metrics_dir, runtime)


def test_the_service_is_hardened() -> None:
    service = SERVICE["Service"]
    expected = {
        "NoNewPrivileges": "true",
        "ProtectSystem": "strict",
        "PrivateTmp": "true",
        "ProtectHome": "true",
        "CapabilityBoundingSet": "",
    }
    assert {key: one(SERVICE, "Service", key) for key in expected} == expected
    assert one(SERVICE, "Service", "User") not in ("", "root")
    assert "ReadWritePaths" not in service  # nothing writable beside its runtime directory


@pytest.mark.processes
def test_gunicorn_serves_on_the_socket_systemd_hands_it_and_reloads_on_hup(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    listen = one(SOCKET, "Socket", "ListenStream")
    assert listen == "127.0.0.1:8000"
    port, unused = free_port(), free_port()
    command = shlex.split(one(SERVICE, "Service", "ExecStart"))
    assert command[0] == SHIPPED_GUNICORN
    command[0] = str(VENV_BIN / "gunicorn")
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    settings = {
        "PATH": os.environ["PATH"],
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "STAGESERVER_UPSTREAM_URL": upstream.url,
        # gunicorn must not bind this one: the socket it is handed replaces it.
        "STAGESERVER_BIND": f"127.0.0.1:{unused}",
    }
    log = tmp_path / "gunicorn.log"
    with open(log, "wb") as output:
        proc = subprocess.Popen(
            [tool("systemd-socket-activate"), "--listen", f"127.0.0.1:{port}"]
            + [f"--setenv={key}={value}" for key, value in settings.items()]
            + command,
            cwd=ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: f"Listening on 127.0.0.1:{port}" in log.read_text(), "the socket", log)
        # The socket listens before gunicorn runs: this first request waits in its
        # backlog while gunicorn starts (systemd-socket-activate starts it now).
        ready = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=60)
        assert (ready.status_code, ready.json()) == (200, {"status": "ok"})
        text = log.read_text()
        assert f"Listening at: http://127.0.0.1:{port}" in text, text
        assert_refused(unused)
        booted = workers(log)
        assert len(booted) == 1

        proc.send_signal(signal.SIGHUP)  # what ExecReload sends
        wait_until(lambda: len(workers(log)) == 2, "a new worker after the HUP", log)
        wait_until(lambda: not alive(booted[0]), "the old worker's exit", log)
        events = parse_events(post_chat(f"http://127.0.0.1:{port}", stage_id="r").content)
        assert terminal(events)[0]["event"] == "done"
    finally:
        stop_process(proc)
    assert proc.returncode == 0, log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()


def workers(log: Path) -> list[int]:
    return [int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", log.read_text())]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def assert_refused(port: int) -> None:
    try:
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    except requests.ConnectionError:
        return
    raise AssertionError(f"gunicorn also listens on STAGESERVER_BIND's port {port}")


def wait_until(predicate: Callable[[], bool], what: str, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log.read_text()}"
        time.sleep(0.05)
