"""Fresh virtual environments outside the checkout, to test the package as a user gets it:
installed by pip from the built wheel (dependencies from the package index), run from a
folder of its own, with nothing of the checkout, or of the test's own venv, on its path.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .servers import free_port, stop_process, wait_for_http

__all__ = ["RunningServer", "Venv", "cached_venv", "serve_in"]

# What would let a child import from elsewhere than its own venv, or configure stageserver
# behind the test's back.
_LEAKY = frozenset({"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV"})


class Venv:
    """A venv at ``path``, made by ``create`` with the test interpreter's base Python."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.bin = path / "bin"
        self.python = self.bin / "python"

    @classmethod
    def create(cls, path: Path) -> Venv:
        subprocess.run(
            [sys.executable, "-m", "venv", str(path)],
            cwd=path.parent,
            env=_clean_env(),
            check=True,
            capture_output=True,
            timeout=120,
        )
        return cls(path)

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of a program of this venv: the test's own, less whatever
        points elsewhere (PYTHONPATH, VIRTUAL_ENV, STAGESERVER_*), plus ``extra``."""
        env = _clean_env()
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.path)
        return {**env, **(extra or {})}

    def run(
        self,
        program: str,
        *args: str | Path,
        cwd: Path,
        env: Mapping[str, str] | None = None,
        check: bool = True,
        timeout: float = 600,
    ) -> subprocess.CompletedProcess[str]:
        """``program`` from the venv's bin/ with ``args``; with ``check``, a failure
        shows its output."""
        argv = [str(self.bin / program), *map(str, args)]
        result = subprocess.run(
            argv,
            cwd=cwd,
            env=self.env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited with {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def pip_install(self, *args: str | Path, cwd: Path) -> None:
        self.run("python", "-m", "pip", "install", "--quiet", *args, cwd=cwd)

    def site_packages(self) -> Path:
        script = "import sysconfig; print(sysconfig.get_path('purelib'))"
        return Path(self.run("python", "-c", script, cwd=self.path).stdout.strip())


def cache_home() -> Path:
    """Where venvs kept between runs live: ``~/.cache/stageserver`` (``$XDG_CACHE_HOME``)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "stageserver"


def runs(venv: Venv) -> bool:
    """Whether the venv's Python and pip run: a venv that a run left half-made may not."""
    try:
        venv.run("python", "-m", "pip", "--version", cwd=venv.path, timeout=60)
    except (AssertionError, OSError, subprocess.SubprocessError):
        return False
    return True


@contextmanager
def cached_venv(name: str, packages: Sequence[str]) -> Iterator[Venv]:
    """The venv ``name`` (one per Python version, under ``cache_home()``), with the
    newest release of each of ``packages`` from the package index: made the first time,
    made anew when a run left it half-made, and brought up to date (``pip install
    --upgrade``, which downloads only what changed) each time it is asked for. It is
    kept from another run's update until the block ends: two test runs on one machine
    share it, and a run that finds it in another's use takes it as that run made it
    (brought up to date when that run began) rather than wait for that run to end.
    Raises, with pip's output, when it cannot be brought up to date (the index
    unreachable, a release that does not install): the tests that need it fail, never
    skip."""
    home = cache_home() / f"{name}-py{sys.version_info.major}.{sys.version_info.minor}"
    home.parent.mkdir(parents=True, exist_ok=True)
    with open(home.with_name(home.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # in another run's use, or being updated by it
            fcntl.flock(lock, fcntl.LOCK_SH)  # waits only for an update to end
            venv = Venv(home)
            if runs(venv):
                yield venv
                return
            fcntl.flock(lock, fcntl.LOCK_EX)  # left half-made: made here once free
        venv = Venv(home)
        if not runs(venv):  # none yet, or half-made: made anew
            shutil.rmtree(home, ignore_errors=True)
            venv = Venv.create(home)
        try:
            venv.pip_install("--upgrade", *packages, cwd=venv.path)
        except (AssertionError, subprocess.SubprocessError) as failed:
            raise RuntimeError(
                f"the venv {home} could not be brought up to date with the newest "
                f"{', '.join(packages)}:\n{failed}"
            ) from None
        fcntl.flock(lock, fcntl.LOCK_SH)  # readers now; an update waits for our end
        yield venv


def _clean_env() -> dict[str, str]:
    return {
        key: value
        for key, value in os.environ.items()
        if key not in _LEAKY and not key.startswith("STAGESERVER_")
    }


@dataclass
class RunningServer:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def serve_in(
    venv: Venv,
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    ready_path: str = "/",
    forbid: Sequence[str] = ("Traceback",),
) -> Iterator[RunningServer]:
    """``argv`` (its first item a program of ``venv``'s bin/) run in ``cwd`` as a server
    on a free loopback port, given to it as ``STAGESERVER_BIND``; stopped when the block
    ends. If the block did not raise, the log must then hold none of ``forbid``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = cwd.parent / f"server-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(venv.bin / argv[0]), *argv[1:]],
            cwd=cwd,
            env=venv.env({**env, "STAGESERVER_BIND": f"127.0.0.1:{port}"}),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        server = RunningServer(url, proc, log_path)
        try:
            try:
                wait_for_http(url + ready_path, timeout=30, proc=proc)
            except RuntimeError as exc:
                raise RuntimeError(f"{' '.join(argv)}: {exc}\n{server.log()}") from None
            yield server
        finally:
            stop_process(proc)
    log_text = server.log()
    found = [sign for sign in forbid if sign in log_text]
    assert not found, f"the server's log has {found}:\n{log_text}"
