"""Stages shared across workers and hosts through Redis (``STAGESERVER_STORE_URL``).

A stage runs in the worker that accepted it and is served from that worker's memory;
Redis is a mirror, so that any worker can answer for it (``reader.py``). The keys
of a stage, named after its key (its id in its principal's namespace) as a hash tag
(``connection.py``):

- ``ss:{key}`` (hash): status, owner, summary JSON, remote watchers, and while in doubt
  ``suspect_since``; ``gap`` when the store lost events it could not get back;
- ``ss:{key}:log`` (stream): the events, each the exact bytes a client receives, under
  the stream id ``0-<seq+1>``, so that a ``Last-Event-ID`` maps straight onto ``XREAD``;
- ``ss:{key}:text`` (string): the text so far, while the stage runs;
- ``ss:{key}:live`` (string): the owner's lease, held by the one stage instance that runs
  it. ``SET NX`` on it makes a stage id unique everywhere; the worker renews it with all
  its leases (``leases.py``);
- ``ss:running`` (sorted set): the key of every running stage, scored by when its lease
  runs out (0: handed off by a draining worker);
- channel ``ss:cancel``: a cancel for a stage that runs elsewhere.

A stage outlives its worker: when its lease lapses, or its worker hands it off as it
drains, any live worker claims it (``take_over``: one wins, under a new lease that fences
the old one; ``manager.StageManager.adopt``), and continues its answer from what Redis
holds: its record (the request), its log, and its text, which one script appends with
the events, so that the text always matches an index of the log. For that, a client never reads an
event before Redis holds it (the stage is ``gated``: the flusher publishes what it has
written), and no client can have seen what a taker would not continue from. While Redis
cannot be written, the stage publishes at once instead: an outage stops no stream, at
the price of that guarantee until the mirror has caught up.

Writes are batched and fenced: for each event the relay only marks its stage dirty, and
one flusher per process writes every dirty stage's new events, a few milliseconds later,
in one pipeline of scripts; a stage's end is written at once, before its clients hear of
it, so that its id is free when they do. Each script writes only while this stage
instance holds the lease. When it does not:

- if the stage was declared dead meanwhile, or another stage holds the id, this worker
  was cut off past its lease (a partition, a long pause): it stops the stage, closes its
  upstream and writes nothing more to it (fencing);
- if nobody noticed (the lease merely lapsed, or Redis restarted and lost it), it takes
  the lease back and goes on: a store outage ends no healthy stream.

When Redis cannot be written, nothing ends: the stages stay dirty, the flusher tries again
every half second, and each keeps streaming to its own clients. When Redis answers, the
mirror catches up from where Redis stands (a restart or a failover may have lost the last
writes), from the worker's own log; what that log no longer holds is recorded as a
``gap``, and a resume that needs it gets an ``error`` that says so, never a silent hole.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..concurrency import Task
from ..errors import LeaseLost, StageConflict, StoreUnavailable
from ..stages.records import ContinuationRecord
from ..stages.stage import HANDED_OFF, Stage, StageListener
from .connection import STORE_ERRORS, connect, stage_keys
from .leases import LeaseKeeper
from .reader import StoreReader

log = logging.getLogger("stageserver.store")

CANCEL_CHANNEL = "ss:cancel"
RUNNING_INDEX = "ss:running"
_FLUSH_DELAY = 0.005  # gather the writes of this long into one pipeline
_RETRY_DELAY = 0.5  # while Redis cannot be written

# KEYS: hash, live, running index. ARGV: token, lease_ms, now_ms, stage key. 1: held;
# -1: another's, or declared dead; 2: taken back after the store lost it (the flusher
# sends the stage whole).
_RENEW = """
local live = redis.call('GET', KEYS[2])
if live == ARGV[1] then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  redis.call('ZADD', KEYS[3], tonumber(ARGV[3]) + tonumber(ARGV[2]), ARGV[4])
  return 1
end
if live then return -1 end
local status = redis.call('HGET', KEYS[1], 'status')
if status and status ~= 'running' then return -1 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('HDEL', KEYS[1], 'suspect_since')
if not status then return 2 end
return 1
"""

# KEYS: hash, log, text, live, running index. ARGV: token, lease_ms, events Redis should
# hold, maxlen, finished (0/1), ttl_ms, event_ttl_ms, status, summary (or ""), text mode
# ("", "a" append, "s" set), text, gap (or ""), owner, prompt tokens, answer (or ""),
# content chunks, stage key, then (seq, wire, terminal) per event. The summary, owner
# and prompt tokens are written with the summary only, the answer (the finished stage's,
# in its dialect) with the end only, the content chunks with the text.
# 1: written; -1: fenced; -2: the store lost the stage; {n}: it holds n events, not that.
_FLUSH = """
local live = redis.call('GET', KEYS[4])
if live ~= ARGV[1] then
  if live then return -1 end
  local status = redis.call('HGET', KEYS[1], 'status')
  if status and status ~= 'running' then return -1 end
  redis.call('SET', KEYS[4], ARGV[1], 'PX', ARGV[2])
  redis.call('HDEL', KEYS[1], 'suspect_since')
  if not status and ARGV[9] == '' then return -2 end
end
local have = 0
local top = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if top[1] then have = tonumber(string.match(top[1][1], '%d+$')) end
if have ~= tonumber(ARGV[3]) then return {have} end
for i = 18, #ARGV, 3 do
  local id = '0-' .. (tonumber(ARGV[i]) + 1)
  if ARGV[i + 2] == '1' then
    redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], id, 'w', ARGV[i + 1], 't', '1')
  else
    redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], id, 'w', ARGV[i + 1])
  end
end
if ARGV[10] == 'a' then redis.call('APPEND', KEYS[3], ARGV[11]) end
if ARGV[10] == 's' then redis.call('SET', KEYS[3], ARGV[11]) end
if ARGV[10] ~= '' then redis.call('HSET', KEYS[1], 'chunks', ARGV[16]) end
if ARGV[12] ~= '' then redis.call('HSET', KEYS[1], 'gap', ARGV[12]) end
if ARGV[9] ~= '' then
  redis.call('HSET', KEYS[1], 'status', ARGV[8], 'summary', ARGV[9], 'owner', ARGV[13],
             'prompt_tokens', ARGV[14])
end
if ARGV[15] ~= '' then redis.call('HSET', KEYS[1], 'answer', ARGV[15]) end
if ARGV[5] == '1' then
  redis.call('DEL', KEYS[4], KEYS[3])
  redis.call('ZREM', KEYS[5], ARGV[17])
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
else
  redis.call('PEXPIRE', KEYS[4], ARGV[2])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[6]) + tonumber(ARGV[2]))
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[7]) + tonumber(ARGV[2]))
  redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[7]) + tonumber(ARGV[2]))
end
return 1
"""

# KEYS: hash, live, running index. ARGV: token, stage key. Let a drained stage go: any
# worker takes it over at once. 1: let go; 0: not this instance's.
_HAND_OFF = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'handoff', '1')
redis.call('ZADD', KEYS[3], 0, ARGV[2])
return 1
"""


# KEYS: hash, log, text, live, running index. ARGV: token, lease_ms, now_ms, stage key,
# grace_ms. Claim a running stage whose lease has lapsed, under a new lease. The first
# look only marks it ``suspect_since``; it is claimed once it has stayed so for the
# grace (the time an owner that was only cut off from Redis has to take its lease back
# once Redis answers), or at once when its worker handed it off. nil when it is not to
# be taken (its lease is held, it has ended, it is in its grace); else its epoch, the
# events its log holds, its record, text, content chunks, owner, whether it was handed
# off, and its summary.
_TAKE_OVER = """
if redis.call('EXISTS', KEYS[4]) == 1 then return nil end
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'running' then
  redis.call('ZREM', KEYS[5], ARGV[4])
  return nil
end
local fields = redis.call('HMGET', KEYS[1], 'record', 'chunks', 'owner', 'handoff', 'summary',
                          'suspect_since')
if not fields[4] then
  if not fields[6] then
    redis.call('HSET', KEYS[1], 'suspect_since', ARGV[3])
    return nil
  end
  if tonumber(ARGV[3]) - tonumber(fields[6]) < tonumber(ARGV[5]) then return nil end
end
redis.call('SET', KEYS[4], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[5], tonumber(ARGV[3]) + tonumber(ARGV[2]), ARGV[4])
redis.call('HDEL', KEYS[1], 'suspect_since', 'handoff')
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
local have = 0
local top = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if top[1] then have = tonumber(string.match(top[1][1], '%d+$')) end
local text = redis.call('GET', KEYS[3]) or ''
return {epoch, have, fields[1] or '', text, fields[2] or '0', fields[3] or '', fields[4] or '',
        fields[5] or '{}'}
"""


@dataclass(frozen=True)
class Claim:
    """A stage taken over (``RedisStageStore.take_over``): what Redis holds of it."""

    epoch: int
    held: int  # events in its log
    record: dict[str, Any]
    text: str
    content_chunks: int
    owner: str  # the worker that ran it
    handed_off: bool  # its worker drained, rather than died
    summary: dict[str, Any]  # as its owner last wrote it


class _Mirror:
    """One claimed stage: how much of it Redis holds, and its lease."""

    __slots__ = (
        "stage", "store", "held", "next_seq", "text_parts", "lost", "gap", "resummarize",
    )  # fmt: skip

    def __init__(self, stage: Stage, store: RedisStageStore) -> None:
        self.stage = stage
        self.store = store
        self.held = 0  # events Redis holds, as far as this worker knows
        self.next_seq = 0  # the next event of the stage to write
        self.text_parts = 0
        self.lost = False  # the store lost the stage: write it whole
        self.gap = ""  # what the store lost of it for good, in words; kept once known
        self.resummarize = False  # its summary changed while it runs (a continuation)

    def renew(self, pipe: Any, lease_ms: int) -> int:
        stage = self.stage
        hash_key, _, _, live_key = stage_keys(stage.key)
        now = int(time.time() * 1000)
        self.store._renew(
            keys=[hash_key, live_key, RUNNING_INDEX],
            args=[stage.instance, lease_ms, now, stage.key],
            client=pipe,
        )
        return 1

    def renewed(self, results: list[Any]) -> None:
        if results[0] == -1:
            self.store._fence(self.stage)
        elif results[0] == 2:
            self.store._lost(self)
            self.store.mark(self.stage)


class RedisStageStore(StageListener):
    def __init__(
        self,
        url: str,
        *,
        ttl_seconds: float,
        event_ttl_seconds: float,
        max_events: int,
        lease_seconds: float,
        cancel_here: Callable[[str, str], None],
        adopt: Callable[[str], bool] | None = None,
    ) -> None:
        """``cancel_here(key, reason)`` cancels a stage of this process for a request made
        elsewhere: the cancel listener calls it. ``adopt(key)`` tries to take over the
        orphaned stage with that key (``manager.StageManager.adopt``); whether it, or
        another, has."""
        self.url = url
        self.ttl_ms = int(ttl_seconds * 1000)
        self.event_ttl_ms = int(event_ttl_seconds * 1000)  # StageSettings: at most the TTL
        self.max_events = max_events
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.leases = LeaseKeeper(lambda: self.redis, lease_seconds)
        self.reader = StoreReader(
            lambda: self.redis, self.ttl_ms, self.event_ttl_ms, lease_seconds, adopt
        )
        self._adopt = adopt
        # Any: redis-py annotates every command as returning its sync or async result.
        self._redis: Any = None
        self._pid = 0
        self._dirty: set[Stage] = set()
        self._mirrors: dict[Stage, _Mirror] = {}
        self._wake = threading.Event()  # a gevent event where threading is patched
        self._flusher: Task | None = None
        self._listener: Task | None = None
        self._cancel_here = cancel_here
        self._lock = threading.Lock()
        self._failing = False
        self._renew: Any = None
        self._flush_script: Any = None
        self._hand_off_script: Any = None
        self._take_over: Any = None
        self._sweeper: Task | None = None

    # -- connection, per process ---------------------------------------------------------

    @property
    def redis(self) -> Any:
        """This process's client. The first use in a process (a worker forked after the
        app was made has its own) connects, and starts the process's flusher and cancel
        listener: once per process, not per stage."""
        if self._redis is None or self._pid != os.getpid():
            with self._lock:
                if self._redis is None or self._pid != os.getpid():
                    self._start_in_this_process()
        return self._redis

    def start(self) -> None:
        """Start this process's tasks now: a worker that serves nothing yet still takes
        over stages orphaned elsewhere."""
        _ = self.redis

    def _start_in_this_process(self) -> None:
        client = connect(self.url)
        self._renew = client.register_script(_RENEW)
        self._flush_script = client.register_script(_FLUSH)
        self._hand_off_script = client.register_script(_HAND_OFF)
        self._redis, self._pid = client, os.getpid()
        self._flusher = Task(self._flush_forever, name="stageserver-store-flush")
        self._listener = Task(self._listen_for_cancels, name="stageserver-store-cancel")
        if self._adopt is not None:
            self._sweeper = Task(self._adopt_orphans_forever, name="stageserver-store-sweep")

    # -- the owner's side ----------------------------------------------------------------

    def claim(self, stage: Stage) -> None:
        """Make ``stage`` the one live stage with its key, everywhere, and mirror it.
        Raises StageConflict when one runs, StoreUnavailable when Redis cannot say."""
        hash_key, log_key, text_key, live_key = stage_keys(stage.key)
        lease_ms = self.leases.lease_ms
        try:
            if not self.redis.set(live_key, stage.instance, nx=True, px=lease_ms):
                raise StageConflict(stage.stage_id)
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(hash_key, log_key, text_key)
            pipe.hset(hash_key, mapping=self._fields(stage))
            pipe.pexpire(hash_key, self._ttls_ms(stage)[0] + lease_ms)
            pipe.zadd(RUNNING_INDEX, {stage.key: int(time.time() * 1000) + lease_ms})
            pipe.execute()
        except STORE_ERRORS as exc:
            raise StoreUnavailable(exc) from None
        mirror = self._mirrors[stage] = _Mirror(stage, self)
        self.leases.hold(mirror)

    def take_over(self, key: str, instance: str) -> Claim | None:
        """Claim the orphaned stage ``key`` for the stage instance ``instance``; None when
        it is not to be taken (someone holds it, it ended, it has no record). Raises
        StoreUnavailable."""
        keys = [*stage_keys(key), RUNNING_INDEX]
        lease_ms = self.leases.lease_ms
        args = [instance, lease_ms, int(time.time() * 1000), key, lease_ms // 2]
        try:
            if self._take_over is None:
                self._take_over = self.redis.register_script(_TAKE_OVER)
            claimed = self._take_over(keys=keys, args=args)
        except STORE_ERRORS as exc:
            raise StoreUnavailable(exc) from None
        if claimed is None:
            return None
        epoch, held, record, text, chunks, owner, handoff, summary = claimed
        return Claim(
            epoch=int(epoch),
            held=int(held),
            record=json.loads(record) if record else {},
            text=bytes(text).decode(),
            content_chunks=int(chunks),
            owner=bytes(owner).decode(),
            handed_off=bool(handoff),
            summary=json.loads(summary),
        )

    def release_claim(self, key: str, instance: str) -> None:
        """Give back a claim this worker cannot run (it is full, say): any other takes it."""
        _, _, _, live_key = stage_keys(key)
        try:
            if self.redis.get(live_key) == instance.encode():
                pipe = self.redis.pipeline(transaction=True)
                pipe.delete(live_key)
                pipe.zadd(RUNNING_INDEX, {key: 0})
                pipe.execute()
        except STORE_ERRORS as exc:
            log.warning("stage %s: its claim lapses by itself (%s)", key, exc)

    def _adopt_orphans_forever(self) -> None:
        """Every quarter of a lease: try to take over the stages whose lease ran out, or
        that a draining worker let go (``_TAKE_OVER``: half a lease in doubt first). So
        an orphan is claimed within two leases of its owner's last renewal, whether or
        not anyone follows it."""
        assert self._adopt is not None
        while True:
            time.sleep(self.leases.lease_seconds / 4)
            try:
                due = int(time.time() * 1000)
                keys = self.redis.zrangebyscore(RUNNING_INDEX, "-inf", due, start=0, num=50)
            except STORE_ERRORS:
                continue  # the flusher and the leases say so
            for key in keys:
                try:
                    self._adopt(bytes(key).decode())
                except Exception:
                    log.exception("could not take over stage %s", key)

    def adopt(self, stage: Stage, held: int) -> None:
        """Mirror a stage taken over (``take_over``): Redis holds its first ``held`` events
        and its text."""
        mirror = self._mirrors[stage] = _Mirror(stage, self)
        mirror.held = mirror.next_seq = held
        mirror.text_parts = len(stage.text_parts)
        mirror.resummarize = True
        self.leases.hold(mirror)
        self.mark(stage)

    def on_event(self, stage: Stage, seq: int, wire: bytes) -> None:
        """For every event of a claimed stage: cheap; the flusher does the writing, and
        publishes it. While Redis cannot be written, the event is published at once."""
        self.mark(stage)
        if self._failing:
            stage.publish(seq + 1)

    def on_continue(self, stage: Stage, record: ContinuationRecord) -> None:
        mirror = self._mirrors.get(stage)
        if mirror is not None:
            mirror.resummarize = True  # its status lists its continuations

    def on_finish(self, stage: Stage) -> None:
        """Write the end now, before any client can read it, so that its id is free on
        every host when one does. While Redis fails, the flusher writes it later. A stage
        handed off is written whole, then let go for another worker to take over."""
        if self._failing or stage not in self._mirrors:
            return
        try:
            self._flush({stage})
            if stage.status == HANDED_OFF:
                self._let_go(stage)
        except STORE_ERRORS as exc:
            log.warning("stage %s: its end is written when the store answers (%s)", stage.key, exc)

    def _let_go(self, stage: Stage) -> None:
        mirror = self._mirrors.pop(stage, None)
        if mirror is None:
            return
        self.leases.release(mirror)
        hash_key, _, _, live_key = stage_keys(stage.key)
        self._hand_off_script(
            keys=[hash_key, live_key, RUNNING_INDEX], args=[stage.instance, stage.key]
        )

    def mark(self, stage: Stage) -> None:
        """Have the flusher write what the stage has that Redis does not (a stage the
        store lost, ``_Mirror.lost``, whole)."""
        self._dirty.add(stage)
        self._wake.set()

    def _flush_forever(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(_FLUSH_DELAY)
            self._wake.clear()
            batch, self._dirty = self._dirty, set()
            try:
                again = self._flush(batch)
                if self._failing:
                    log.warning("the stage store answers again; its mirror catches up")
                self._failing = False
            except STORE_ERRORS as exc:
                if not self._failing:
                    log.warning(
                        "stage store unavailable (%s); %d stages keep streaming here "
                        "and their mirror catches up when it answers",
                        exc,
                        len(batch),
                    )
                self._failing = True
                again = batch
                for stage in batch:
                    stage.publish(stage.next_seq)
            except Exception:
                log.exception("stage store flush failed")
                again = batch
            if again:
                self._dirty |= again
                time.sleep(_RETRY_DELAY)
                self._wake.set()

    def _flush(self, batch: set[Stage]) -> set[Stage]:
        """Write the batch; return the stages to write again later. One that found Redis
        elsewhere than expected (a restart, a write in flight) is written again at once."""
        resynced, failed = self._write_batch(batch)
        if resynced:
            again, failed_again = self._write_batch(resynced)
            failed |= again | failed_again
        return failed

    def _write_batch(self, batch: set[Stage]) -> tuple[set[Stage], set[Stage]]:
        """Write the batch in one pipeline: the stages resynced, and those that failed."""
        pipe = self.redis.pipeline(transaction=False)
        sent = []
        for stage in batch:
            mirror = self._mirrors.get(stage)
            if mirror is not None:
                sent.append(self._write(pipe, mirror))
        results = pipe.execute(raise_on_error=False)
        resynced: set[Stage] = set()
        failed: set[Stage] = set()
        for (mirror, upto, text_parts, done), result in zip(sent, results, strict=True):
            stage = mirror.stage
            if result == 1:
                mirror.held = mirror.next_seq = upto
                mirror.text_parts, mirror.lost = text_parts, False
                stage.publish(upto)
                if done:
                    self._mirrors.pop(stage, None)
                    self.leases.release(mirror)
            elif result == -1:
                self._fence(stage)
            elif result == -2:
                self._lost(mirror)
                resynced.add(stage)
            elif isinstance(result, list):
                mirror.held = int(result[0])
                self._resume_from(mirror, mirror.held)
                resynced.add(stage)
            else:  # an error of this script alone
                failed.add(stage)
        return resynced, failed

    def _write(self, pipe: Any, mirror: _Mirror) -> tuple[_Mirror, int, int, bool]:
        stage = mirror.stage
        # Read before the events, so the terminal one is in them. Handed off is not done:
        # the stage goes on elsewhere.
        done = stage.finished and stage.status != HANDED_OFF
        events = stage.events_since(mirror.next_seq)
        upto = events[-1][0] + 1 if events else mirror.next_seq
        parts = stage.text_parts
        if mirror.lost:
            text_mode, text = "s", "".join(parts)
        elif len(parts) > mirror.text_parts and not done:
            text_mode, text = "a", "".join(parts[mirror.text_parts :])
        else:
            text_mode, text = "", ""
        resummarize = done or mirror.lost or mirror.resummarize
        mirror.resummarize = False
        summary = json.dumps(self._summary(stage, mirror)) if resummarize else ""
        # Handed off is not an end: Redis keeps it running, for its taker.
        status = "running" if stage.status == HANDED_OFF else stage.status
        answer = json.dumps(stage.answer()) if done else ""
        args: list[Any] = [
            stage.instance, self.leases.lease_ms, mirror.held, self.max_events, int(done),
            *self._ttls_ms(stage), status, summary, text_mode, text, mirror.gap,
            self.owner, stage.spec.prompt_tokens_estimate, answer, stage.content_chunks,
            stage.key,
        ]  # fmt: skip
        last = stage.next_seq - 1
        for seq, wire in events:
            args += [seq, wire, int(done and seq == last)]
        self._flush_script(keys=[*stage_keys(stage.key), RUNNING_INDEX], args=args, client=pipe)
        return mirror, upto, len(parts), done

    def _ttls_ms(self, stage: Stage) -> tuple[int, int]:
        """How long its status and its events are kept after its end, in ms."""
        spec = stage.spec
        ttl = max(self.ttl_ms, int(spec.keep_seconds * 1000))
        return ttl, min(ttl, max(self.event_ttl_ms, int(spec.keep_events_seconds * 1000)))

    def _lost(self, mirror: _Mirror) -> None:
        mirror.lost, mirror.held = True, 0  # Redis restarted empty: write the stage whole
        self._resume_from(mirror, 0)

    def _resume_from(self, mirror: _Mirror, held: int) -> None:
        """Redis holds ``held`` events: write on from there, or from the oldest this worker
        still has, recording what is lost between."""
        first = mirror.stage.first_kept_seq
        if held >= first:
            mirror.next_seq = held
            return
        mirror.next_seq = first
        lost = f"events {held} to {first - 1} were lost by the store while it was unavailable"
        mirror.gap = f"{mirror.gap}; {lost}" if mirror.gap else lost

    def _summary(self, stage: Stage, mirror: _Mirror) -> dict[str, Any]:
        summary = stage.summary()
        if stage.status == HANDED_OFF:
            summary["status"] = "running"
        if mirror.gap:
            summary["gap"] = mirror.gap
        return summary

    def _fields(self, stage: Stage) -> dict[str, Any]:
        return {
            "status": stage.status,
            "owner": self.owner,
            "summary": json.dumps(stage.summary()),
            "prompt_tokens": stage.spec.prompt_tokens_estimate,
            # What another host needs to end the stage in its dialect, or continue it.
            "record": json.dumps(stage.record()),
        }

    def _fence(self, stage: Stage) -> None:
        """Another holds this stage's lease now: stop it, and write nothing more of it."""
        mirror = self._mirrors.pop(stage, None)
        if mirror is None:
            return
        self.leases.release(mirror)
        log.warning("stage %s: this worker lost its lease in the store; stopping it", stage.key)
        stage.abort(
            LeaseLost(
                f"this worker ({self.owner}) lost its lease on stage {stage.stage_id!r} while "
                "cut off from the stage store, and the stage was taken over; retry it"
            )
        )

    def claim_idempotency(self, key: str, stage_id: str, ttl_seconds: float) -> str | None:
        """Claim an idempotency key (``principal/key``) for ``stage_id``; the stage id that
        holds it already, if one does. Raises StoreUnavailable."""
        name = _idempotency_key(key)
        try:
            if self.redis.set(name, stage_id, nx=True, px=int(ttl_seconds * 1000)):
                return None
            held = self.redis.get(name)
        except STORE_ERRORS as exc:
            raise StoreUnavailable(exc) from None
        return None if held is None else bytes(held).decode()

    def release_idempotency(self, key: str, stage_id: str) -> None:
        name = _idempotency_key(key)
        try:
            if self.redis.get(name) == stage_id.encode():
                self.redis.delete(name)
        except STORE_ERRORS as exc:
            log.warning("idempotency key of a refused stage kept until it expires: %s", exc)

    def forget(self, key: str) -> None:
        """Delete a finished stage's keys: every host forgets it. Raises StoreUnavailable."""
        try:
            self.redis.delete(*stage_keys(key))
        except STORE_ERRORS as exc:
            raise StoreUnavailable(exc) from None

    def watched_elsewhere(self, key: str) -> bool:
        """Whether a response in some worker follows the stage through the store."""
        return self.reader.watchers(key) > 0

    def _listen_for_cancels(self) -> None:
        """Cancels published by other workers, for stages that run here. Reconnects."""
        while True:
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(CANCEL_CHANNEL)
                while True:
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None:
                        payload = json.loads(message["data"])
                        self._cancel_here(payload["key"], payload["reason"])
            except (*STORE_ERRORS, ValueError) as exc:
                log.warning("stage store cancel listener: %s; reconnecting in 1 s", exc)
                time.sleep(1.0)
            except Exception:  # a message it cannot read: the listener outlives it
                log.exception("stage store cancel listener failed; reconnecting in 1 s")
                time.sleep(1.0)

    def request_cancel(self, stage_key: str, stage_id: str, reason: str) -> None:
        """Ask the worker running the stage to cancel it. Raises UnknownStage, or
        StageFinished when it no longer runs."""
        self.reader.check_cancellable(stage_key, stage_id)
        try:
            self.redis.publish(CANCEL_CHANNEL, json.dumps({"key": stage_key, "reason": reason}))
        except STORE_ERRORS as exc:
            raise StoreUnavailable(exc) from None


def _idempotency_key(key: str) -> str:
    """The Redis key of an idempotency key (``principal/key``): in the principal's slot."""
    return f"ss:{{{key.partition('/')[0]}}}:idem:{key}"
