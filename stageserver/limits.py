"""Per-principal limits: concurrent streams, requests and tokens per minute.

- ``max_streams``: stages running at once. A slot is taken when a stage is admitted and
  given back the moment it ends, whatever the way (done, error, cancel, disconnect,
  grace expiry, shutdown), since the book hears of every end as one of the stage's
  listeners. In Redis a slot is a lease (``leases.py``): if the worker holding it dies,
  it lapses within ``STAGESERVER_OWNER_LEASE_SECONDS``.
- ``requests_per_minute``: stages started in the last 60 seconds.
- ``tokens_per_minute``: prompt plus completion tokens of the stages that ended in the
  last 60 seconds, counted from their usage (``usage.py``) once known. A stage is
  refused while the budget is spent; one stage is never cut short for it.

Minutes are sliding windows of one-second buckets, so a book holds at most 60 numbers
per principal and limit. Going over raises ``RateLimited`` (429) with ``Retry-After``:
the seconds until the oldest bucket that keeps the principal over leaves the window (1
for a stream slot, which frees when some stage ends).

With a shared store (``STAGESERVER_STORE_URL``) the book is in Redis and one Lua script
checks and takes, so two hosts cannot both take the last slot; when Redis cannot answer,
a stage is refused (503, ``StoreUnavailable``): the limits fail closed. Without a store
each worker keeps its own book, and a limit holds per worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import redis

from .errors import RateLimited, StoreUnavailable
from .leases import LeaseKeeper
from .principals import Principal
from .stage import Stage, StageListener

log = logging.getLogger("stageserver.limits")

WINDOW_SECONDS = 60


def _refusal(principal: Principal, limit: str, retry_after: int) -> RateLimited:
    value = getattr(principal.limits, limit)
    what = {
        "max_streams": f"its limit of {value} concurrent streams",
        "requests_per_minute": f"its limit of {value} requests per minute",
        "tokens_per_minute": f"its limit of {value} tokens per minute",
    }[limit]
    return RateLimited(
        f"principal {principal.name!r} has reached {what}; retry in {retry_after} s",
        retry_after=retry_after,
        limit=limit,
        principal=principal.name,
    )


def _tokens(stage: Stage) -> int:
    usage = stage.usage or {}
    return int(usage.get("total_tokens") or 0)


class LimitBook(StageListener):
    """Where the limits are kept. ``admit`` takes a slot and counts the request, or raises;
    a stage admitted but not started is given back with ``release``."""

    def admit(self, principal: Principal, stage: Stage) -> None:
        raise NotImplementedError

    def release(self, principal: Principal, stage: Stage) -> None:
        raise NotImplementedError

    def add_tokens(self, principal: Principal, tokens: int) -> None:
        raise NotImplementedError

    def on_finish(self, stage: Stage) -> None:
        principal = stage.spec.principal
        if principal.limits:
            self.release(principal, stage)
            if principal.limits.tokens_per_minute:
                self.add_tokens(principal, _tokens(stage))


# -- one worker ----------------------------------------------------------------------------


@dataclass
class _Window:
    """Amounts in one-second buckets over the last ``WINDOW_SECONDS``."""

    buckets: deque[list[int]] = field(default_factory=deque)  # [second, amount]

    def total(self, second: int) -> int:
        while self.buckets and self.buckets[0][0] <= second - WINDOW_SECONDS:
            self.buckets.popleft()
        return sum(amount for _, amount in self.buckets)

    def add(self, second: int, amount: int) -> None:
        if self.buckets and self.buckets[-1][0] == second:
            self.buckets[-1][1] += amount
        else:
            self.buckets.append([second, amount])

    def wait(self, second: int, limit: int) -> int:
        """Seconds until the total is below ``limit`` again; 0 if it is now."""
        left = self.total(second)
        for bucket_second, amount in self.buckets:
            if left < limit:
                break
            left -= amount
            if left < limit:
                return bucket_second + WINDOW_SECONDS - second
        return 0 if left < limit else WINDOW_SECONDS


@dataclass
class _Account:
    streams: set[Stage] = field(default_factory=set)
    requests: _Window = field(default_factory=_Window)
    tokens: _Window = field(default_factory=_Window)


class LocalLimits(LimitBook):
    """The book of one worker."""

    def __init__(self) -> None:
        self._accounts: dict[str, _Account] = {}
        self._lock = threading.Lock()

    def admit(self, principal: Principal, stage: Stage) -> None:
        limits = principal.limits
        second = int(time.time())
        with self._lock:
            account = self._accounts.setdefault(principal.name, _Account())
            if limits.max_streams and len(account.streams) >= limits.max_streams:
                raise _refusal(principal, "max_streams", 1)
            for limit, window in (
                ("requests_per_minute", account.requests),
                ("tokens_per_minute", account.tokens),
            ):
                value = getattr(limits, limit)
                if value and (wait := window.wait(second, value)):
                    raise _refusal(principal, limit, wait)
            account.streams.add(stage)
            account.requests.add(second, 1)

    def release(self, principal: Principal, stage: Stage) -> None:
        with self._lock:
            account = self._accounts.get(principal.name)
            if account is not None:
                account.streams.discard(stage)

    def add_tokens(self, principal: Principal, tokens: int) -> None:
        with self._lock:
            self._accounts.setdefault(principal.name, _Account()).tokens.add(
                int(time.time()), tokens
            )


# -- every worker and host, in Redis --------------------------------------------------------

# KEYS: streams (zset: stage instance -> lease expiry, ms), requests, tokens (hash: second -> n)
# ARGV: now_ms, stage instance, lease_ms, max_streams, requests_per_minute, tokens_per_minute
# Returns {limit refused or "", seconds to wait}.
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


def _keys(principal: Principal) -> tuple[str, str, str]:
    # One hash tag per principal: in a Redis Cluster its keys share a slot, as a script needs.
    base = f"ss:limits:{{{principal.name}}}"
    return f"{base}:streams", f"{base}:requests", f"{base}:tokens"


class _Slot:
    """One stage's stream slot in Redis: a lease the worker's keeper renews."""

    __slots__ = ("key", "member")

    def __init__(self, key: str, member: str) -> None:
        self.key = key
        self.member = member

    def renew(self, pipe: Any, lease_ms: int) -> int:
        pipe.zadd(self.key, {self.member: int(time.time() * 1000) + lease_ms}, xx=True)
        pipe.pexpire(self.key, lease_ms * 2)
        return 2

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
        try:
            redis_client = self._client()
            if self._admit is None:
                self._admit = redis_client.register_script(_ADMIT)
            refused, seconds = self._admit(keys=_keys(principal), args=args, client=redis_client)
        except redis.RedisError as exc:
            raise StoreUnavailable(exc) from None
        if refused:
            raise _refusal(principal, refused.decode(), int(seconds))
        if limits.max_streams:
            slot = self._slots[stage] = _Slot(_keys(principal)[0], stage.instance)
            self._leases.hold(slot)

    def release(self, principal: Principal, stage: Stage) -> None:
        slot = self._slots.pop(stage, None)
        if slot is None:
            return
        self._leases.release(slot)
        try:
            self._client().zrem(slot.key, slot.member)
        except redis.RedisError as exc:
            log.warning(
                "could not give back %s's stream slot (it lapses by itself): %s",
                principal.name,
                exc,
            )

    def add_tokens(self, principal: Principal, tokens: int) -> None:
        if tokens <= 0:
            return
        key = _keys(principal)[2]
        try:
            pipe = self._client().pipeline(transaction=False)
            pipe.hincrby(key, int(time.time()), tokens)
            pipe.expire(key, WINDOW_SECONDS + 1)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not count %d tokens of %s: %s", tokens, principal.name, exc)
