"""What a stage is given, what it keeps of its attempts, and what tells it apart."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

from ..principals import ANONYMOUS, Principal


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


# Every process's stage instances are told apart by a random prefix of its own, drawn
# again in a forked child, and a counter: no system call for each stage.
_prefix = os.urandom(6).hex() + "."
_instances = itertools.count()


def _new_prefix() -> None:
    global _prefix
    _prefix = os.urandom(6).hex() + "."


os.register_at_fork(after_in_child=_new_prefix)


def instance_of(key: str) -> str:
    """An id for a new stage with this key, unique everywhere and at any time: a later
    stage may reuse the key, never this."""
    return f"{key}#{_prefix}{next(_instances)}"
