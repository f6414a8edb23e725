"""``concurrency.gevent_active``: whether gevent patched this process, asked from any
thread at any moment."""

from __future__ import annotations

import sys
import types

import pytest

from stageserver.concurrency import gevent_active


def test_a_gevent_monkey_another_thread_is_still_importing_has_patched_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While a thread imports ``gevent.monkey``, its module is in ``sys.modules`` with
    none of its functions yet: a readiness probe's thread asking then got an
    AttributeError, and ``/readyz`` a 500 (seen in a parallel test run)."""
    half_made = types.ModuleType("gevent.monkey")
    monkeypatch.setitem(sys.modules, "gevent.monkey", half_made)
    assert gevent_active() is False
