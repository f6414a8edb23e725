"""Who runs each stage: the claim, the takeover of an orphan, the handoff, the sweeper, and
the end of a stage nobody can take over.

- ``claim``: a stage this worker starts becomes the one live stage with its key,
  everywhere (``CLAIM``: ``SET NX`` on its lease), and joins the running index
  (``ss:running``, scored by when its lease runs out); sent with the flusher's next
  batch (``Batcher.call``), so that the claims of a burst share one round trip.
- ``take_over``: a stage outlives its worker. When its lease lapses, or its worker hands
  it off as it drains (``release_claim``: ``HAND_OFF``, scored 0), any live worker may
  claim it (``TAKE_OVER``): the first look only marks it ``suspect_since``; half a lease
  later one worker wins, under a new lease and the next epoch, whose marker entry in the
  log fences the old owner (entries.py); at once for a stage handed off. Half a lease
  leaves an owner that was only cut off from Redis the time to take its lease back. The
  taker continues the answer from what Redis holds (``Claim``: its record, its log's
  length, its text; ``manager.takeover.Takeovers.adopt``).
- the sweeper: every quarter of a lease, each worker tries to take over the stages of the
  running index whose lease ran out, so that an orphan is claimed within two leases of
  its owner's last renewal, whether or not anyone follows it.
- ``reap_orphan``: what a request about a stage of another worker does first (its
  status, a cancel, a follower whose log is quiet, by name): a running stage whose lease
  is gone is marked ``suspect_since``; one still so half a lease later is taken over
  (``adopt``), or, where that cannot be (no taker, a stage from before takeovers), ended
  for everyone in one script (``DECLARE_DEAD``): an ``error`` event at the end of its log
  (after its opening, when its owner died before writing that), naming the worker that
  stopped, and the status ``error``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..concurrency import Task, stop_task
from ..errors import StageConflict, StoreUnavailable
from ..stages.dialect import Dialects, Ending, resume_at
from ..stages.events import SeedDialect
from ..stages.stage import Stage
from ..stages.usage import final_usage
from . import entries, scripts
from .batch import Batcher, Command
from .connection import STORE_ERRORS, Reachability, owner_name, store_errors
from .keys import RUNNING_INDEX, StageKeys, stage_keys
from .leases import LeaseKeeper
from .retention import Retention
from .stage_store import Claim

log = logging.getLogger("stageserver.store")


class Ownership:
    def __init__(
        self,
        batcher: Callable[[], Batcher],
        leases: LeaseKeeper,
        retention: Retention,
        reachability: Reachability,
        dialects: Dialects,
        adopt: Callable[[str], bool] | None = None,
    ) -> None:
        """``batcher``: gives this process's. ``reachability``: told whether each of the
        sweeper's looks reached Redis. ``dialects``: those it ends an orphan in.
        ``adopt(key)`` tries to take over the orphaned stage with that key
        (``manager.takeover.Takeovers.adopt``); whether it, or another, has. Without it, this
        worker takes nothing over, and ends an orphan."""
        self._batcher = batcher
        self.leases = leases
        self.retention = retention
        self._reachability = reachability
        self._dialects = dialects
        self._adopt = adopt
        self._sweeper: Task | None = None
        self._stopping = threading.Event()

    @property
    def redis(self) -> Any:
        return self._batcher().client

    def _call(self, command: Command) -> Any:
        """One command's reply. Raises StoreUnavailable."""
        [result] = self._batcher().run([command])
        if isinstance(result, Exception):
            raise StoreUnavailable(result)
        return result

    # -- claiming ------------------------------------------------------------------------

    def claim(self, stage: Stage) -> None:
        """Make ``stage`` the one live stage with its key, everywhere. Raises
        StageConflict when one runs, StoreUnavailable when Redis cannot say."""
        lease_ms = self.leases.lease_ms
        ttl, event_ttl = self.retention.of(stage)
        fields = [item for pair in _fields(stage).items() for item in pair]
        args = scripts.ClaimArgs(stage.instance, lease_ms, ttl + lease_ms, event_ttl + lease_ms)
        deadline = int(time.time() * 1000) + lease_ms
        # The claim (a script: atomic, one slot) and the running index (its own slot), in
        # the window's next batch, with the flusher's writes and every other claim: a
        # burst of stages costs one round trip per node. An index entry for a stage that
        # turns out to be another's is harmless: the sweeper finds its lease held.
        claimed, _ = self._batcher().call(
            [
                scripts.CLAIM.command(stage_keys(stage.key), (*args, *fields)),
                Command(RUNNING_INDEX, ("ZADD", RUNNING_INDEX, deadline, stage.key)),
            ]
        )
        if isinstance(claimed, Exception):
            raise StoreUnavailable(claimed)
        if claimed != 1:
            raise StageConflict(stage.stage_id)

    def take_over(self, key: str, instance: str) -> Claim | None:
        """Claim the orphaned stage ``key`` for the stage instance ``instance``; None when
        it is not to be taken (someone holds it, it ended, it has no record). Raises
        StoreUnavailable."""
        keys = stage_keys(key)
        lease_ms = self.leases.lease_ms
        now = int(time.time() * 1000)
        log_ttl = self.retention.event_ttl_ms + lease_ms
        args = scripts.TakeOverArgs(instance, lease_ms, now, lease_ms // 2, log_ttl)
        claimed = self._call(scripts.TAKE_OVER.command(keys, args))
        if claimed is None:
            return None
        # The index is a hint for the sweepers (its node may be down): the claim stands.
        with contextlib.suppress(*STORE_ERRORS):
            if claimed == 0:
                self.redis.zrem(RUNNING_INDEX, key)
            else:
                self.redis.zadd(RUNNING_INDEX, {key: now + lease_ms})
        if claimed == 0:
            return None
        with store_errors():
            try:
                text, chunks = entries.read_durable_text(self.redis, keys.text, keys.log)
            except STORE_ERRORS:
                self.release_claim(key, instance)  # for another worker, or this one, later
                raise
        epoch, held, record, owner, handoff, summary = claimed
        return Claim(
            epoch=int(epoch),
            held=int(held),
            record=json.loads(record) if record else {},
            text=text,
            content_chunks=chunks,
            owner=bytes(owner).decode(),
            taker=owner_name(),
            handed_off=bool(handoff),
            summary=json.loads(summary),
        )

    def release_claim(self, key: str, instance: str) -> None:
        """Give back a claim this worker cannot run (it is full, say, or it drains): any
        other takes it at once."""
        try:
            if (
                self._call(scripts.HAND_OFF.command(stage_keys(key), scripts.HandOffArgs(instance)))
                == 1
            ):
                self.redis.zadd(RUNNING_INDEX, {key: 0})
        except (StoreUnavailable, *STORE_ERRORS) as exc:
            log.warning("stage %s: its claim lapses by itself (%s)", key, exc)

    # -- orphans -------------------------------------------------------------------------

    def start_sweeper(self) -> None:
        """Start this process's sweeper, if it takes stages over: once per process."""
        if self._adopt is not None:
            self._sweeper = Task(self._adopt_orphans_forever, name="stageserver-store-sweep")

    def stop(self) -> None:
        """Stop the sweeper (the store is closed): it ends before its next look."""
        stop_task(self._stopping, self._sweeper)

    def _adopt_orphans_forever(self) -> None:
        """Every quarter of a lease: try to take over the stages whose lease ran out, or
        that a draining worker let go (``TAKE_OVER``: half a lease in doubt first)."""
        assert self._adopt is not None
        while not self._stopping.wait(self.leases.lease_seconds / 4):
            try:
                due = int(time.time() * 1000)
                keys = self.redis.zrangebyscore(RUNNING_INDEX, "-inf", due, start=0, num=50)
            except (StoreUnavailable, *STORE_ERRORS):
                self._reachability.found("sweeper", False)  # the flusher and the leases log it
                continue
            self._reachability.found("sweeper", True)
            for key in keys:
                try:
                    self._adopt(bytes(key).decode())
                except Exception:
                    log.exception("could not take over stage %s", key)

    def reap_orphan(self, stage_key: str, stage_id: str) -> None:
        """If the running stage's owner has lost its lease, mark it suspect; if it has
        been so for half a lease, take it over, or else end it (see the module
        docstring). Raises StoreUnavailable."""
        keys = stage_keys(stage_key)
        with store_errors():
            redis_client = self.redis
            pipe = redis_client.pipeline(transaction=False)
            pipe.exists(keys.live)
            pipe.hmget(keys.hash, "status", "suspect_since", "record")
            live, (status, suspect_since, record) = pipe.execute()
            if live or status != b"running":
                return
            now = int(time.time() * 1000)
            if suspect_since is None:
                redis_client.hsetnx(keys.hash, "suspect_since", now)
                return
            if now - int(suspect_since) < self.leases.lease_seconds * 500:
                return
            if self._adopt is not None and record and self._adopt(stage_key):
                return
            self._declare_dead(stage_id, keys)

    def _declare_dead(self, stage_id: str, keys: StageKeys) -> None:
        """End the stage for everyone, in its dialect, after what its log holds: an
        ``error`` that names the worker that stopped (``DECLARE_DEAD``, which does nothing
        if anything changed meanwhile). Raises one of STORE_ERRORS."""
        redis_client = self.redis
        pipe = redis_client.pipeline(transaction=False)
        pipe.hmget(keys.hash, "owner", "summary", "prompt_tokens", "record")
        pipe.xrevrange(keys.log, count=1)
        (owner, raw, prompt, record), top = pipe.execute()
        held = entries.held_in(top)
        text, _ = entries.read_durable_text(redis_client, keys.text, keys.log)
        message = (
            f"the worker that ran stage {stage_id!r} ({(owner or b'?').decode()}) stopped: its "
            f"lease lapsed {self.leases.lease_seconds:g} s after its last sign of life; retry "
            "the stage"
        )
        usage = final_usage(None, int(prompt or 0), held)
        ending = Ending("error", usage, text=text, error=message)
        # A stage claimed by a worker from before dialects has no record: it is the seed's.
        dialect = (
            self._dialects.of(json.loads(record)["dialect"]) if record else SeedDialect(stage_id)
        )
        # Its owner may have died before its opening was durable: the opening comes first.
        wires = resume_at(dialect, held, text)
        wires += dialect.ending(held + len(wires), ending)
        summary = json.loads(raw)
        summary.update(
            status="error", error=message, text=ending.text, events=held + len(wires), usage=usage
        )
        args = scripts.DeclareDeadArgs(
            held=held,
            summary=json.dumps(summary),
            ttl_ms=self.retention.ttl_ms,
            event_ttl_ms=self.retention.event_ttl_ms,
            answer=json.dumps(dialect.answer(ending)),
        )
        [result] = self._batcher().run([scripts.DECLARE_DEAD.command(keys, (*args, *wires))])
        if isinstance(result, Exception):
            raise result


def _fields(stage: Stage) -> dict[str, Any]:
    """The hash of a stage as its claim writes it."""
    return {
        "status": stage.status,
        "owner": owner_name(),
        "summary": json.dumps(stage.summary()),
        "prompt_tokens": stage.spec.prompt_tokens_estimate,
        "epoch": entries.FIRST_EPOCH,
        # What another host needs to end the stage in its dialect, or continue it.
        "record": json.dumps(stage.record().to_json()),
    }
