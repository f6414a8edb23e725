"""Which tests start a process, and a check that keeps them marked.

A test that starts a process (gunicorn, nginx, redis-server, a Redis Cluster, Sentinels,
node, Chromium, a venv, the llama.cpp model, any subprocess) is marked ``processes``, so
that ``pytest -m "not processes"`` is the inner loop: the tests of this process alone.

This module is a pytest plugin (``tests/conftest.py`` loads it: ``pytest_plugins``).

How a test gets the mark (``mark``, from the collection hook here):

- it uses, at any depth, a fixture named in ``PROCESS_FIXTURES``: one that starts a
  process, or whose scope has one running (``topologies``' hosts);
- or it says so itself, ``@pytest.mark.processes`` (a test that starts one in its body),
  or its module does (``pytestmark``).

How the mark is kept (``ProcessAudit``): Python's audit hook (``sys.addaudithook``) sees
every process this one starts: ``subprocess.Popen`` (and so ``subprocess.run``, asyncio's
subprocesses, Playwright's driver), ``os.fork``, ``os.posix_spawn``, ``os.exec*``,
``os.spawn*``, ``os.system``. A test not marked ``processes`` that starts one, in its
setup, its call or its teardown, fails, naming the program and the fixture that started
it. So the mark cannot drift: a new fixture that starts a process fails the first unmarked
test that uses it, until its name is added here; ``tests/test_processes.py`` fails a name
here that no fixture has any more.

One process is no test's: the ``uname -p`` that the platform module runs once per process
for the openai SDK's request headers (``platform.platform()``), asked before any test
(``warm_up``).
"""

from __future__ import annotations

import platform
import sys
import threading
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest

__all__ = [
    "AUDIT",
    "MARKER",
    "PROCESS_FIXTURES",
    "ProcessAudit",
    "Started",
    "mark",
    "warm_up",
]

MARKER = "processes"

#: The fixtures that start a process (or keep one running for their scope), by name.
PROCESS_FIXTURES = frozenset(
    {
        # tests/conftest.py
        "redis_server",
        "redis_cluster",
        "topologies",
        # gunicorn, nginx, prometheus, Chromium and node, in the modules that define them
        "server",
        "keyed_server",
        "limited_server",
        "browser",
        "origins",
        "stack",
        "flask_run",
        "pair",
        "hosts",
        "survivor",
        "start_host",
        "traced",
        # the embedded model
        "model_server",
        # venvs, wheels and the programs run in them
        "anthropic_sdk",
        "built",
        "server_venv",
        "client_venv",
        "example_app",
        "venv",
        "runs",
    }
)

#: The audit events of a new process.
_EVENTS = frozenset(
    {
        "subprocess.Popen",
        "os.fork",
        "os.forkpty",
        "os.posix_spawn",
        "os.exec",
        "os.spawn",
        "os.system",
        "pty.spawn",
    }
)


def mark(items: Iterable[pytest.Item]) -> None:
    """Mark ``processes`` each test that uses a fixture of ``PROCESS_FIXTURES``."""
    for item in items:
        used = PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if used and item.get_closest_marker(MARKER) is None:
            item.add_marker(pytest.mark.processes)


def warm_up() -> None:
    """Run what starts a process once per process and then caches its answer, before any
    test: ``platform.platform()`` runs ``uname -p`` for the openai SDK's headers."""
    platform.platform()


#: A fixture, as pytest tells one from another of the same name: where it is defined
#: (``FixtureDef.baseid``: a module's node id, a directory's for a conftest), and its name.
FixtureKey = tuple[str, str]


@dataclass(frozen=True)
class Started:
    """A process started during a test: the audit event, its program and arguments, and
    the fixture being set up then (None: the test itself, or a teardown)."""

    event: str
    program: str
    fixture: FixtureKey | None

    def describe(self, when: str) -> str:
        """In words, for a test whose ``when`` (setup, call, teardown) started it."""
        by = f"fixture {self.fixture[1]!r}" if self.fixture else f"the test's {when}"
        return f"{self.program} ({self.event}), started by {by}"


@dataclass
class ProcessAudit:
    """Records the processes started while a test phase runs (``phase``), and the fixtures
    that started one (``spawning``): a test set up later with one of them running (a
    module's or the session's) starts nothing itself, and must be marked all the same.
    Installed once per pytest process: an audit hook cannot be removed, so it records only
    within a phase."""

    started: list[Started] = field(default_factory=list)
    spawning: set[FixtureKey] = field(default_factory=set)
    _recording: bool = False
    _fixtures: list[FixtureKey] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def install(self) -> None:
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if event not in _EVENTS or not self._recording:
            return
        fixture = self._fixtures[-1] if self._fixtures else None
        with self._lock:
            self.started.append(Started(event, _program(event, args), fixture))
            if fixture is not None:
                self.spawning.add(fixture)

    def fixture_setup(self, fixture: FixtureKey) -> Generator[None, object, object]:
        """Wrap the set-up of ``fixture``: what starts meanwhile is its."""
        self._fixtures.append(fixture)
        try:
            return (yield)
        finally:
            self._fixtures.pop()

    def phase(self, item: pytest.Item, when: str) -> Generator[None, object, object]:
        """Wrap a test's ``setup``, ``call`` or ``teardown``: if the test is not marked
        ``processes`` and a process started meanwhile, or (setup) it uses a fixture that
        started one for an earlier test, the phase fails, naming them."""
        with self._lock:
            self.started = []
        self._recording = True
        try:
            result = yield
        finally:
            self._recording = False
            with self._lock:
                started, self.started = self.started, []
        if item.get_closest_marker(MARKER) is not None:
            return result
        lines = [f"  - {s.describe(when)}" for s in started]
        if when == "setup":
            fresh = {s.fixture for s in started}
            lines += [
                f"  - fixture {key[1]!r}, which started a process when an earlier test used it"
                for key in sorted(self.spawning - fresh)
                if _uses(item, key)
            ]
        if lines:
            pytest.fail(
                f"{item.nodeid} is not marked {MARKER!r}, yet its {when} started a process:\n"
                + "\n".join(lines)
                + "\nName the fixture in PROCESS_FIXTURES (testing/processes.py), or mark the "
                f"test @pytest.mark.{MARKER}: `pytest -m 'not {MARKER}'` runs only the tests "
                "that start none.",
                pytrace=False,
            )
        return result


def _uses(item: pytest.Item, fixture: FixtureKey) -> bool:
    """Whether ``item`` uses ``fixture``: one of its name, visible where the item is."""
    baseid, name = fixture
    visible = not baseid or item.nodeid.startswith((f"{baseid}::", f"{baseid}/"))
    return visible and name in getattr(item, "fixturenames", ())


def _program(event: str, args: tuple[Any, ...]) -> str:
    """What the audit event says was started, in a few words."""
    if event == "subprocess.Popen":
        executable, argv = args[0], args[1]
        words = [str(a) for a in argv] if isinstance(argv, list | tuple) else [str(argv)]
        return " ".join(words)[:200] or str(executable)
    if event in ("os.exec", "os.spawn", "os.posix_spawn"):
        return " ".join(str(a) for a in args[:2])[:200]
    if event == "os.system":
        return str(args[0])[:200]
    return event


# -- the plugin ----------------------------------------------------------------------------

#: This pytest process's audit.
AUDIT = ProcessAudit()


def pytest_configure(config: pytest.Config) -> None:
    warm_up()
    AUDIT.install()


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark(items)


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef[object], request: pytest.FixtureRequest
) -> Generator[None, object, object]:
    return (yield from AUDIT.fixture_setup((fixturedef.baseid, fixturedef.argname)))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from AUDIT.phase(item, "setup"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from AUDIT.phase(item, "call"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from AUDIT.phase(item, "teardown"))
