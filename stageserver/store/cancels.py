"""The cancel channel (``ss:cancel``): a cancel for a stage that runs in another worker or
host, published by the worker that was asked, and heard by every worker.

Each worker subscribes once, in a task of its own that outlives any error: it reconnects
every second while Redis cannot be reached (its node may have failed over: the cluster's
slot map is learnt again first), and cancels the stages of the messages that name one of
its own (``cancel_here``). Under a Redis Cluster the channel is classic pub/sub, which the
cluster bus carries to every node. Its subscription holds a connection of its own, beside
the node's N for commands (connection.py): one per worker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from ..concurrency import Task, stop_task
from .batch import Batcher
from .connection import STORE_ERRORS, store_errors
from .keys import CANCEL_CHANNEL
from .reader import StoreReader

log = logging.getLogger("stageserver.store")


class CancelChannel:
    def __init__(
        self,
        batcher: Callable[[], Batcher],
        reader: StoreReader,
        cancel_here: Callable[[str, str], None],
    ) -> None:
        """``cancel_here(key, reason)`` cancels a stage of this process for a request made
        elsewhere: the listener calls it."""
        self._batcher = batcher
        self._reader = reader
        self._cancel_here = cancel_here
        self._listener: Task | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        """Start this process's listener: once per process, not per stage."""
        self._listener = Task(self._listen_forever, name="stageserver-store-cancel")

    def stop(self) -> None:
        """Stop the listener (the store is closed): it ends within a second, at its next
        look, and closes its connection."""
        stop_task(self._stopping, self._listener)

    def request(self, stage_key: str, stage_id: str, reason: str) -> None:
        """Ask the worker running the stage to cancel it. Raises UnknownStage, or
        StageFinished when it no longer runs, StoreUnavailable."""
        self._reader.check_cancellable(stage_key, stage_id)
        with store_errors():
            self._batcher().client.publish(
                CANCEL_CHANNEL, json.dumps({"key": stage_key, "reason": reason})
            )

    def _listen_forever(self) -> None:
        """Cancels published by other workers, for stages that run here. Reconnects, until
        it is stopped."""
        stopping = self._stopping
        while not stopping.is_set():
            pubsub = None
            try:
                pubsub = self._batcher().subscription(CANCEL_CHANNEL)
                pubsub.subscribe(CANCEL_CHANNEL)
                while not stopping.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None:
                        payload = json.loads(message["data"])
                        self._cancel_here(payload["key"], payload["reason"])
                _close(pubsub)
            except (*STORE_ERRORS, ValueError) as exc:
                _close(pubsub)  # its socket, before the next one is opened
                if stopping.is_set():
                    return
                log.warning("stage store cancel listener: %s; reconnecting in 1 s", exc)
                if stopping.wait(1.0):
                    return
                self._batcher().refresh()  # its node may have failed over
            except Exception:  # a message it cannot read: the listener outlives it
                _close(pubsub)
                log.exception("stage store cancel listener failed; reconnecting in 1 s")
                stopping.wait(1.0)


def _close(pubsub: Any) -> None:
    if pubsub is not None:
        with contextlib.suppress(Exception):
            pubsub.close()
