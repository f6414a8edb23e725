"""What a stage keeps of how its answer was got: its attempts at replicas, and the
continuations of its answer. Plain values, which the status shows and the listeners read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class AttemptRecord:
    """An attempt at a replica: ``ok`` (it served the first chunk, ``ms`` after it began)
    or how it failed (``refused``, ``http_500``, ...)."""

    upstream: str
    replica: str
    outcome: str
    ms: float


@dataclass(frozen=True)
class ContinuationRecord:
    """One continuation of a stage's answer (``upstream/continuation.py``), or one that
    could not be made.

    ``after``: the log's last event before it. ``reason``: ``upstream_failed``,
    ``owner_lost`` or ``drain``. ``outcome``: ``ok`` (its first chunk came), ``failed``
    (it did not: the stage ends with an error), ``length`` (no token was left: the stage
    ends at its limit), ``refused`` (it could not be asked for). ``from_replica`` is the
    replica whose answer was cut, ``to_replica`` the one that continued it; after a
    takeover, ``from_worker`` and ``to_worker`` are the workers (``host:pid``)."""

    after: int
    reason: str
    mode: str
    outcome: str
    model: str = ""
    upstream: str = ""
    from_replica: str = ""
    to_replica: str = ""
    from_worker: str = ""
    to_worker: str = ""
    cause: str = ""
    error: str = ""


def continuation_refusal(
    continuable: bool, continuations: Sequence[ContinuationRecord], limit: int
) -> str | None:
    """Why an answer may not be continued now (``continuable``: it streamed no tool calls
    or reasoning; ``continuations``: those made of it so far, ``limit`` at most); None if
    it may."""
    if not continuable:
        return "it streamed tool calls or reasoning, which a continuation cannot extend"
    made = sum(c.outcome == "ok" for c in continuations)
    if made >= limit:
        return f"it was continued {made} times already (STAGESERVER_MAX_CONTINUATIONS)"
    return None
