"""The replicas of each upstream, which one an attempt gets, their health.

One ``ReplicaSet`` per configured upstream, per worker: its state (stages in flight,
failures, cool-downs) is this process's view. A stage does not ask for a URL. Its relay
asks the stage's ``Route`` (the upstream the request resolved to, then its fallbacks,
in order) for a ``ReplicaAttempt``: a lease on one replica, counted in flight until released,
that knows its upstream, its replica's URL and client, and its upstream's config.

- **Balancing.** Of the replicas an attempt may use (not yet tried by this stage, not
  cooling down, not held by a Retry-After, below ``max_in_flight``), two are compared and
  the one with fewer stages in flight in this worker wins: the replica chosen last and
  one other at random (two random choices, one of them sticky). A tie goes to the one
  chosen last, so light traffic keeps reusing one replica's warm connections; as load
  grows, the random choice takes over.
- **Passive health.** A replica that fails (refused, reset, 5xx, a timeout before its
  first chunk, silence mid-stream) ``eject_after`` times in a row (3) is ejected for a
  cool-down: 5 s, doubled for each ejection in a row, at most 300 s. Then it gets
  exactly one trial request (half-open): success readmits it and forgets its ejections,
  failure ejects it again, for longer. An answer that is the caller's fault (a 4xx, a
  malformed or error chunk) is still an answer: the replica is up. The active probe of
  ``/readyz`` (``health.py``) readmits a replica that answers and ejects one that does not.
- **Retry-After.** A 429 or 503 with ``Retry-After`` holds its replica: no attempt is
  made on it before then (300 s ahead at most). A held replica is never tried.
- **All ejected.** A route none of whose replicas is ready still tries, as its first
  attempt, the ejected replica whose cool-down ends first (of the first pool that has
  one) rather than failing the stage without an attempt: an operator prefers a try to a
  certain error.

Which failures fail a stage over to its next attempt, and the route that hands out the
attempts, are ``route.py``'s.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Container, Sequence
from urllib.parse import urlsplit, urlunsplit

from ..config import UpstreamConfig
from ..errors import StageFailure, UpstreamStatusError, outcome_of
from .clients import ReplicaClient

Clock = Callable[[], float]

COOL_DOWN_SECONDS = 5.0
MAX_COOL_DOWN_SECONDS = 300.0
MAX_HOLD_SECONDS = 300.0
#: What an attempt's end says of its replica (None: nothing).
_DOWN, _UP = "down", "up"


def without_credentials(url: str) -> str:
    """``url`` without a user or password: what logs, metrics and /stages show."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


class Replica:
    """One replica of a pool: its client and its health in this worker."""

    __slots__ = (
        "upstream", "client", "url", "in_flight", "failures", "ejections", "ejected_until",
        "trial", "held_until",
    )  # fmt: skip

    def __init__(self, upstream: str, client: ReplicaClient) -> None:
        self.upstream = upstream  # its upstream's name
        self.client = client  # the replica's own
        self.url = without_credentials(client.config.url)
        self.in_flight = 0
        self.failures = 0  # in a row
        self.ejections = 0  # in a row: how long the next cool-down is
        self.ejected_until: float | None = None  # None: admitted
        self.trial = False  # the one request of a half-open replica is out
        self.held_until = 0.0  # Retry-After


class ReplicaEvents:
    """What the pools tell an observer (``metrics.ReplicaMetrics``). Called with a pool's
    lock held: cheap, never waiting. The hooks here do nothing."""

    def on_lease(self, replica: Replica) -> None:
        """An attempt on ``replica`` begins; it is in flight until ``on_release``."""

    def on_outcome(self, replica: Replica, outcome: str, seconds: float) -> None:
        """The attempt got its first chunk (``ok``, ``seconds`` after it began), or failed."""

    def on_admitted(self, replica: Replica) -> None:
        """``replica`` is admitted: when its pool is made, and when it is readmitted."""

    def on_ejected(self, replica: Replica) -> None:
        pass

    def on_release(self, replica: Replica) -> None:
        pass


class ReplicaSet:
    def __init__(
        self,
        config: UpstreamConfig,
        replicas: Sequence[ReplicaClient],
        events: ReplicaEvents | None = None,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.name = config.name
        self.config = config
        self.replicas = tuple(Replica(config.name, client) for client in replicas)
        self._events = events or ReplicaEvents()
        self._clock = clock
        self._rng = rng or random.Random()
        self._lock = threading.Lock()  # flask run's threads; under gevent it never waits
        self._last: Replica | None = None
        for replica in self.replicas:
            self._events.on_admitted(replica)

    def lease(
        self, exclude: Container[Replica], *, last_resort: bool = False
    ) -> ReplicaAttempt | None:
        """An attempt on a ready replica not in ``exclude``; with ``last_resort``, failing
        that, on the ejected one whose cool-down ends first. None when there is none."""
        with self._lock:
            now = self._clock()
            cap = self.config.max_in_flight
            free = [
                r
                for r in self.replicas
                if r not in exclude and now >= r.held_until and (cap is None or r.in_flight < cap)
            ]
            ready = [
                r
                for r in free
                if r.ejected_until is None or (now >= r.ejected_until and not r.trial)
            ]
            if ready:
                replica = self._choose(ready)
            elif last_resort and free:
                replica = min(free, key=lambda r: r.ejected_until or 0.0)
            else:
                return None
            # Half-open: the first attempt after the cool-down is its one trial.
            trial = (
                replica.ejected_until is not None
                and now >= replica.ejected_until
                and not replica.trial
            )
            replica.trial = replica.trial or trial
            replica.in_flight += 1
            self._last = replica
            self._events.on_lease(replica)
            return ReplicaAttempt(self, replica, now, trial)

    def _choose(self, ready: list[Replica]) -> Replica:
        if len(ready) == 1:
            return ready[0]
        rng = self._rng
        first = self._last if self._last in ready else ready[rng.randrange(len(ready))]
        other = ready[rng.randrange(len(ready) - 1)]
        if other is first:
            other = ready[-1]
        return other if other.in_flight < first.in_flight else first

    def probed(self, replica: Replica, ok: bool) -> None:
        """The active probe's answer: readmit a replica that answered; eject one that did
        not, unless it is cooling down already."""
        with self._lock:
            now = self._clock()
            if ok:
                self._answered(replica)
            elif replica.ejected_until is None or now >= replica.ejected_until:
                self._eject(replica, now)

    # -- what an attempt reports ---------------------------------------------------------

    def _resolve(
        self,
        attempt: ReplicaAttempt,
        outcome: str,
        verdict: str | None,
        retry_after: float | None = None,
    ) -> None:
        with self._lock:
            now = self._clock()
            replica = attempt.replica
            self._events.on_outcome(replica, outcome, now - attempt.started)
            trial, attempt.trial = attempt.trial, False
            if trial:
                replica.trial = False
            if retry_after:
                held = now + min(retry_after, MAX_HOLD_SECONDS)
                replica.held_until = max(replica.held_until, held)
            if verdict == _DOWN:
                if trial or replica.ejected_until is None:  # else: ejected already
                    replica.failures += 1
                    if trial or replica.failures >= self.config.eject_after:
                        self._eject(replica, now)
            elif verdict == _UP:
                self._answered(replica)

    def _release(self, attempt: ReplicaAttempt) -> None:
        with self._lock:
            replica = attempt.replica
            replica.in_flight -= 1
            if attempt.trial:  # never resolved (the stage was cancelled): another may try
                replica.trial = attempt.trial = False
            self._events.on_release(replica)

    def _answered(self, replica: Replica) -> None:
        readmitted = replica.ejected_until is not None
        replica.failures = replica.ejections = 0
        replica.ejected_until = None
        if readmitted:
            self._events.on_admitted(replica)

    def _eject(self, replica: Replica, now: float) -> None:
        replica.ejections += 1
        cool_down = COOL_DOWN_SECONDS * 2 ** min(replica.ejections - 1, 16)
        replica.ejected_until = now + min(cool_down, MAX_COOL_DOWN_SECONDS)
        replica.failures = 0
        self._events.on_ejected(replica)


class ReplicaAttempt:
    """One try of a stage at one replica: a lease, in flight until ``release()``."""

    __slots__ = (
        "replica_set", "replica", "client", "name", "url", "config", "started", "trial", "number",
        "timeout", "budget_bound", "outcome", "_released",
    )  # fmt: skip

    def __init__(
        self, replica_set: ReplicaSet, replica: Replica, started: float, trial: bool
    ) -> None:
        self.replica_set = replica_set
        self.replica = replica
        self.client: ReplicaClient = replica.client
        self.name = replica_set.name  # its upstream's
        self.url = replica.url  # without credentials
        self.config: UpstreamConfig = replica_set.config  # its upstream's
        self.started = started
        self.trial = trial
        self.number = 1  # of the stage's attempts, from 1
        #: Seconds it may take to its first chunk, and whether that is all the stage's
        #: first-token budget has left (rather than its upstream's attempt_timeout).
        self.timeout = replica_set.config.attempt_timeout
        self.budget_bound = True
        self.outcome: str | None = None  # "ok" once it has served the first chunk
        self._released = False

    @property
    def served(self) -> bool:
        return self.outcome == "ok"

    def served_first_chunk(self) -> None:
        """Report that it served the stage's first chunk: its replica is up."""
        self.outcome = "ok"
        self.replica_set._resolve(self, "ok", _UP)

    def failed(self, exc: BaseException) -> None:
        """Report how it failed: the failure names its outcome and says what it tells of
        the replica (``errors.StageFailure``). The serving attempt may fail later too."""
        outcome = outcome_of(exc)
        if self.outcome != "ok":
            self.outcome = outcome
        if isinstance(exc, StageFailure):
            verdict = _DOWN if exc.replica_down else _UP if exc.replica_answered else None
        else:
            verdict = None  # cancelled, or stageserver's own error: nothing of the replica
        retry_after = exc.upstream_retry_after if isinstance(exc, UpstreamStatusError) else None
        self.replica_set._resolve(self, outcome, verdict, retry_after)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.replica_set._release(self)
