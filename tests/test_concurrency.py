"""``concurrency.gevent_active``: whether gevent patched this process, asked from any
thread at any moment. ``concurrency.Task``: an interruption is thrown in once, where the
task waits, and never into the clean-up of a task that raised it itself."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable

import pytest

from stageserver import concurrency
from stageserver.concurrency import Task, gevent_active


def test_a_gevent_monkey_another_thread_is_still_importing_has_patched_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While a thread imports ``gevent.monkey``, its module is in ``sys.modules`` with
    none of its functions yet: a readiness probe's thread asking then got an
    AttributeError, and ``/readyz`` a 500 (seen in a parallel test run)."""
    half_made = types.ModuleType("gevent.monkey")
    monkeypatch.setitem(sys.modules, "gevent.monkey", half_made)
    assert gevent_active() is False


class Interrupted(Exception):
    """What a stage's cancel throws into its relay (``StageInterrupted``), here."""


def _gevent_task(monkeypatch: pytest.MonkeyPatch, body: Callable[[Task], None]) -> Task:
    """A ``Task`` as under gunicorn's gevent worker (a greenlet), running ``body`` with
    the task itself, parked where it first waits."""
    import gevent

    monkeypatch.setattr(concurrency, "gevent_active", lambda: True)
    holder: list[Task] = []
    task = Task(lambda: body(holder[0]), name="test")
    holder.append(task)
    gevent.sleep(0)
    return task


def test_an_interruption_the_task_raised_itself_is_not_thrown_into_its_clean_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stage woken (its upstream's head came) in the same turn as it is cancelled sees
    the cancel itself and raises it; the throw still due must not land in its clean-up,
    where it waits to close the upstream, and skip its lease's release."""
    import gevent
    from gevent.event import Event

    woken, steps, interruption = Event(), [], Interrupted("client disconnected")

    def body(task: Task) -> None:
        try:
            woken.wait()
            task.withdraw()  # what Stage.raise_if_interrupted does
            raise interruption
        except Interrupted:
            steps.append("raised")
        finally:
            gevent.sleep(0.01)  # a clean-up that waits: an upstream's close
            steps.append("cleaned up")  # the lease's release

    task = _gevent_task(monkeypatch, body)
    woken.set()  # woken in this turn of the loop...
    assert task.interrupt(interruption)  # ...and interrupted in the same one
    task.join(1)
    assert steps == ["raised", "cleaned up"]


def test_an_interruption_is_thrown_in_where_the_task_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not withdrawn, it is raised where the task waits; once, however often it is asked
    for before it is thrown; and a withdraw from another greenlet (not the task's) does
    not stop it."""
    from gevent.event import Event

    never, raised = Event(), []

    def body(task: Task) -> None:
        try:
            never.wait()
        except Interrupted as exc:
            raised.append(str(exc))
            never.wait(0.01)  # waits again: a second throw would land here

    task = _gevent_task(monkeypatch, body)
    assert task.interrupt(Interrupted("first"))
    assert task.interrupt(Interrupted("second"))
    task.withdraw()  # this test's greenlet is not the task's
    task.join(1)
    assert raised == ["first"]
