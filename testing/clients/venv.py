"""The clients' venv: the newest release of each client library, from PyPI, in a venv of
their own outside the checkout, made again or brought up to date each time it is asked
for. The test's own venv pins the server's ``openai``; this one has whatever ``openai``
the newest clients take, as a user who installs them today gets.

It lives in ``~/.cache/stageserver/`` (``$XDG_CACHE_HOME``), one per Python version, so
a run after the first only asks PyPI whether anything is newer: pip reaches PyPI for
each package's index page and downloads only what changed (about 15 s on 2 cores). The
first run downloads and unpacks about 500 MB (litellm alone is 200 MB): 1.5 to 3.5
minutes, with the network's speed. A venv left half-made by a run that was interrupted
is made again from scratch. When pip fails (PyPI unreachable, a release that does not
install), the tests that need the venv fail with pip's output: they never skip.

Two test runs on one machine (two worktrees) share the venv: the one that brings it up
to date holds it alone, then shares it with readers until its tests end.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from testing.venvs import Venv

__all__ = ["CLIENTS", "clients_venv"]

#: What a user installs to use each client with OpenAI's API: the Agents SDK,
#: pydantic-ai with its OpenAI models, LangChain's ChatOpenAI, and LiteLLM.
CLIENTS = ("openai-agents", "pydantic-ai-slim[openai]", "langchain-openai", "litellm")
#: Brought to their newest release at every run with the clients: what makes the
#: requests the server reads (every client but LiteLLM's own HTTP code sends through
#: ``openai``; LangChain's messages are ``langchain-core``'s). The other dependencies
#: (httpx, pydantic, aiohttp, ...) are upgraded only when a client needs a newer one:
#: an eager upgrade reads the index page of each of about 150 packages, 45 s of CPU.
UPGRADED = (*CLIENTS, "openai", "langchain-core")


def _home() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "stageserver" / f"clients-py{sys.version_info.major}.{sys.version_info.minor}"


def _install(venv: Venv) -> None:
    # pip compiles what it installs: the clients' imports would otherwise be compiled at
    # every run (PYTHONDONTWRITEBYTECODE may be set), 8 s for litellm's alone.
    venv.pip_install("--upgrade", *UPGRADED, cwd=venv.path)


def _runs(venv: Venv) -> bool:
    """Whether the venv's Python and pip run: a venv that a run left half-made may not."""
    try:
        venv.run("python", "-m", "pip", "--version", cwd=venv.path, timeout=60)
    except (AssertionError, OSError, subprocess.SubprocessError):
        return False
    return True


@contextmanager
def clients_venv() -> Iterator[Venv]:
    """The clients' venv, brought up to date with PyPI's newest releases, and kept from
    another run's update until the block ends. Raises, with pip's output, when it cannot
    be brought up to date (PyPI unreachable, a release that does not install)."""
    home = _home()
    home.parent.mkdir(parents=True, exist_ok=True)
    with open(home.with_name(home.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        venv = Venv(home)
        if not _runs(venv):  # none yet, or half-made: made anew
            shutil.rmtree(home, ignore_errors=True)
            venv = Venv.create(home)
        try:
            _install(venv)
        except (AssertionError, subprocess.SubprocessError) as failed:
            # The venv is kept: what failed is PyPI or a release, and a venv made anew
            # would fail the same way, after downloading 500 MB.
            raise RuntimeError(
                f"the clients' venv ({home}) could not be brought up to date with the "
                f"newest {', '.join(UPGRADED)} from PyPI:\n{failed}"
            ) from None
        fcntl.flock(lock, fcntl.LOCK_SH)  # readers now; an update waits for our end
        yield venv
