"""Per-principal limits kept in Redis, shared by every worker and host (with
``STAGESERVER_STORE_URL``): ``limits.py`` says what each limit means. One Lua script
checks and takes, so two hosts cannot both take the last slot. When Redis cannot answer,
a stage is refused (503, ``StoreUnavailable``): the limits fail closed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..principals import Principal
from ..stages.stage import Stage
from ..store.batch import Command
from ..store.connection import STORE_ERRORS, store_errors
from ..store.keys import limit_keys
from ..store.leases import LeaseKeeper
from .limits import WINDOW_SECONDS, LimitBook, refusal

log = logging.getLogger("stageserver.limits")

_ADMIT = """
local now = tonumber(ARGV[1])
local second = math.floor(now / 1000)
local window = tonumber(ARGV[7])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local max_streams = tonumber(ARGV[4])
if max_streams > 0 and redis.call('ZCARD', KEYS[1]) >= max_streams then
  return {'max_streams', 1}
end
local function wait(key, limit)
  local fields = redis.call('HGETALL', key)
  local live, stale, total = {}, {}, 0
  for i = 1, #fields, 2 do
    local s, n = tonumber(fields[i]), tonumber(fields[i + 1])
    if s <= second - window then
      table.insert(stale, fields[i])
    else
      total = total + n
      table.insert(live, {s, n})
    end
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  if total < limit then return 0 end
  table.sort(live, function(a, b) return a[1] < b[1] end)
  for _, bucket in ipairs(live) do
    total = total - bucket[2]
    if total < limit then return bucket[1] + window - second end
  end
  return window
end
local names = {'requests_per_minute', 'tokens_per_minute'}
for i = 2, 3 do
  local limit = tonumber(ARGV[i + 3])
  if limit > 0 then
    local seconds = wait(KEYS[i], limit)
    if seconds > 0 then return {names[i - 1], seconds} end
  end
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 2)
redis.call('HINCRBY', KEYS[2], second, 1)
redis.call('EXPIRE', KEYS[2], window + 1)
return {'', 0}
"""


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

    def __init__(self, client: Any, leases: LeaseKeeper) -> None:
        """``client``: a callable giving this process's redis-py client; ``leases``: the
        keeper that renews this worker's leases, the slots among them."""
        self._client = client
        self._leases = leases
        self._admit: Any = None
        self._slots: dict[Stage, _Slot] = {}

    def admit(self, principal: Principal, stage: Stage) -> None:
        limits = principal.limits
        args = [
            int(time.time() * 1000),
            stage.instance,
            self._leases.lease_ms,
            limits.max_streams or 0,
            limits.requests_per_minute or 0,
            limits.tokens_per_minute or 0,
            WINDOW_SECONDS,
        ]
        with store_errors():
            redis_client = self._client()
            if self._admit is None:
                self._admit = redis_client.register_script(_ADMIT)
            keys = limit_keys(principal.name)
            refused, seconds = self._admit(keys=keys, args=args, client=redis_client)
        if refused:
            raise refusal(principal, refused.decode(), int(seconds))
        if limits.max_streams:
            slot = self._slots[stage] = _Slot(limit_keys(principal.name).streams, stage.instance)
            self._leases.hold(slot)

    def release(self, principal: Principal, stage: Stage) -> None:
        slot = self._slots.pop(stage, None)
        if slot is None:
            return
        self._leases.release(slot)
        try:
            self._client().zrem(slot.key, slot.member)
        except STORE_ERRORS as exc:
            log.warning(
                "could not give back %s's stream slot (it lapses by itself): %s",
                principal.name,
                exc,
            )

    def add_tokens(self, principal: Principal, tokens: int) -> None:
        if tokens <= 0:
            return
        key = limit_keys(principal.name).tokens
        try:
            pipe = self._client().pipeline(transaction=False)
            pipe.hincrby(key, int(time.time()), tokens)
            pipe.expire(key, WINDOW_SECONDS + 1)
            pipe.execute()
        except STORE_ERRORS as exc:
            log.warning("could not count %d tokens of %s: %s", tokens, principal.name, exc)
