"""What a stage is given and what it keeps of its attempts, as plain values."""

from __future__ import annotations

from dataclasses import dataclass

from .principals import ANONYMOUS, Principal


@dataclass(frozen=True)
class StageSpec:
    """Everything a stage needs to know of its request, as plain values."""

    stage_id: str
    upstream: str
    resumable: bool
    request_id: str
    grace_seconds: float
    max_events: int
    principal: Principal = ANONYMOUS
    max_event_bytes: int = 8 << 20
    #: The prompt's tokens as ``usage.py`` estimates them, for when the upstream says not.
    prompt_tokens_estimate: int = 0
    model: str = ""
    traceparent: str | None = None  # the request's W3C trace context, if it sent one


@dataclass(frozen=True)
class AttemptRecord:
    """An attempt at a replica: ``ok`` (it served the first chunk, ``ms`` after it began)
    or how it failed (``refused``, ``http_500``, ...)."""

    upstream: str
    replica: str
    outcome: str
    ms: float
