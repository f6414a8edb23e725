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

With a shared store (``STAGESERVER_STORE_URL``) the book is in Redis
(``shared_limits.py``), shared by every host. Without a store each worker keeps its own
book, and a limit holds per worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ..errors import RateLimited
from ..principals import Principal
from ..stages.stage import Stage, StageListener
from ..stages.status import StageStatus

log = logging.getLogger("stageserver.limits")

WINDOW_SECONDS = 60


def refusal(principal: Principal, limit: str, retry_after: int) -> RateLimited:
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


def tokens_of(stage: Stage) -> int:
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
            # Handed off, it goes on elsewhere: its taker counts its tokens at its end.
            if principal.limits.tokens_per_minute and stage.status != StageStatus.HANDED_OFF:
                self.add_tokens(principal, tokens_of(stage))


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
                raise refusal(principal, "max_streams", 1)
            for limit, window in (
                ("requests_per_minute", account.requests),
                ("tokens_per_minute", account.tokens),
            ):
                value = getattr(limits, limit)
                if value and (wait := window.wait(second, value)):
                    raise refusal(principal, limit, wait)
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
