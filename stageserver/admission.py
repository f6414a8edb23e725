"""Admission control: how many stages one worker runs at once.

gunicorn's gevent worker takes at most ``worker_connections`` connections and queues the
rest silently in the listen backlog, where a client waits without a word. Below that,
``STAGESERVER_MAX_ACTIVE_STREAMS`` refuses a new stage at once: ``503`` with
``Retry-After`` and a JSON body naming the limit, before any upstream call is made, so a
load balancer or the client can go elsewhere or come back. A stage counts from
``Admission.admit`` (before it is registered and started) until it finishes, whether or
not a client is still attached: a resumable stage holds its upstream connection all the
same.

A worker that is shutting down refuses new stages the same way.

The check and the count are one step (``admit``), so the limit holds exactly even when
registering the stage waits on the shared store.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from flask import Response

from . import metrics, shutdown
from .views import error_response

if TYPE_CHECKING:
    from .stages import Stage

RETRY_AFTER_SECONDS = 1


class Admission:
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"STAGESERVER_MAX_ACTIVE_STREAMS must be at least 1, not {limit}")
        self.limit = limit
        self.active = 0
        self._lock = threading.Lock()

    def admit(self, stage: Stage) -> Response | None:
        """Count ``stage`` until it finishes and return None; or return the 503 to answer
        instead. A stage admitted but then not started must be given back: ``release``."""
        with self._lock:
            if shutdown.shutting_down():
                reason = "shutting_down"
            elif self.active >= self.limit:
                reason = "overload"
            else:
                self.active += 1
                stage.on_finish.append(self._finished)
                return None
        metrics.stage_refused(reason)
        if reason == "shutting_down":
            return _unavailable(
                "stageserver is shutting down and takes no new stages; retry on another "
                "instance",
                reason=reason,
            )
        return _unavailable(
            f"this stageserver worker is running its limit of {self.limit} active streams "
            f"(STAGESERVER_MAX_ACTIVE_STREAMS); retry in {RETRY_AFTER_SECONDS} s",
            reason=reason,
            limit=self.limit,
        )

    def release(self, stage: Stage) -> None:
        """Give back the slot of an admitted stage that will not run (409, store down)."""
        if self._finished in stage.on_finish:
            stage.on_finish.remove(self._finished)
            self._finished(stage)

    def _finished(self, stage: Stage) -> None:
        with self._lock:
            self.active -= 1


def _unavailable(message: str, **extra: object) -> Response:
    response = error_response(503, message, **extra)
    response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response
