"""``testing/``'s map: its package docstring names each of its modules and packages, so
that a newcomer finds what the tests share where the tests say to look; and its check of
the background threads a test leaves running (``threads``)."""

from __future__ import annotations

import threading

import testing
from testing.servers import ROOT
from testing.threads import background_threads, left_behind


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
