"""What a stage is given (``StageSpec``), what it starts from when taken over
(``Takeover``), its request as another host reads it (``StageRecord``), and what tells it
apart (``instance_of``)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ..principals import ANONYMOUS, Principal
from .conversation import Conversation, conversation_of, conversation_record
from .dialect import Dialect
from .records import ContinuationRecord


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
    #: What it asks its upstream for (kept for a later request that continues it).
    conversation: Conversation | None = None
    #: Runs with nobody attached (a background response): a client's leaving, or
    #: nobody's coming, never stops it; ``max_seconds`` bounds it instead.
    detached: bool = False
    #: Seconds it may run at most; 0: no bound.
    max_seconds: float = 0.0
    #: Seconds its status and its events are kept after its end, at least (the settings'
    #: TTLs when longer): what its API promises (a response's, for instance).
    keep_seconds: float = 0.0
    keep_events_seconds: float = 0.0


@dataclass(frozen=True)
class StageRequest:
    """A stage as a view asks for it, in whatever dialect: plain values, validated."""

    stage_id: str
    conversation: Conversation
    #: The upstream asked for by name, or by its URL; neither: by the model, else the default.
    upstream: str | None = None
    base_url: str | None = None
    #: None: ``STAGESERVER_RESUMABLE_DEFAULT``.
    resumable: bool | None = None
    #: Runs with nobody attached, bounded by ``STAGESERVER_BACKGROUND_MAX_SECONDS``.
    detached: bool = False
    #: Makes the stage's dialect from its id; None: the seed's.
    dialect: Callable[[str], Dialect] | None = None
    #: Seconds its status and its events are kept after its end, at least.
    keep_seconds: float = 0.0
    keep_events_seconds: float = 0.0


@dataclass(frozen=True)
class Takeover:
    """What a stage taken over from another worker starts from: its log's length, the
    text and content chunks that log holds, its earlier continuations, and whether its
    answer may be continued."""

    next_seq: int
    text: str
    content_chunks: int
    continuations: tuple[ContinuationRecord, ...] = ()
    from_owner: str = ""
    #: When the stage was started, by its first worker (``time.time()``); 0: unknown.
    created_at: float = 0.0
    #: False: its answer streamed tool calls or reasoning, which no continuation extends.
    continuable: bool = True


@dataclass(frozen=True)
class SpecRecord:
    """What a host that takes a stage over needs of its spec (the rest is its own
    settings'), and when the stage was started (``time.time()``)."""

    upstream: str
    resumable: bool
    request_id: str
    principal: str
    detached: bool
    max_seconds: float
    keep_seconds: float
    keep_events_seconds: float
    started_at: float


@dataclass(frozen=True)
class StageRecord:
    """A stage's request, as another host reads it from the shared store: its dialect's
    record (``Dialect.record``, from which ``Dialects.of`` makes it again), its
    conversation, and its spec. ``to_json`` is what the store keeps; ``from_json`` raises
    KeyError, TypeError or ValueError for a record it cannot read."""

    dialect: Mapping[str, Any]
    conversation: Conversation | None
    spec: SpecRecord

    @classmethod
    def of(cls, spec: StageSpec, dialect: Dialect, started_at: float) -> StageRecord:
        return cls(
            dialect=dialect.record(),
            conversation=spec.conversation,
            spec=SpecRecord(
                upstream=spec.upstream,
                resumable=spec.resumable,
                request_id=spec.request_id,
                principal=spec.principal.name,
                detached=spec.detached,
                max_seconds=spec.max_seconds,
                keep_seconds=spec.keep_seconds,
                keep_events_seconds=spec.keep_events_seconds,
                started_at=started_at,
            ),
        )

    @property
    def stage_id(self) -> str:
        return str(self.dialect["stage_id"])

    @property
    def dialect_name(self) -> str:
        return str(self.dialect["name"])

    def to_json(self) -> dict[str, Any]:
        conversation = self.conversation
        return {
            "dialect": dict(self.dialect),
            "conversation": None if conversation is None else conversation_record(conversation),
            "spec": asdict(self.spec),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StageRecord:
        conversation = data["conversation"]
        return cls(
            dialect=dict(data["dialect"]),
            conversation=None if conversation is None else conversation_of(conversation),
            spec=SpecRecord(**data["spec"]),
        )


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
