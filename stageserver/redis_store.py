"""Stages shared across workers and hosts through Redis (``STAGESERVER_STORE_URL``).

A stage still runs in the worker that accepted it and is served from that worker's
memory; Redis is a mirror, so that any worker can answer for it. Its keys are named after
the stage's key, its id in its principal's namespace (``alice/summary``; the bare id when
the server is open):

- ``ss:{id}`` (hash): status, owner, summary JSON, how many remote watchers are attached.
- ``ss:{id}:log`` (stream): the events, each the exact bytes a client receives, under the
  stream id ``0-<seq+1>`` so that a ``Last-Event-ID`` maps straight onto ``XREAD``.
- ``ss:{id}:text`` (string): the text so far, while the stage runs.
- ``ss:{id}:live`` (string with expiry): held while the stage runs; ``SET NX`` on it is
  what makes a stage id unique across every worker. Its expiry is refreshed with every
  write, so a worker that dies releases its ids.
- channel ``ss:cancel``: a cancel for a stage that runs elsewhere.

The store is a listener of the stages it has claimed: for each event the relay only
marks the stage dirty, and one flusher per process writes every dirty stage's new
events in a single pipeline a few milliseconds later. If Redis cannot be written, each
stage in the batch ends with an ``error`` event that says so; new stages get 503 until
Redis answers again, and redis-py reconnects by itself.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from .concurrency import Task
from .errors import (
    EventsExpired,
    StageConflict,
    StageFinished,
    StageLost,
    StoreUnavailable,
    StoreWriteFailed,
    UnknownStage,
    store_unavailable_message,
)
from .stage import Stage, StageListener, Subscriber

log = logging.getLogger("stageserver.store")

CANCEL_CHANNEL = "ss:cancel"
_FLUSH_DELAY = 0.005  # gather the writes of this long into one pipeline
_READ_BLOCK_SECONDS = 1.0  # a remote watcher re-checks its client at least this often


def _keys(key: str) -> tuple[str, str, str, str]:
    """The hash, event log, text and live keys of the stage with this key."""
    base = f"ss:{key}"
    return base, f"{base}:log", f"{base}:text", f"{base}:live"


class _Mirrored:
    """How much of one claimed stage has been written to Redis."""

    __slots__ = ("live_ms", "next_seq", "text_parts")

    def __init__(self, live_ms: int) -> None:
        self.live_ms = live_ms
        self.next_seq = 0
        self.text_parts = 0


class RedisStageStore(StageListener):
    def __init__(
        self, url: str, *, ttl_seconds: float, event_ttl_seconds: float, max_events: int
    ) -> None:
        self.url = url
        self.ttl_ms = int(ttl_seconds * 1000)
        self.event_ttl_ms = int(min(event_ttl_seconds, ttl_seconds) * 1000)
        self.max_events = max_events
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        # Any: redis-py annotates every command as returning its sync or async result.
        self._redis: Any = None
        self._pid = 0
        self._dirty: set[Stage] = set()
        self._mirrored: dict[Stage, _Mirrored] = {}
        self._wake = threading.Event()  # a gevent event where threading is patched
        self._flusher: Task | None = None
        self._listener: Task | None = None
        self._cancel_here: Callable[[str, str], None] | None = None
        self._lock = threading.Lock()

    # -- connection, per process ---------------------------------------------------------

    @property
    def redis(self) -> Any:
        if self._redis is None or self._pid != os.getpid():
            self._redis = redis.Redis.from_url(
                self.url,
                socket_timeout=2,
                socket_connect_timeout=2,
                health_check_interval=10,
            )
            self._pid = os.getpid()
            self._flusher = self._listener = None
        return self._redis

    def start(self, cancel_here: Callable[[str, str], None]) -> None:
        """Start this process's flusher and cancel listener, once. ``cancel_here(key,
        reason)`` cancels a stage of this process for a request made elsewhere."""
        with self._lock:
            self._cancel_here = cancel_here
            _ = self.redis
            if self._flusher is None:
                self._flusher = Task(self._flush_forever, name="stageserver-store-flush")
                self._listener = Task(self._listen_for_cancels, name="stageserver-store-cancel")

    # -- the owner's side ----------------------------------------------------------------

    def claim(self, stage: Stage, live_ms: int) -> None:
        """Make ``stage`` the one live stage with its id, everywhere, and mirror it from now
        on. ``live_ms``: the longest silence a healthy stage can have. Raises
        StageConflict when one runs, StoreUnavailable when Redis cannot say."""
        key, log_key, text_key, live_key = _keys(stage.key)
        try:
            if not self.redis.set(live_key, self.owner, nx=True, px=live_ms):
                raise StageConflict(stage.stage_id)
            pipe = self.redis.pipeline()
            pipe.delete(key, log_key, text_key)
            pipe.hset(key, mapping=self._fields(stage))
            pipe.pexpire(key, self.ttl_ms + live_ms)
            pipe.execute()
        except redis.RedisError as exc:
            raise StoreUnavailable(store_unavailable_message(exc)) from None
        self._mirrored[stage] = _Mirrored(live_ms)

    def on_event(self, stage: Stage, seq: int, wire: bytes) -> None:
        """For every event of a claimed stage: cheap; the flusher does the writing."""
        self._dirty.add(stage)
        self._wake.set()

    def _flush_forever(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(_FLUSH_DELAY)
            self._wake.clear()
            batch, self._dirty = self._dirty, set()
            try:
                self._flush(batch)
            except redis.RedisError as exc:
                failure = StoreWriteFailed(store_unavailable_message(exc))
                log.error("stage store write failed for %d stages: %s", len(batch), exc)
                for stage in batch:
                    # Its own error event cannot be stored either: stop mirroring it.
                    self._mirrored.pop(stage, None)
                    stage.abort(failure)
            except Exception:
                log.exception("stage store flush failed")

    def _flush(self, batch: set[Stage]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        finished = []
        for stage in batch:
            mirrored = self._mirrored.get(stage)
            if mirrored is None:
                continue
            key, log_key, text_key, live_key = _keys(stage.key)
            done = stage.finished  # read before the events, so the terminal one is in them
            for seq, wire in stage.events_since(mirrored.next_seq):
                fields: dict[str, bytes] = {"w": wire}
                if done and seq == stage.next_seq - 1:
                    fields["t"] = b"1"
                pipe.xadd(log_key, fields, id=f"0-{seq + 1}", maxlen=self.max_events)
            mirrored.next_seq = stage.next_seq
            if done:
                finished.append(stage)
                pipe.hset(key, mapping=self._fields(stage))
                pipe.delete(live_key, text_key)
                pipe.pexpire(key, self.ttl_ms)
                pipe.pexpire(log_key, self.event_ttl_ms)
                continue
            parts = stage.text_parts
            if len(parts) > mirrored.text_parts:
                pipe.append(text_key, "".join(parts[mirrored.text_parts :]))
                mirrored.text_parts = len(parts)
            pipe.pexpire(live_key, mirrored.live_ms)
            pipe.pexpire(log_key, self.event_ttl_ms + mirrored.live_ms)
            pipe.pexpire(text_key, self.event_ttl_ms + mirrored.live_ms)
        pipe.execute()
        for stage in finished:
            self._mirrored.pop(stage, None)

    def _fields(self, stage: Stage) -> dict[str, str]:
        return {
            "status": stage.status,
            "owner": self.owner,
            "summary": json.dumps(stage.summary()),
        }

    def watched_elsewhere(self, key: str) -> bool:
        """Whether a response in some worker follows the stage through the store."""
        try:
            return int(self.redis.hget(_keys(key)[0], "watchers") or 0) > 0
        except redis.RedisError:
            return False

    def _listen_for_cancels(self) -> None:
        """Cancels published by other workers, for stages that run here. Reconnects."""
        while True:
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(CANCEL_CHANNEL)
                while True:
                    message = pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    payload = json.loads(message["data"])
                    if self._cancel_here is not None:
                        self._cancel_here(payload["key"], payload["reason"])
            except (redis.RedisError, OSError, ValueError) as exc:
                log.warning("stage store cancel listener: %s; reconnecting in 1 s", exc)
                time.sleep(1.0)

    # -- any worker's side ---------------------------------------------------------------

    def summary(self, stage_key: str) -> dict[str, Any] | None:
        """The stage's status as ``Stage.summary`` gives it; None if the store has none."""
        key, log_key, text_key, _ = _keys(stage_key)
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hget(key, "summary")
            pipe.get(text_key)
            pipe.xrevrange(log_key, count=1)
            raw, text, last = pipe.execute()
        except redis.RedisError as exc:
            raise StoreUnavailable(store_unavailable_message(exc)) from None
        if raw is None:
            return None
        summary: dict[str, Any] = json.loads(raw)
        if summary["status"] == "running":
            # The summary is the one written at the claim; the text and events go on.
            events = int(last[0][0].split(b"-")[1]) if last else 0
            summary.update(text=(text or b"").decode(), events=events)
        return summary

    def feed(self, stage_key: str, stage_id: str) -> RemoteFeed:
        """A feed of the stage's events. Raises UnknownStage, or EventsExpired when it
        has finished and its events are gone."""
        key, log_key, _, _ = _keys(stage_key)
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hget(key, "status")
            pipe.exists(log_key)
            status, has_log = pipe.execute()
        except redis.RedisError as exc:
            raise StoreUnavailable(store_unavailable_message(exc)) from None
        if status is None:
            raise UnknownStage(stage_id)
        if status != b"running" and not has_log:
            raise EventsExpired(stage_id)
        return RemoteFeed(self, stage_key, stage_id)

    def request_cancel(self, stage_key: str, stage_id: str, reason: str) -> None:
        """Ask the worker running the stage to cancel it. Raises UnknownStage, or
        StageFinished when it no longer runs."""
        key, _, _, live_key = _keys(stage_key)
        try:
            if not self.redis.exists(key):
                raise UnknownStage(stage_id)
            if not self.redis.exists(live_key):
                raise StageFinished(stage_id)
            self.redis.publish(CANCEL_CHANNEL, json.dumps({"key": stage_key, "reason": reason}))
        except redis.RedisError as exc:
            raise StoreUnavailable(store_unavailable_message(exc)) from None


class RemoteFeed:
    """The events of a stage that runs in another worker or host, read from its log in
    Redis (an ``EventFeed``, see stream.py)."""

    def __init__(self, store: RedisStageStore, stage_key: str, stage_id: str) -> None:
        self.stage_id = stage_id
        self._redis = store.redis
        self._key, self._log_key, _, _ = _keys(stage_key)

    def open(self, subscriber: Subscriber) -> None:
        try:
            self._redis.hincrby(self._key, "watchers", 1)
        except redis.RedisError as exc:
            raise StageLost(store_unavailable_message(exc)) from None

    def read(self, subscriber: Subscriber, cursor: int, wait: float) -> tuple[bytes, int, bool]:
        deadline = time.monotonic() + wait
        while True:
            block = min(max(deadline - time.monotonic(), 0.001), _READ_BLOCK_SECONDS)
            try:
                reply = self._redis.xread(
                    {self._log_key: f"0-{cursor}"}, block=int(block * 1000), count=512
                )
            except redis.RedisError as exc:
                raise StageLost(store_unavailable_message(exc)) from None
            batch = []
            ended = False
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    cursor = int(entry_id.split(b"-")[1])  # the id is 0-<seq+1>
                    batch.append(fields[b"w"])
                    ended = ended or b"t" in fields
            if batch or ended:
                return b"".join(batch), cursor, ended
            if subscriber.client_gone:
                return b"", cursor, False
            if not self._still_there():
                raise StageLost("the stage expired from the store")
            if time.monotonic() >= deadline:
                return b"", cursor, False

    def close(self, subscriber: Subscriber, *, disconnected: bool) -> None:
        try:
            self._redis.hincrby(self._key, "watchers", -1)
        except redis.RedisError:
            pass

    def _still_there(self) -> bool:
        try:
            return bool(self._redis.exists(self._key))
        except redis.RedisError as exc:
            raise StageLost(store_unavailable_message(exc)) from None
