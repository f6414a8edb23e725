"""A check that every test leaves no stageserver background thread behind.

This module is a pytest plugin (``tests/conftest.py`` loads it: ``pytest_plugins``).

An app's background work is threads named ``stageserver-*`` (greenlets under gevent,
which pytest's process does not run): its store's flusher, cancel listener, sweeper and
lease renewal, and its continuation probe. It ends when the app's manager is closed
(``stageserver.close(app)``; ``apps.app_client`` and the ``app`` fixture close theirs).
An app left open keeps its store's loops running after its test, retrying a Redis the
test has stopped, until the interpreter's exit ("--- Logging error ---").

So each test fails if a ``stageserver-*`` thread that started during it is still alive
once its fixtures are torn down. A thread that ends by itself (a probe still asking an
upstream) is waited for, ``concurrency.STOP_WAIT_SECONDS`` at most; one that never ends
fails the test, named.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from stageserver.concurrency import STOP_WAIT_SECONDS

#: The prefix of the names of an app's background threads (``concurrency.Task``'s name).
PREFIX = "stageserver-"


def background_threads() -> set[threading.Thread]:
    """The stageserver background threads alive now."""
    return {t for t in threading.enumerate() if t.name.startswith(PREFIX) and t.is_alive()}


def left_behind(before: set[threading.Thread], wait: float = STOP_WAIT_SECONDS) -> list[str]:
    """The names of the background threads started since ``before`` that are still
    alive, after waiting ``wait`` seconds at most for them to end."""
    deadline = time.monotonic() + wait
    for thread in background_threads() - before:
        thread.join(max(0.0, deadline - time.monotonic()))
    return sorted(t.name for t in background_threads() - before)


@pytest.fixture(autouse=True)
def no_background_thread_left() -> Iterator[None]:
    """Fails the test if it leaves a stageserver background thread running (see the
    module docstring)."""
    before = background_threads()
    yield
    left = left_behind(before)
    if left:
        pytest.fail(
            f"this test left stageserver background threads running: {', '.join(left)}; "
            "close each app it makes (stageserver.close(app), or testing.apps.app_client)",
            pytrace=False,
        )
