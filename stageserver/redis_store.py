"""Stages shared across workers and hosts through Redis (``STAGESERVER_STORE_URL``).

A stage still runs in the worker that accepted it and is served from that worker's
memory; Redis is a mirror, so that any worker can answer for it:

- ``ss:{id}`` (hash): status, owner, summary JSON, how many remote watchers are attached.
- ``ss:{id}:log`` (stream): the events, each the exact bytes a client receives, under the
  stream id ``0-<seq+1>`` so that a ``Last-Event-ID`` maps straight onto ``XREAD``.
- ``ss:{id}:live`` (string with expiry): held while the stage runs; ``SET NX`` on it is
  what makes a stage id unique across every worker. Its expiry is refreshed with every
  write, so a worker that dies releases its ids.
- channel ``ss:cancel``: a cancel for a stage that runs elsewhere.

Writes are batched: the runner only marks its stage dirty, and one flusher per process
writes every dirty stage's new events in a single pipeline a few milliseconds later, so
the relay pays a set insertion per chunk. If Redis cannot be written, each stage in the
batch ends with an ``error`` event that says so; new stages get 503 until Redis answers
again, and redis-py reconnects by itself.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import redis

from .concurrency import Task
from .errors import StageFailure
from .sse import HEARTBEAT, compact_json, encode_event

if TYPE_CHECKING:
    from .stages import Stage, StageRegistry

log = logging.getLogger("stageserver.store")

CANCEL_CHANNEL = "ss:cancel"
_FLUSH_DELAY = 0.005  # gather the writes of this long into one pipeline
_READ_BLOCK_MS = 1000  # a remote watcher re-checks its client at least this often


class StoreUnavailable(StageFailure):
    http_status = 503


def _keys(stage_id: str) -> tuple[str, str, str]:
    return f"ss:{stage_id}", f"ss:{stage_id}:log", f"ss:{stage_id}:live"


class RedisStageStore:
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
        self._flushed: dict[Stage, int] = {}
        self._wake = threading.Event()  # a gevent event where threading is patched
        self._flusher: Task | None = None
        self._listener: Task | None = None
        self._local: StageRegistry | None = None
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

    def start(self, local: StageRegistry) -> None:
        """Start this process's flusher and cancel listener, once."""
        with self._lock:
            self._local = local
            _ = self.redis
            if self._flusher is None:
                self._flusher = Task(self._flush_forever, name="stageserver-store-flush")
                self._listener = Task(self._listen_for_cancels, name="stageserver-store-cancel")

    # -- the owner's side ----------------------------------------------------------------

    def claim(self, stage: Stage, live_ms: int) -> bool:
        """Make ``stage`` the one live stage with its id, everywhere. False if one runs."""
        key, log_key, live_key = _keys(stage.stage_id)
        try:
            if not self.redis.set(live_key, self.owner, nx=True, px=live_ms):
                return False
            pipe = self.redis.pipeline()
            pipe.delete(key, log_key)
            pipe.hset(key, mapping=self._fields(stage))
            pipe.pexpire(key, self.ttl_ms + live_ms)
            pipe.execute()
        except redis.RedisError as exc:
            raise StoreUnavailable(_unavailable(exc)) from None
        self._flushed[stage] = 0
        stage.mirror = self
        stage.live_ms = live_ms
        return True

    def mark(self, stage: Stage) -> None:
        """Called by the runner for every event: cheap; the flusher does the writing."""
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
                failure = StoreUnavailable(_unavailable(exc))
                log.error("stage store write failed for %d stages: %s", len(batch), exc)
                for stage in batch:
                    self._flushed.pop(stage, None)
                    stage.mirror = None  # its own error event cannot be stored either
                    stage.abort(failure)
            except Exception:
                log.exception("stage store flush failed")

    def _flush(self, batch: set[Stage]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        finished = []
        for stage in batch:
            start = self._flushed.get(stage)
            if start is None:
                continue
            key, log_key, live_key = _keys(stage.stage_id)
            if stage.mirror is not self:
                continue
            for seq, wire in stage.events_since(start):
                terminal = seq == stage.next_seq - 1 and stage.finished
                fields: dict[str, bytes] = {"w": wire}
                if terminal:
                    fields["t"] = b"1"
                pipe.xadd(log_key, fields, id=f"0-{seq + 1}", maxlen=self.max_events)
            self._flushed[stage] = stage.next_seq
            if stage.finished:
                finished.append(stage)
                pipe.hset(key, mapping=self._fields(stage))
                pipe.delete(live_key)
                pipe.pexpire(key, self.ttl_ms)
                pipe.pexpire(log_key, self.event_ttl_ms)
            else:
                pipe.pexpire(live_key, stage.live_ms)
                pipe.pexpire(log_key, self.event_ttl_ms + stage.live_ms)
        pipe.execute()
        for stage in finished:
            self._flushed.pop(stage, None)

    def _fields(self, stage: Stage) -> dict[str, str]:
        return {
            "status": stage.status,
            "owner": self.owner,
            "summary": json.dumps(stage.summary()),
        }

    def remote_watchers(self, stage_id: str) -> int:
        try:
            return int(self.redis.hget(_keys(stage_id)[0], "watchers") or 0)
        except redis.RedisError:
            return 0

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
                    local = self._local.get(payload["stage_id"]) if self._local else None
                    if local is not None:
                        local.cancel(payload["reason"])
            except (redis.RedisError, OSError, ValueError) as exc:
                log.warning("stage store cancel listener: %s; reconnecting in 1 s", exc)
                time.sleep(1.0)

    # -- any worker's side ---------------------------------------------------------------

    def summary(self, stage_id: str) -> dict[str, Any] | None:
        key, log_key, _ = _keys(stage_id)
        try:
            fields = self.redis.hgetall(key)
            if not fields:
                return None
            summary: dict[str, Any] = json.loads(fields[b"summary"])
            if summary["status"] == "running":
                # The text so far lives in the events; the summary is from the start.
                text, count = [], 0
                for _, entry in self.redis.xrange(log_key):
                    count += 1
                    text.append(_delta_text(entry[b"w"]))
                summary.update(text="".join(text), events=count)
            return summary
        except redis.RedisError as exc:
            raise StoreUnavailable(_unavailable(exc)) from None

    def events_state(self, stage_id: str) -> str:
        """'unknown', 'expired' (a finished stage whose events are gone) or 'available'.

        Two key lookups: unlike ``summary``, it does not read the events themselves."""
        key, log_key, _ = _keys(stage_id)
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hget(key, "status")
            pipe.exists(log_key)
            status, has_log = pipe.execute()
        except redis.RedisError as exc:
            raise StoreUnavailable(_unavailable(exc)) from None
        if status is None:
            return "unknown"
        if status != b"running" and not has_log:
            return "expired"
        return "available"

    def request_cancel(self, stage_id: str, reason: str) -> str:
        """'cancelling', 'finished' or 'unknown'."""
        key, _, live_key = _keys(stage_id)
        try:
            if not self.redis.exists(key):
                return "unknown"
            if not self.redis.exists(live_key):
                return "finished"
            self.redis.publish(CANCEL_CHANNEL, json.dumps({"stage_id": stage_id, "reason": reason}))
            return "cancelling"
        except redis.RedisError as exc:
            raise StoreUnavailable(_unavailable(exc)) from None

    def follow(
        self,
        stage_id: str,
        *,
        after_seq: int,
        heartbeat_seconds: float,
        client_gone: Callable[[], bool],
    ) -> Iterator[bytes]:
        """A stage of another worker: its events from Redis, then live ones. Ends early,
        without a word, when ``client_gone()`` says the client has left."""
        key, log_key, _ = _keys(stage_id)
        cursor = after_seq
        heartbeat_due = time.monotonic() + heartbeat_seconds
        try:
            self.redis.hincrby(key, "watchers", 1)
        except redis.RedisError as exc:
            yield self._lost(stage_id, exc)
            return
        try:
            while not client_gone():
                block = int(min(heartbeat_seconds, _READ_BLOCK_MS / 1000) * 1000)
                try:
                    reply = self.redis.xread({log_key: f"0-{cursor + 1}"}, block=block, count=512)
                except redis.RedisError as exc:
                    yield self._lost(stage_id, exc)
                    return
                batch = []
                ended = False
                for _, entries in reply or ():
                    for entry_id, fields in entries:
                        cursor = int(entry_id.split(b"-")[1]) - 1
                        batch.append(fields[b"w"])
                        ended = ended or b"t" in fields
                if batch:
                    yield b"".join(batch)
                    heartbeat_due = time.monotonic() + heartbeat_seconds
                if ended:
                    return
                if not batch and not client_gone():
                    if not self._still_there(key):
                        yield self._lost(stage_id, None)
                        return
                    if time.monotonic() >= heartbeat_due:
                        yield HEARTBEAT
                        heartbeat_due = time.monotonic() + heartbeat_seconds
        finally:
            try:
                self.redis.hincrby(key, "watchers", -1)
            except redis.RedisError:
                pass

    def _still_there(self, key: str) -> bool:
        try:
            return bool(self.redis.exists(key))
        except redis.RedisError:
            return False

    @staticmethod
    def _lost(stage_id: str, exc: BaseException | None) -> bytes:
        """An error event of this response only: it has no id, so a client's
        Last-Event-ID still points at the last event it really received."""
        message = _unavailable(exc) if exc is not None else "the stage expired from the store"
        return encode_event("error", compact_json({"stage_id": stage_id, "error": message}))


def _unavailable(exc: BaseException | None) -> str:
    return f"the stage store (Redis) is unavailable: {exc}; retry shortly"


def _delta_text(wire: bytes) -> str:
    """The content of one chunk event's delta, from its wire bytes."""
    if not wire.startswith(b"id: ") or b"event: chat_completion_chunk\n" not in wire:
        return ""
    data = wire.split(b"\ndata: ", 1)[1].rstrip(b"\n")
    choices = json.loads(data)["chunk"].get("choices") or ()
    return "".join((c.get("delta") or {}).get("content") or "" for c in choices)

