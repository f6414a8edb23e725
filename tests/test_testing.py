"""``testing/``'s map: its package docstring names each of its modules and packages, so
that a newcomer finds what the tests share where the tests say to look; and its check of
the background threads a test leaves running (``threads``), and the order in which a
parallel run hands the modules out (``schedule``)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

import testing
from testing.servers import ROOT
from testing.threads import background_threads, left_behind
from testing.venvs import Venv, cache_home, cached_venv


def test_the_map_of_testing_names_each_of_its_modules() -> None:
    folder = ROOT / "testing"
    modules = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    packages = {p.name for p in folder.iterdir() if (p / "__init__.py").exists()}
    folders = {"js"}  # node's programs, not Python's
    doc = testing.__doc__ or ""
    named = {name for name in modules if f"``{name}``" in doc}
    named |= {name for name in packages | folders if f"``{name}/``" in doc}
    assert sorted((modules | packages | folders) - named) == []


def test_a_background_thread_left_running_is_named_and_one_that_ended_is_not() -> None:
    before = background_threads()
    done = threading.Event()
    leaked = threading.Thread(target=done.wait, name="stageserver-store-flush", daemon=True)
    ended = threading.Thread(target=lambda: None, name="stageserver-continuation-probe")
    other = threading.Thread(target=done.wait, name="upstream-reaper", daemon=True)
    for thread in (leaked, ended, other):
        thread.start()
    try:
        assert left_behind(before, wait=0.0) == ["stageserver-store-flush"]
    finally:
        done.set()  # so that this test itself leaves none behind
    leaked.join()
    assert left_behind(before, wait=0.0) == []


@pytest.mark.processes
def test_a_cached_venv_in_another_runs_use_is_taken_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second test run on the machine does not wait for the first to end (it held the
    venv shared for its whole session, and the second waited for it to update): it takes
    the venv as the first made it, and asks pip for nothing (a package that does not
    exist would fail an update)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    home = cache_home() / f"shared-py{sys.version_info.major}.{sys.version_info.minor}"
    home.parent.mkdir(parents=True)
    Venv.create(home)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_SHARED, str(home.with_name(home.name + ".lock"))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        taken: list[Path] = []

        def take() -> None:
            with cached_venv("shared", ["no-such-package-on-any-index-0"]) as venv:
                taken.append(venv.path)

        runner = threading.Thread(target=take, daemon=True)
        runner.start()
        runner.join(60)  # a guard: it waited for the other run to end
        assert taken == [home]
    finally:
        holder.kill()
        holder.communicate()


HOLD_SHARED = """
import fcntl, sys, time
lock = open(sys.argv[1], "w")
fcntl.flock(lock, fcntl.LOCK_SH)
print("held", flush=True)
time.sleep(120)
"""


@pytest.mark.processes
def test_the_longest_modules_are_collected_first_the_rest_as_given() -> None:
    listed = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "tests/test_accept_order.py", "tests/test_framing.py", "tests/test_contract.py",
         "tests/test_takeover.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    order: list[str] = []
    for line in listed.splitlines():
        module = line.partition("::")[0]
        if module.startswith("tests/") and module not in order:
            order.append(module)
    assert order == [
        "tests/test_contract.py",
        "tests/test_takeover.py",
        "tests/test_accept_order.py",
        "tests/test_framing.py",
    ]
