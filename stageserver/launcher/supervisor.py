"""The supervisor: starts the model server and gunicorn, forwards the model server's
output, notices a signal or a child that died, and stops both in order."""

from __future__ import annotations

import os
import selectors
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType

from .child import Child
from .model import http_answers, model_answers, model_server_command
from .settings import LaunchError, Settings

MODEL_START_TIMEOUT = 180.0  # loading a larger GGUF given in STAGESERVER_EMBEDDED_MODEL_PATH
SERVER_START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
TICK = 0.1
#: gunicorn's arguments for stageserver: the config and the app, both in the package, so
#: they work from an installed wheel as from a checkout.
GUNICORN_ARGS = ("-c", "python:stageserver.gunicorn_conf", "stageserver.wsgi:app")


class Stopped(Exception):
    """SIGINT or SIGTERM arrived."""


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
        argv = [sys.executable, "-m", "gunicorn", *GUNICORN_ARGS]
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


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def say(message: str) -> None:
    print(f"stageserver: {message}", file=sys.stderr, flush=True)
