"""``StageMaker``: a ``Stage`` made from its spec, with its relay and its listeners, the
same way for a stage a request starts and for one taken over from another worker
(``takeover.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import StageSettings
from ..principals import Principal
from ..stages.conversation import Conversation
from ..stages.dialect import Dialect
from ..stages.spec import StageSpec, Takeover
from ..stages.stage import Stage, StageListener
from ..stages.usage import estimate_prompt_tokens
from ..store.stage_store import StageStore
from ..upstream.relay import AttemptTracer, Continuations, Resume, UpstreamRelay
from ..upstream.request_body import RequestBody
from ..upstream.route import ReplicaSets


@dataclass(frozen=True)
class StageMaker:
    """``listeners``: every stage's, in the order it calls them (manager/)."""

    settings: StageSettings
    replica_sets: ReplicaSets
    tracer: AttemptTracer
    continuations: Continuations
    listeners: tuple[StageListener, ...]
    store: StageStore

    def spec(
        self,
        stage_id: str,
        upstream: str,
        principal: Principal,
        conversation: Conversation,
        **given: Any,
    ) -> StageSpec:
        """A stage's spec: what ``given`` says of its request, the rest from the settings."""
        settings = self.settings
        return StageSpec(
            stage_id=stage_id,
            upstream=upstream,
            grace_seconds=settings.resume_grace_seconds,
            max_events=settings.max_events,
            max_event_bytes=settings.max_event_bytes,
            principal=principal,
            prompt_tokens_estimate=estimate_prompt_tokens(conversation.messages),
            model=conversation.model,
            conversation=conversation,
            **given,
        )

    def stage(
        self,
        spec: StageSpec,
        conversation: Conversation,
        dialect: Dialect | None,
        *,
        resume: Resume | None = None,
        takeover: Takeover | None = None,
        instance: str | None = None,
    ) -> Stage:
        """The stage ``spec`` describes, asking its upstream for ``conversation``, in
        ``dialect`` (the seed's when None). ``resume``, ``takeover`` and ``instance``:
        of a stage taken over (``takeover.py``)."""
        relay = UpstreamRelay(
            self.replica_sets.route(spec.upstream),
            RequestBody(conversation, self.settings.default_max_tokens),
            {"X-Request-ID": spec.request_id},
            self.tracer,
            self.continuations,
            resume,
        )
        store = self.store
        return Stage(
            spec,
            relay,
            self.listeners,
            store.watched_elsewhere,
            dialect,
            takeover,
            gated=store.gated,
            instance=instance,
        )
