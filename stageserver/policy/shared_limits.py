"""Per-principal limits kept in Redis, shared by every worker and host (with
``STAGESERVER_STORE_URL``): ``limits.py`` says what each limit means. One Lua script
(``store/scripts.py``'s ``ADMIT``) checks and takes, so two hosts cannot both take the
last slot. Every command goes through the store's batcher (``store/batch.py``), which
loads the script where a node lacks it and follows a Redis Cluster's slots; an admission
waits for its next batch, the flusher's (``Batcher.call``). When Redis
cannot answer, a stage is refused (503, ``StoreUnavailable``): the limits fail closed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from ..errors import StoreUnavailable
from ..principals import Principal
from ..stages.stage import Stage
from ..store import scripts
from ..store.batch import Batcher, Command
from ..store.keys import limit_keys
from ..store.leases import LeaseKeeper
from .limits import WINDOW_SECONDS, LimitBook, refusal

log = logging.getLogger("stageserver.limits")


class _Slot:
    """One stage's stream slot in Redis: a lease the worker's keeper renews."""

    __slots__ = ("key", "member")

    def __init__(self, key: str, member: str) -> None:
        self.key = key
        self.member = member

    def renew(self, lease_ms: int) -> list[Command]:
        deadline = int(time.time() * 1000) + lease_ms
        return [
            Command(self.key, ("ZADD", self.key, "XX", deadline, self.member)),
            Command(self.key, ("PEXPIRE", self.key, lease_ms * 2)),
        ]

    def renewed(self, results: list[Any]) -> None:
        pass  # a slot that lapsed is gone; its stage runs on, uncounted


class RedisLimits(LimitBook):
    """The book of every worker and host, in Redis."""

    def __init__(self, batcher: Callable[[], Batcher], leases: LeaseKeeper) -> None:
        """``batcher``: gives this process's (the store's); ``leases``: the keeper that
        renews this worker's leases, the slots among them."""
        self._batcher = batcher
        self._leases = leases
        self._slots: dict[Stage, _Slot] = {}

    def admit(self, principal: Principal, stage: Stage) -> None:
        limits = principal.limits
        keys = limit_keys(principal.name)
        args = scripts.AdmitArgs(
            now_ms=int(time.time() * 1000),
            token=stage.instance,
            lease_ms=self._leases.lease_ms,
            max_streams=limits.max_streams or 0,
            requests_per_minute=limits.requests_per_minute or 0,
            tokens_per_minute=limits.tokens_per_minute or 0,
            window_seconds=WINDOW_SECONDS,
        )
        # With the store's next batch (its flush window): a burst's admissions and claims
        # share one round trip per node.
        [reply] = self._batcher().call([scripts.ADMIT.command(keys, args)])
        if isinstance(reply, Exception):
            raise StoreUnavailable(reply)
        refused, seconds = reply
        if refused:
            raise refusal(principal, refused.decode(), int(seconds))
        if limits.max_streams:
            slot = self._slots[stage] = _Slot(keys.streams, stage.instance)
            self._leases.hold(slot)

    def release(self, principal: Principal, stage: Stage) -> None:
        slot = self._slots.pop(stage, None)
        if slot is None:
            return
        self._leases.release(slot)
        [reply] = self._batcher().run([Command(slot.key, ("ZREM", slot.key, slot.member))])
        if isinstance(reply, Exception):
            log.warning(
                "could not give back %s's stream slot (it lapses by itself): %s",
                principal.name,
                reply,
            )

    def add_tokens(self, principal: Principal, tokens: int) -> None:
        if tokens <= 0:
            return
        key = limit_keys(principal.name).tokens
        replies = self._batcher().run(
            [
                Command(key, ("HINCRBY", key, int(time.time()), tokens)),
                Command(key, ("EXPIRE", key, WINDOW_SECONDS + 1)),
            ]
        )
        failed = [reply for reply in replies if isinstance(reply, Exception)]
        if failed:
            log.warning("could not count %d tokens of %s: %s", tokens, principal.name, failed[0])
