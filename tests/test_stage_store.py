"""``LocalStore``, the store of a process alone (``store/stage_store.py``): what it
answers where a shared store would reach other processes. The Redis store's answers are
the scenarios of ``tests/test_stage_api.py`` and ``tests/test_redis_store.py``."""

from __future__ import annotations

import pytest

from stageserver.errors import UnknownStage
from stageserver.store.stage_store import LocalStore


def test_an_idempotency_key_is_held_by_its_first_stage_until_that_stage_lets_it_go() -> None:
    store = LocalStore()
    assert store.claim_idempotency("alice/k", "resp_1", "d1", ttl_seconds=60) is None
    assert store.claim_idempotency("alice/k", "resp_2", "d2", ttl_seconds=60) == ("resp_1", "d1")
    store.release_idempotency("alice/k", "resp_2")  # not its holder: kept
    assert store.claim_idempotency("alice/k", "resp_3", "d3", ttl_seconds=60) == ("resp_1", "d1")
    store.release_idempotency("alice/k", "resp_1")
    assert store.claim_idempotency("alice/k", "resp_4", "d4", ttl_seconds=60) is None


def test_a_lapsed_idempotency_key_is_claimed_again() -> None:
    store = LocalStore()
    assert store.claim_idempotency("k", "resp_1", "d1", ttl_seconds=0) is None
    assert store.claim_idempotency("k", "resp_2", "d2", ttl_seconds=60) is None
    assert store.claim_idempotency("k", "resp_3", "d3", ttl_seconds=60) == ("resp_2", "d2")


def test_a_process_alone_knows_no_stage_elsewhere_and_takes_none_over() -> None:
    store = LocalStore()
    with pytest.raises(UnknownStage):
        store.find("alice/s1", "s1")
    assert (store.record("alice/s1"), store.take_over("alice/s1", "i1")) == (None, None)
    assert store.watched_elsewhere("alice/s1") is False
    store.close()
    store.close()  # idempotent
