"""The relay's decisions, in-process: ``UpstreamRelay`` driven directly, with a real route
(``upstream/route.py``) over fake upstreams that are real HTTP servers in this process, and
a stage that records what the relay tells it. No gunicorn, no Flask.

``RecordingStage`` is the mirror of ``test_stage.py``'s ``ScriptedRelay``: there a
scripted relay drives a real stage; here a real relay drives a recording stage, through
the same narrow interface (``ChunkSink``). What is checked is what the relay decides:
which replicas it tries, in which order, before the first chunk; that nothing is tried
again after it; when it asks for a continuation, of which upstream and in which mode; and
when it refuses one, and why.

Each replica is a fake upstream of its own, told how to answer by its defaults (a model
name would tell every replica the same). The default answer is ``"tok0 "``, ``"tok1 "``,
... (``testing.sse.toks``); a replica that drops after 20 pieces of a 60-piece answer
is continued by a request that is not cut again (``testing/fake_upstream/options.py``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pytest

from stageserver.config import apply_defaults, upstream_configs
from stageserver.errors import (
    AllAttemptsFailed,
    ContinuationFailed,
    StageFailure,
    UpstreamProtocolError,
    UpstreamStatusError,
)
from stageserver.stages.chunk_read import ChunkRead
from stageserver.stages.conversation import Conversation
from stageserver.stages.records import AttemptRecord, ContinuationRecord, continuation_refusal
from stageserver.upstream.clients import UpstreamRegistry
from stageserver.upstream.continuation import ContinuationModes
from stageserver.upstream.relay import Continuations, Resume, UpstreamRelay
from stageserver.upstream.request_body import RequestBody
from stageserver.upstream.route import ReplicaSets
from testing.fake_upstream import FakeUpstream, UpstreamRequest
from testing.sse import toks

DEFAULT_MAX_TOKENS = 512  # STAGESERVER_DEFAULT_MAX_TOKENS
HI = [{"role": "user", "content": "hi"}]
DROPPED = "peer closed connection without sending complete message body"  # httpx's words
#: A replica that streams 60 pieces and drops the connection after the 20th; it takes a
#: trailing assistant message as a partial answer to continue (as llama-server does).
CUT = {"chunks": "60", "mode": "drop", "after": "20", "continuation": "trailing"}
WHOLE = {"chunks": "60", "continuation": "trailing"}


class RecordingStage:
    """What the relay tells a stage, in order (``log``), and what a stage answers it: the
    answer so far, and whether it may be continued (as ``Stage`` decides: the upstream's
    chunks were text, and it was continued fewer than ``limit`` times)."""

    def __init__(self, upstream: str, *, continuable: bool = True) -> None:
        self.resolved = upstream
        self.continuable = continuable
        self.log: list[tuple[str, ...]] = []
        self.attempts: list[AttemptRecord] = []
        self.continuations: list[ContinuationRecord] = []
        self.contents: list[str | None] = []
        self.served_by: AttemptRecord | None = None
        self.ended: str | None = None
        self._events = 0  # the log's next sequence number: chunks and markers

    # -- what the relay reads -------------------------------------------------------------

    @property
    def chunk_count(self) -> int:
        return len(self.contents)

    @property
    def content_chunks(self) -> int:
        return sum(content is not None for content in self.contents)

    @property
    def text(self) -> str:
        return "".join(content or "" for content in self.contents)

    @property
    def upstream(self) -> str:
        return self.resolved if self.served_by is None else self.served_by.upstream

    @property
    def next_seq(self) -> int:
        return self._events

    def continuation_refused(self, limit: int) -> str | None:
        return continuation_refusal(self.continuable, self.continuations, limit)

    # -- what the relay tells it ----------------------------------------------------------

    def record_attempt(self, upstream: str, replica: str, outcome: str, ms: float) -> None:
        record = AttemptRecord(upstream, replica, outcome, ms)
        self.attempts.append(record)
        self.log.append(("attempt", upstream, replica, outcome))
        if outcome == "ok":
            self.served_by = record

    def append_chunk(self, payload: bytes, read: ChunkRead) -> None:
        self.contents.append(read.content)
        self.log.append(("chunk",))
        self._events += 1

    def record_continuation(self, record: ContinuationRecord) -> None:
        self.continuations.append(record)
        self.log.append(("continuation", record.outcome))
        if record.outcome == "ok":
            self._events += 1  # its marker

    def finish_at_length(self) -> None:
        self.log.append(("finish_at_length",))
        self.ended = "length"

    def finish(self) -> None:
        self.log.append(("finish",))
        self.ended = "done"

    def raise_if_interrupted(self) -> None:
        pass

    # -- what a test reads ----------------------------------------------------------------

    def steps(self) -> list[tuple[str, ...]]:
        """``log`` with each run of chunks as one ``("chunks", n)``."""
        steps: list[tuple[str, ...]] = []
        for entry in self.log:
            if entry == ("chunk",) and steps and steps[-1][0] == "chunks":
                steps[-1] = ("chunks", str(int(steps[-1][1]) + 1))
            elif entry == ("chunk",):
                steps.append(("chunks", "1"))
            else:
                steps.append(entry)
        return steps


@pytest.fixture(scope="module")
def fakes() -> Iterator[list[FakeUpstream]]:
    with FakeUpstream() as a, FakeUpstream() as b, FakeUpstream() as c:
        yield [a, b, c]


@pytest.fixture
def replicas(fakes: list[FakeUpstream]) -> list[FakeUpstream]:
    """Three fake upstreams, A, B and C, their records and defaults cleared."""
    for fake in fakes:
        fake.reset()
        fake.defaults.clear()
    return fakes


@contextmanager
def relay_of(
    upstreams: Mapping[str, Any],
    *,
    max_continuations: int | None = 2,
    max_tokens: int | None = None,
    resume: Resume | None = None,
) -> Iterator[UpstreamRelay]:
    """A stage's relay, as the manager makes one, for a request of the model ``fake``
    routed to the first of ``upstreams`` (``STAGESERVER_UPSTREAMS``); its replicas'
    clients closed afterwards. ``max_continuations``: None, continuation off."""
    config: dict[str, Any] = {"STAGESERVER_UPSTREAMS": dict(upstreams)}
    apply_defaults(config, {})
    registry = UpstreamRegistry(upstream_configs(config))
    try:
        replica_sets = ReplicaSets(registry)
        modes = ContinuationModes(registry, probe_timeout=1)
        continuations = (
            None
            if max_continuations is None
            else Continuations(modes, replica_sets, max_continuations)
        )
        body = RequestBody(Conversation.of_prompts("fake", "hi", max_tokens=max_tokens), 512)
        route = replica_sets.route(next(iter(upstreams)))
        yield UpstreamRelay(
            route, body, {"X-Request-ID": "relayed"}, continuations=continuations, resume=resume
        )
    finally:
        registry.close()


def chats(server: FakeUpstream) -> list[UpstreamRequest]:
    return [r for r in server.requests if r.path.endswith("/chat/completions")]


def continued_body(first: dict[str, Any], prefix: str, budget: int) -> dict[str, Any]:
    """The body of a ``trailing`` continuation of the chat request ``first``."""
    partial = {"role": "assistant", "content": prefix}
    return {**first, "messages": [*first["messages"], partial], "max_tokens": budget}


# -- before the first chunk: the route's attempts, in order -------------------------------


def test_replicas_that_fail_before_the_first_chunk_are_followed_by_the_others_then_the_fallbacks(
    replicas: list[FakeUpstream],
) -> None:
    a, b, c = replicas
    for down in (a, b):
        down.defaults.update(mode="status", status="503")
    upstreams = {
        "main": {"urls": [a.url, b.url], "retries": 3, "fallbacks": ["spare"]},
        "spare": {"url": c.url},
    }
    stage = RecordingStage("main")
    with relay_of(upstreams) as relay:
        relay.run(stage)

    first, second, third = stage.attempts
    # Each replica of the upstream once, in either order (two random choices), then the
    # fallback's: every attempt before the first chunk reached the stage.
    assert {(first.upstream, first.replica), (second.upstream, second.replica)} == {
        ("main", a.url),
        ("main", b.url),
    }
    assert (first.outcome, second.outcome) == ("http_503", "http_503")
    assert (third.upstream, third.replica, third.outcome) == ("spare", c.url, "ok")
    assert stage.steps() == [
        ("attempt", "main", first.replica, "http_503"),
        ("attempt", "main", second.replica, "http_503"),
        ("attempt", "spare", c.url, "ok"),
        ("chunks", "7"),  # 5 pieces, the finish, the usage
        ("finish",),
    ]
    assert [len(chats(server)) for server in (a, b, c)] == [1, 1, 1]
    assert stage.text == toks(5)
    assert stage.continuations == []


@pytest.mark.parametrize(
    ("status", "failed_over"), [("429", True), ("502", True), ("400", False), ("404", False)]
)
def test_a_busy_or_failing_replica_is_worth_another_and_a_refused_request_is_not(
    replicas: list[FakeUpstream], status: str, failed_over: bool
) -> None:
    a, c = replicas[0], replicas[2]
    a.defaults.update(mode="status", status=status)
    upstreams = {"main": {"url": a.url, "fallbacks": ["spare"]}, "spare": {"url": c.url}}
    stage = RecordingStage("main")
    with relay_of(upstreams) as relay:
        if failed_over:
            relay.run(stage)
        else:
            with pytest.raises(UpstreamStatusError) as refused:
                relay.run(stage)
            assert refused.value.upstream_status == int(status)

    tried = [("attempt", "main", a.url, f"http_{status}")]
    if failed_over:
        assert stage.steps() == [*tried, ("attempt", "spare", c.url, "ok"), ("chunks", "7"),
                                 ("finish",)]  # fmt: skip
    else:
        assert stage.steps() == tried
    assert (len(chats(a)), len(chats(c))) == (1, int(failed_over))


def test_the_retries_bound_the_attempts_and_the_last_failure_names_each(
    replicas: list[FakeUpstream],
) -> None:
    for server in replicas:
        server.defaults.update(mode="status", status="500")
    a, b, c = replicas
    one_retry = {
        "main": {"urls": [a.url, b.url], "retries": 1, "fallbacks": ["spare"]},
        "spare": {"url": c.url},
    }
    stage = RecordingStage("main")
    with relay_of(one_retry) as relay, pytest.raises(AllAttemptsFailed) as failed:
        relay.run(stage)

    # One attempt and one retry: both replicas of the upstream; its fallback never asked.
    assert [(r.upstream, r.outcome) for r in stage.attempts] == [("main", "http_500")] * 2
    assert {r.replica for r in stage.attempts} == {a.url, b.url}
    assert (len(chats(a)), len(chats(b)), len(chats(c))) == (1, 1, 0)
    first, second = stage.attempts
    assert str(failed.value).startswith(
        "upstream 'main': all 2 attempts failed before the first token "
        f"('main' at {first.replica}: http_500; 'main' at {second.replica}: http_500); "
        "the last: upstream 'main' answered HTTP 500"
    )
    assert stage.chunk_count == 0 and stage.ended is None


def test_a_stream_dropped_before_its_first_chunk_is_failed_over_and_never_continued(
    replicas: list[FakeUpstream],
) -> None:
    a, c = replicas[0], replicas[2]
    a.defaults.update(CUT, after="0")  # its headers, then the connection drops
    upstreams = {
        "main": {"url": a.url, "continuation": "trailing", "fallbacks": ["spare"]},
        "spare": {"url": c.url, "continuation": "trailing"},
    }
    stage = RecordingStage("main")
    with relay_of(upstreams) as relay:
        relay.run(stage)
    assert stage.steps() == [
        ("attempt", "main", a.url, "reset"),
        ("attempt", "spare", c.url, "ok"),
        ("chunks", "7"),
        ("finish",),
    ]
    assert stage.continuations == []

    alone = RecordingStage("main")
    with relay_of({"main": {"url": a.url, "continuation": "trailing"}}) as relay:
        with pytest.raises(UpstreamProtocolError):
            relay.run(alone)
    # Nothing was delivered: there is nothing to continue, and no continuation is asked.
    assert alone.steps() == [("attempt", "main", a.url, "reset")]
    assert alone.continuations == []
    assert len(chats(a)) == 2


# -- after the first chunk: never again, but continued ------------------------------------


def test_nothing_is_retried_after_the_first_chunk(replicas: list[FakeUpstream]) -> None:
    a, c = replicas[0], replicas[2]
    a.defaults.update(mode="drop", after="2")
    upstreams = {"main": {"url": a.url, "fallbacks": ["spare"]}, "spare": {"url": c.url}}
    stage = RecordingStage("main")
    with relay_of(upstreams, max_continuations=None) as relay:
        with pytest.raises(UpstreamProtocolError) as cut:
            relay.run(stage)

    cause = f"upstream 'main' dropped the connection mid-stream after 2 chunks: {DROPPED}"
    assert str(cut.value) == cause
    # The fallback was there, and is not asked: the client has had content already.
    assert (len(chats(a)), len(chats(c))) == (1, 0)
    assert stage.steps() == [
        ("attempt", "main", a.url, "ok"),
        ("chunks", "2"),
        ("continuation", "refused"),
    ]
    assert stage.continuations == [
        ContinuationRecord(
            1, "upstream_failed", "none", "refused", cause=cause, error="continuation is off"
        )
    ]
    assert stage.ended is None


def test_a_cut_answer_is_continued_on_another_replica_of_its_upstream_in_its_mode(
    replicas: list[FakeUpstream],
) -> None:
    a, b = replicas[:2]
    for server in (a, b):
        server.defaults.update(CUT)
    upstreams = {"main": {"urls": [a.url, b.url], "continuation": "trailing"}}
    stage = RecordingStage("main")
    with relay_of(upstreams) as relay:
        relay.run(stage)

    cut, continued = stage.attempts
    assert (cut.outcome, continued.outcome) == ("ok", "ok")
    assert {cut.replica, continued.replica} == {a.url, b.url}  # not the one that failed
    cause = f"upstream 'main' dropped the connection mid-stream after 20 chunks: {DROPPED}"
    assert stage.continuations == [
        ContinuationRecord(
            19, "upstream_failed", "trailing", "ok", model="fake", upstream="main",
            from_replica=cut.replica, to_replica=continued.replica, cause=cause,
        )
    ]  # fmt: skip
    assert stage.steps() == [
        ("attempt", "main", cut.replica, "ok"),
        ("chunks", "20"),
        ("attempt", "main", continued.replica, "ok"),
        ("continuation", "ok"),
        ("chunks", "42"),  # the 40 pieces left, the finish, the usage
        ("finish",),
    ]
    assert stage.text == toks(60)
    [first] = chats(a if cut.replica == a.url else b)
    [second] = chats(b if cut.replica == a.url else a)
    assert first.body["messages"] == HI and first.body["max_tokens"] == DEFAULT_MAX_TOKENS
    assert second.body == continued_body(first.body, toks(20).rstrip(), DEFAULT_MAX_TOKENS - 20)


def test_a_continuation_goes_to_the_first_upstream_of_the_route_that_continues_in_its_mode(
    replicas: list[FakeUpstream],
) -> None:
    a, c = replicas[0], replicas[2]
    a.defaults.update(CUT)
    c.defaults.update(chunks="60", continuation="flag")
    upstreams = {
        "main": {"url": a.url, "continuation": "none", "fallbacks": ["spare"]},
        "spare": {"url": c.url, "continuation": "flag"},
    }
    stage = RecordingStage("main")
    with relay_of(upstreams) as relay:
        relay.run(stage)

    [record] = stage.continuations
    assert (record.outcome, record.mode, record.upstream) == ("ok", "flag", "spare")
    assert (record.from_replica, record.to_replica) == (a.url, c.url)
    assert [(r.upstream, r.outcome) for r in stage.attempts] == [("main", "ok"), ("spare", "ok")]
    [first], [second] = chats(a), chats(c)
    assert second.body == {
        **continued_body(first.body, toks(20).rstrip(), DEFAULT_MAX_TOKENS - 20),
        "continue_final_message": True,
        "add_generation_prompt": False,
    }
    assert stage.text == toks(60) and stage.ended == "done"


def test_a_stage_taken_over_is_continued_first_from_what_its_log_held(
    replicas: list[FakeUpstream],
) -> None:
    a = replicas[0]
    a.defaults.update(WHOLE)
    stage = RecordingStage("main")
    for n in range(10):  # what the dead owner's log held: 10 chunks, and no attempt
        stage.append_chunk(b"{}", ChunkRead(content=f"tok{n} "))
    cause = StageFailure("its owner's lease lapsed")
    resume = Resume("owner_lost", cause, "host:1", "host:2")
    upstreams = {"main": {"url": a.url, "continuation": "trailing"}}
    with relay_of(upstreams, resume=resume) as relay:
        relay.run(stage)

    [request] = chats(a)  # the first request this relay makes is the continuation
    assert request.body["messages"] == [*HI, {"role": "assistant", "content": toks(10).rstrip()}]
    assert request.body["max_tokens"] == DEFAULT_MAX_TOKENS - 10
    assert stage.continuations == [
        ContinuationRecord(
            9, "owner_lost", "trailing", "ok", model="fake", upstream="main",
            to_replica=a.url, from_worker="host:1", to_worker="host:2",
            cause="its owner's lease lapsed",
        )
    ]  # fmt: skip
    assert stage.text == toks(60) and stage.ended == "done"


# -- a continuation refused, or failed -----------------------------------------------------


def test_a_continuation_past_the_limit_is_refused_and_the_cut_ends_the_stage(
    replicas: list[FakeUpstream],
) -> None:
    a = replicas[0]
    a.defaults.update(CUT)
    upstreams = {"main": {"url": a.url, "continuation": "trailing"}}
    stage = RecordingStage("main")
    with relay_of(upstreams, max_continuations=0) as relay:
        with pytest.raises(UpstreamProtocolError):
            relay.run(stage)

    [record] = stage.continuations
    assert (record.outcome, record.mode, record.reason) == ("refused", "none", "upstream_failed")
    assert record.error == "it was continued 0 times already (STAGESERVER_MAX_CONTINUATIONS)"
    assert len(chats(a)) == 1


def test_a_continuation_is_refused_when_no_upstream_of_the_route_can_continue(
    replicas: list[FakeUpstream],
) -> None:
    a = replicas[0]
    a.defaults.update(CUT)
    stage = RecordingStage("main")
    with relay_of({"main": {"url": a.url, "continuation": "none"}}) as relay:
        with pytest.raises(UpstreamProtocolError):
            relay.run(stage)

    [record] = stage.continuations
    assert (record.outcome, record.mode) == ("refused", "none")
    assert record.error == "upstream 'main' cannot continue an answer (none)"
    assert len(chats(a)) == 1


def test_an_answer_cut_with_no_token_left_ends_at_its_length_without_a_continuation(
    replicas: list[FakeUpstream],
) -> None:
    a = replicas[0]
    a.defaults.update(CUT)
    stage = RecordingStage("main")
    with relay_of({"main": {"url": a.url, "continuation": "trailing"}}, max_tokens=20) as relay:
        relay.run(stage)

    assert stage.continuations == [ContinuationRecord(19, "upstream_failed", "trailing", "length")]
    assert stage.steps()[-2:] == [("continuation", "length"), ("finish_at_length",)]
    assert stage.ended == "length"
    assert len(chats(a)) == 1


def test_a_continuation_that_fails_before_its_first_chunk_ends_the_stage_saying_both(
    replicas: list[FakeUpstream],
) -> None:
    a = replicas[0]
    a.defaults.update(CUT, continued_status="500")
    stage = RecordingStage("main")
    with relay_of({"main": {"url": a.url, "continuation": "trailing"}}) as relay:
        with pytest.raises(ContinuationFailed) as failed:
            relay.run(stage)

    cause = f"upstream 'main' dropped the connection mid-stream after 20 chunks: {DROPPED}"
    [record] = stage.continuations
    assert (record.outcome, record.mode, record.cause) == ("failed", "trailing", cause)
    assert record.error.startswith("upstream 'main' answered HTTP 500")
    assert str(failed.value) == f"{cause}; its continuation failed: {record.error}"
    # The one replica, asked again for the continuation (no other can serve it), once.
    assert [(r.replica, r.outcome) for r in stage.attempts] == [(a.url, "ok"), (a.url, "http_500")]
    assert len(chats(a)) == 2
