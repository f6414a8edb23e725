"""A stage's route: the upstream it resolved to, then its fallbacks, and its attempts.

The relay asks the route for an attempt (``replicas.ReplicaAttempt``: a lease on one
replica), never for a URL. An attempt that fails before the first chunk in a way worth
another (``StageFailure.worth_another_replica``: refused, reset, a 5xx or 429, its own
first-token timeout) is followed by the next: another replica of the same upstream, then
the fallbacks' replicas, in order, until the retries or the first-token budget run out.
Nothing has reached the client before the first chunk, so the client sees one stream;
after it, nothing is retried.

- **Retries and budget** are those of the upstream the request resolved to: at most
  ``retries`` attempts after the first, all within its ``first_token_timeout`` of the
  first one's start. Each attempt may take its own upstream's ``attempt_timeout`` (by
  default that upstream's ``first_token_timeout``), never more than the budget has left.
- **Each replica at most once** per stage: a retry on the replica that just failed mostly
  fails again. So a pool of one without fallbacks makes one attempt, as before pools,
  and its failure reads as it always did.
"""

from __future__ import annotations

import time
from collections.abc import Container, Iterator, Sequence

from ..errors import (
    AllAttemptsFailed,
    FirstTokenTimeout,
    NoReplicaAvailable,
    StageFailure,
)
from .clients import UpstreamRegistry
from .replicas import Clock, Replica, ReplicaAttempt, ReplicaEvents, ReplicaSet


class Route:
    """The replica sets a stage may use (its upstream's, then its fallbacks'), in order,
    and the attempts it has made at them."""

    def __init__(
        self,
        replica_sets: Sequence[ReplicaSet],
        clock: Clock = time.monotonic,
        avoid: Replica | None = None,
    ) -> None:
        """``avoid``: a replica tried only when no other can be (one that just failed)."""
        self.replica_sets = tuple(replica_sets)
        self._avoid = avoid
        primary = self.replica_sets[0].config
        self.name = primary.name
        self.retries = primary.retries
        self.budget = primary.first_token_timeout
        self._clock = clock
        self._deadline: float | None = None
        self._attempts: list[ReplicaAttempt] = []
        self._tried: list[Replica] = []

    def next_attempt(self) -> ReplicaAttempt | None:
        """The next attempt, or None when the retries, the budget or the replicas are spent."""
        now = self._clock()
        if self._deadline is None:
            self._deadline = now + self.budget
        left = self._deadline - now
        if len(self._attempts) > self.retries or left <= 0:
            return None
        attempt = None
        if self._avoid is not None:
            attempt = self._lease([*self._tried, self._avoid])
        if attempt is None:
            attempt = self._lease(self._tried)
        if attempt is None and not self._attempts:
            attempt = self._lease(self._tried, last_resort=True)
        if attempt is None:
            return None
        self._attempts.append(attempt)
        self._tried.append(attempt.replica)
        attempt.number = len(self._attempts)
        attempt.budget_bound = left <= attempt.timeout
        attempt.timeout = min(attempt.timeout, left)
        return attempt

    def _lease(
        self, exclude: Container[Replica], *, last_resort: bool = False
    ) -> ReplicaAttempt | None:
        """The first lease a replica set of the route gives, in the route's order."""
        for replica_set in self.replica_sets:
            attempt = replica_set.lease(exclude, last_resort=last_resort)
            if attempt is not None:
                return attempt
        return None

    def first_token_message(self) -> str:
        return f"upstream {self.name!r} sent no first token within {self.budget:g} s"

    def give_up(self, last: StageFailure | None) -> StageFailure:
        """What the stage ends with when no attempt follows ``last``, the last failure
        (None: no attempt could be made at all)."""
        if last is None:
            return NoReplicaAvailable(self._unavailable())
        attempts = self._attempts
        if len(attempts) <= 1:
            return last
        tried = "; ".join(f"{a.name!r} at {a.url}: {a.outcome}" for a in attempts)
        if isinstance(last, FirstTokenTimeout) and attempts[-1].budget_bound:
            message = f"{self.first_token_message()}, over {len(attempts)} attempts ({tried})"
        else:
            message = (
                f"upstream {self.name!r}: all {len(attempts)} attempts failed before the "
                f"first token ({tried}); the last: {last}"
            )
        return AllAttemptsFailed(message, last)

    def _unavailable(self) -> str:
        now = self._clock()
        reasons = []
        for replica_set in self.replica_sets:
            for r in replica_set.replicas:
                if r.held_until > now:
                    why = f"asked to wait {r.held_until - now:.0f} s more (Retry-After)"
                else:
                    why = f"runs {r.in_flight} stages, its max_in_flight"
                reasons.append(f"{replica_set.name!r} at {r.url} {why}")
        return f"no replica can take the stage now: {'; '.join(reasons)}; retry shortly"


class ReplicaSets:
    """This worker's replica sets, one per configured upstream; ``route`` makes a stage's."""

    def __init__(
        self, registry: UpstreamRegistry, events: ReplicaEvents | None = None,
        clock: Clock = time.monotonic,
    ) -> None:  # fmt: skip
        self._clock = clock
        self._sets = {
            name: ReplicaSet(registry.config(name), registry.replicas(name), events, clock)
            for name in registry.names()
        }
        # Each upstream's replica sets in fallback order, worked out once: the config is fixed.
        self._orders = {
            name: tuple(self._sets[n] for n in registry.route(name)) for name in self._sets
        }

    def __iter__(self) -> Iterator[ReplicaSet]:
        return iter(self._sets.values())

    def __getitem__(self, name: str) -> ReplicaSet:
        return self._sets[name]

    def route(self, name: str) -> Route:
        """A stage's route from the upstream ``name``: see ``UpstreamRegistry.route``."""
        return Route(self._orders[name], self._clock)

    def order(self, name: str) -> tuple[str, ...]:
        """The upstreams of a stage routed to ``name``, in order."""
        return tuple(pool.name for pool in self._orders[name])

    def continuation_route(self, names: Sequence[str], avoid: Replica | None) -> Route:
        """The route of a continuation: the upstreams ``names``, in order, each replica
        once, ``avoid`` (the replica that just failed) only when no other can serve."""
        return Route([self._sets[n] for n in names], self._clock, avoid)
