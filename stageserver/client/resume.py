"""One stage's stream across its connections, without I/O, so that both clients share it.

It knows the last event received, whether the terminal one has come, and, after a drop,
whether to re-attach (``GET /stages/<id>/events`` with ``Last-Event-ID``) and how long to
wait first: the server's ``retry:`` when it sent one, else the client's ``resume_delay``,
doubled at each failed attempt, for at most ``attempts`` attempts in a row. An attempt
that brings an event starts the count again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote

import httpx
from httpx_sse import ServerSentEvent

from .errors import (
    RateLimited,
    StageClientError,
    StageConnectionError,
    StageHTTPError,
    StreamLost,
    Unavailable,
    http_error,
)
from .events import TERMINAL_EVENTS, StageEvent, typed_event

SSE_HEADERS = {"Accept": "text/event-stream"}


def stage_path(stage_id: str, tail: str = "") -> str:
    return f"/stages/{quote(stage_id, safe='')}{tail}"


@dataclass(frozen=True)
class ResumePolicy:
    attempts: int
    delay: float
    max_delay: float = 10.0


class StageStream:
    def __init__(
        self,
        stage_id: str,
        *,
        resumable: bool | None,
        policy: ResumePolicy,
        last_event_id: str | None = None,
    ) -> None:
        self.stage_id = stage_id
        self.resumable = resumable
        self.last_event_id = last_event_id
        # Ids are <stage_id>-<event>-<n>: after the terminal event there is nothing to read.
        self._ended = last_event_id is not None and bool(
            re.fullmatch(rf"{re.escape(stage_id)}-(done|error|cancel)-\d+", last_event_id)
        )
        self._attached_after_id = last_event_id is not None
        self._answered = False  # a stream has begun, so the stage exists
        self._policy = policy
        self._retry = policy.delay
        self._failures = 0

    def over(self) -> bool:
        """Whether the terminal event has come (or was had before attaching)."""
        return self._ended

    def resume_request(self, http: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        headers = dict(SSE_HEADERS)
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        return http.build_request("GET", stage_path(self.stage_id, "/events"), headers=headers)

    def opened(self, response: httpx.Response) -> bool:
        """Whether ``response`` is a stream to read. An error answer (its body read)
        raises; 204 means the stage has no event after ``Last-Event-ID``."""
        if response.status_code == 204:
            if self._attached_after_id and not self._answered:
                self._ended = True  # attached after the terminal event: nothing is left
                return False
            raise StreamLost(
                f"the server says stage {self.stage_id!r} is over (204 after "
                f"{self.last_event_id}), but its terminal event never arrived; "
                f"GET {stage_path(self.stage_id)} has its outcome"
            )
        if response.status_code != 200:
            raise http_error(response)
        self._answered = True
        return True

    def take(self, sse: ServerSentEvent) -> StageEvent | None:
        """The event to hand to the caller, if ``sse`` is one."""
        if sse.retry is not None:
            self._retry = sse.retry / 1000
        try:
            event = typed_event(sse)
        except ValueError as exc:
            raise StageClientError(str(exc)) from None
        if sse.data and sse.id:
            self.last_event_id = sse.id
        if event is not None:
            self._failures = 0
            self._ended = isinstance(event, TERMINAL_EVENTS)
        return event

    def delay_after(self, failure: Exception | None) -> float:
        """Seconds to wait before re-attaching, after the connection failed (``failure``)
        or ended without the terminal event (None). Raises when there is no going on."""
        if not self._answered:
            if isinstance(failure, StageHTTPError):
                raise failure
            raise StageConnectionError(f"no answer from stageserver: {failure}") from failure
        lost = f"the stream of stage {self.stage_id!r} dropped after {self.last_event_id}"
        if self.resumable is False:
            raise StreamLost(
                f"{lost}; the stage is not resumable, so the server cancelled it "
                "(start it with resumable=True to survive a drop)"
            ) from failure
        if isinstance(failure, StageHTTPError) and not isinstance(
            failure, RateLimited | Unavailable
        ):
            raise StreamLost(f"{lost}, and re-attaching was refused: {failure}") from failure
        self._failures += 1
        if self._failures > self._policy.attempts:
            raise StreamLost(
                f"{lost}, and {self._policy.attempts} attempts to re-attach failed; "
                f"the last: {failure or 'the stream ended early'}"
            ) from failure
        delay: float = min(self._retry * 2 ** (self._failures - 1), self._policy.max_delay)
        if isinstance(failure, StageHTTPError) and failure.retry_after is not None:
            delay = max(delay, failure.retry_after)
        return delay
