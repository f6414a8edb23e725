"""Admission control: how many stages one worker runs at once.

gunicorn's gevent worker takes at most ``worker_connections`` connections and queues the
rest silently in the listen backlog, where a client waits without a word. Below that,
``STAGESERVER_MAX_ACTIVE_STREAMS`` refuses a new stage at once (``Overloaded``: 503 with
``Retry-After`` and a body naming the limit) before any upstream call is made, so a load
balancer or the client can go elsewhere or come back. A worker that is shutting down
refuses new stages the same way (``ShuttingDown``).

A stage counts from ``admit`` (before it is registered and started) until it finishes,
whether or not a client is still attached: a resumable stage holds its upstream
connection all the same. The check and the count are one step, so the limit holds
exactly even when registering the stage waits on the shared store. The slot comes back
through ``release``: from the stage's ``on_finish``, as one of its listeners, or from
whoever admitted a stage that then did not start.
"""

from __future__ import annotations

import threading

from .. import shutdown
from ..errors import Overloaded, ShuttingDown
from ..stages.stage import Stage, StageListener


class Admission(StageListener):
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"STAGESERVER_MAX_ACTIVE_STREAMS must be at least 1, not {limit}")
        self.limit = limit
        self.active = 0
        self._lock = threading.Lock()

    def admit(self) -> None:
        """Count one more stage, or raise ShuttingDown or Overloaded."""
        with self._lock:
            if shutdown.shutting_down():
                raise ShuttingDown(
                    "stageserver is shutting down and takes no new stages; retry on another "
                    "instance"
                )
            if self.active >= self.limit:
                raise Overloaded(
                    f"this stageserver worker is running its limit of {self.limit} active "
                    f"streams (STAGESERVER_MAX_ACTIVE_STREAMS); retry in "
                    f"{Overloaded.retry_after} s",
                    limit=self.limit,
                )
            self.active += 1

    def release(self) -> None:
        with self._lock:
            self.active -= 1

    def on_finish(self, stage: Stage) -> None:
        self.release()
