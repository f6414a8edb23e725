"""A stage in-process, with plain bytes: its log, its listeners, its end, its follow loop.

No server and no upstream: a scripted relay plays the part of the upstream relay through
the same narrow interface (``append_chunk``, ``finish``, raising a failure).
"""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Iterator

import pytest

from stageserver.config import FollowSettings
from stageserver.errors import StageFailure, StageLost, UpstreamStatusError
from stageserver.sse import encode_retry
from stageserver.stages.chunk_read import ChunkRead
from stageserver.stages.events import lost_event
from stageserver.stages.feeds import LocalFeed
from stageserver.stages.log import EventLog
from stageserver.stages.spec import StageSpec
from stageserver.stages.stage import Stage, StageListener, Subscriber
from stageserver.stream import Framing, follow

# The scripted chunks carry no content, and the spec no prompt estimate.
NO_USAGE = b'"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0,"estimated":true}'
CHUNKS = [b'{"choices":[{"index":0,"delta":{"content":"a"}}]}', b'{"choices":[]}']


class ScriptedRelay:
    """Appends ``chunks``; then finishes, raises ``failure``, or waits until unblocked."""

    def __init__(
        self,
        chunks: list[bytes],
        *,
        failure: StageFailure | None = None,
        hold: bool = False,
        before_chunks: float = 0.0,
    ) -> None:
        self.chunks = chunks
        self.failure = failure
        self.before_chunks = before_chunks
        self._held = threading.Event() if hold else None

    def run(self, stage: Stage) -> None:
        time.sleep(self.before_chunks)
        for payload in self.chunks:
            stage.append_chunk(payload, ChunkRead())
        if self.failure is not None:
            raise self.failure
        if self._held is not None:
            self._held.wait(10)
            stage.raise_if_interrupted()
        stage.finish()

    def unblock(self) -> None:
        if self._held is not None:
            self._held.set()


class Recorder(StageListener):
    def __init__(self, name: str, calls: list[tuple[str, str, int]]) -> None:
        self.name = name
        self.calls = calls

    def on_start(self, stage: Stage) -> None:
        self.calls.append((self.name, "start", -1))

    def on_event(self, stage: Stage, seq: int, wire: bytes) -> None:
        self.calls.append((self.name, "event", seq))

    def on_finish(self, stage: Stage) -> None:
        self.calls.append((self.name, "finish", stage.next_seq))


class FinishOnly(StageListener):
    def __init__(self) -> None:
        self.finished: list[str] = []

    def on_finish(self, stage: Stage) -> None:
        self.finished.append(stage.status)


def spec(stage_id: str = "s", *, resumable: bool = False, grace: float = 1.0) -> StageSpec:
    return StageSpec(stage_id, "default", resumable, "rid", grace, max_events=100)


def run(stage: Stage) -> Stage:
    stage.start()
    stage.wait(5)
    return stage


def test_a_stage_is_its_events_as_exact_bytes() -> None:
    stage = run(Stage(spec(), ScriptedRelay(CHUNKS)))
    assert stage.read(0) == (
        b'id: s-chunk-0\nevent: chat_completion_chunk\ndata: {"stage_id":"s","chunk":'
        + CHUNKS[0]
        + b'}\n\nid: s-chunk-1\nevent: chat_completion_chunk\ndata: {"stage_id":"s","chunk":'
        + CHUNKS[1]
        + b'}\n\nid: s-done-2\nevent: done\ndata: {"stage_id":"s",'
        + NO_USAGE
        + b"}\n\n",
        3,
        True,
    )
    assert (stage.status, stage.chunk_count, stage.next_seq) == ("done", 2, 3)
    done = b'id: s-done-2\nevent: done\ndata: {"stage_id":"s",' + NO_USAGE + b"}\n\n"
    assert stage.read(2)[0] == done


def test_a_failure_ends_the_stage_with_one_error_event() -> None:
    failure = UpstreamStatusError("upstream 'default' answered HTTP 500: boom", 500)
    stage = run(Stage(spec("f"), ScriptedRelay(CHUNKS[:1], failure=failure)))
    assert stage.read(1)[0] == (
        b'id: f-error-1\nevent: error\ndata: {"stage_id":"f",'
        b'"error":"upstream \'default\' answered HTTP 500: boom"}\n\n'
    )
    assert (stage.status, stage.failure, stage.http_status) == ("error", failure, 502)


def test_a_cancel_interrupts_the_relay_and_ends_with_one_cancel_event() -> None:
    finished = FinishOnly()
    stage = Stage(spec("c"), ScriptedRelay(CHUNKS, hold=True), [finished])
    stage.start()
    assert stage.cancel("cancelled by request")
    stage.wait(5)
    assert stage.read(2)[0] == (
        b'id: c-cancel-2\nevent: cancel\ndata: {"stage_id":"c","reason":"cancelled by request",'
        + NO_USAGE
        + b"}\n\n"
    )
    assert not stage.cancel("again")  # finished: nothing to cancel
    assert finished.finished == ["cancelled"]


def test_listeners_hear_every_hook_in_the_order_they_were_given() -> None:
    calls: list[tuple[str, str, int]] = []
    listeners = [Recorder("store", calls), Recorder("registry", calls), FinishOnly()]
    run(Stage(spec(), ScriptedRelay(CHUNKS), listeners))
    assert calls == [
        ("store", "start", -1),
        ("registry", "start", -1),
        ("store", "event", 0),
        ("registry", "event", 0),
        ("store", "event", 1),
        ("registry", "event", 1),
        ("store", "finish", 3),  # the end first, then its event reaches anyone
        ("registry", "finish", 3),
        ("store", "event", 2),
        ("registry", "event", 2),
    ]


class ReadsAtItsEnd(StageListener):
    """What a subscriber would read while this listener's on_finish runs (it may wait)."""

    def __init__(self) -> None:
        self.read: tuple[bytes, int, bool] | None = None

    def on_finish(self, stage: Stage) -> None:
        self.read = stage.read(0)


def test_no_subscriber_reads_the_end_before_the_listeners_are_through() -> None:
    listener = ReadsAtItsEnd()
    stage = run(Stage(spec(), ScriptedRelay(CHUNKS), [listener]))
    assert listener.read is not None
    chunks, cursor, finished = listener.read
    assert (cursor, finished, chunks.count(b"event: chat_completion_chunk")) == (2, False, 2)
    assert b"event: done" not in chunks
    assert stage.read(0)[1:] == (3, True)


def test_a_relay_that_returns_without_finishing_still_ends_the_stage() -> None:
    class Quitter(ScriptedRelay):
        def run(self, stage: Stage) -> None:
            stage.append_chunk(CHUNKS[0], ChunkRead("a"))

    stage = run(Stage(spec("q"), Quitter([])))
    assert stage.status == "error"
    assert stage.error == "internal error in stageserver (stage q)"


def test_the_log_keeps_the_last_events_and_their_numbers() -> None:
    bounded = StageSpec("b", "default", False, "rid", 1.0, max_events=2)
    stage = run(Stage(bounded, ScriptedRelay(CHUNKS * 3)))
    assert [seq for seq, _ in stage.events_since(0)] == [5, 6]
    batch, cursor, finished = stage.read(0)
    assert (batch.count(b"\n\n"), cursor, finished) == (2, 7, True)


def test_a_reader_the_log_outran_is_told_never_skipped() -> None:
    """A reader slower than a bounded log: what it reads runs on without a gap from the
    first event, and then it is told the rest is gone (StageLost), never handed the
    oldest event kept as if it came next."""
    bounded = StageSpec("w", "default", False, "rid", 1.0, max_events=2)
    stage = Stage(bounded, ScriptedRelay(CHUNKS * 3, before_chunks=0.1))
    feed = LocalFeed(stage, owner=False)
    subscriber = Subscriber()
    feed.open(subscriber)
    stage.start()
    cursor, read = 0, list[int]()
    with pytest.raises(StageLost, match="are no longer kept"):
        while True:
            batch, after, finished = feed.read(subscriber, cursor, 5.0)
            read += range(cursor, after)
            assert batch.count(b"\n\n") == after - cursor  # each event it says it read
            cursor = after
            assert not finished, "a reader this slow cannot have read every event"
            time.sleep(0.05)  # slower than the relay
    assert read == list(range(len(read)))
    stage.wait(5)
    feed.close(subscriber, disconnected=False)


def test_a_resumable_stage_nobody_follows_is_cancelled_after_its_grace() -> None:
    watched = [True]
    stage = Stage(
        spec("g", resumable=True, grace=0.05),
        ScriptedRelay([], hold=True),
        watched_elsewhere=lambda stage_id: watched[0],
    )
    stage.start()
    subscriber = Subscriber()
    stage.attach(subscriber)
    stage.detach(subscriber, owner=True, disconnected=True)
    time.sleep(0.3)  # graces pass, but a watcher elsewhere keeps it alive
    assert stage.status == "running"
    watched[0] = False
    stage.wait(5)
    assert (stage.status, stage.cancel_reason) == (
        "cancelled",
        "no client re-attached within 0.05 s",
    )


def test_the_owners_disconnect_cancels_a_stage_that_is_not_resumable() -> None:
    stage = Stage(spec("d"), ScriptedRelay([], hold=True))
    stage.start()
    watcher, owner = Subscriber(), Subscriber()
    stage.attach(watcher)
    stage.attach(owner)
    stage.detach(watcher, owner=False, disconnected=True)
    assert stage.status == "running"  # a watcher's disconnect is only its own
    stage.detach(owner, owner=True, disconnected=True)
    stage.wait(5)
    assert (stage.status, stage.cancel_reason) == ("cancelled", "client disconnected")


def collect(events: Iterator[bytes]) -> list[bytes]:
    return [piece for piece in events if piece]


SEED_FRAMING = Framing(encode_retry(1500), lost_event)


def pace(heartbeat_seconds: float) -> FollowSettings:
    return FollowSettings(heartbeat_seconds, retry_ms=1500, send_timeout_seconds=0)


def followed(stage: Stage, heartbeat_seconds: float) -> Iterator[bytes]:
    """The pieces its own client's response yields, seed-framed, from the start."""
    return follow(
        LocalFeed(stage, owner=True),
        after_seq=-1,
        client_socket=None,
        settings=pace(heartbeat_seconds),
        framing=SEED_FRAMING,
    )


def test_follow_yields_heartbeats_while_quiet_then_the_events() -> None:
    stage = Stage(spec("h"), ScriptedRelay(CHUNKS[:1], before_chunks=0.25))
    stage.start()
    pieces = collect(followed(stage, 0.1))
    # The preamble goes out with the first write after the headers: here a heartbeat.
    assert pieces[:2] == [b"retry: 1500\n: heartbeat\n", b": heartbeat\n"]
    wire = b"".join(pieces).removeprefix(b"retry: 1500\n")
    assert wire.replace(b": heartbeat\n", b"") == stage.read(0)[0]
    done = b'id: h-done-1\nevent: done\ndata: {"stage_id":"h",' + NO_USAGE + b"}\n\n"
    assert pieces[-1].endswith(done)


def test_follow_sends_the_headers_alone_then_the_preamble_with_the_first_events() -> None:
    """Coalesced writes: the first yield is empty (gunicorn sends the headers), the next
    holds the preamble and every event the stage had; the bytes are the stage's log."""
    stage = run(Stage(spec("w"), ScriptedRelay(CHUNKS)))
    pieces = list(followed(stage, 1.0))
    assert pieces == [b"", b"retry: 1500\n" + stage.read(0)[0]]


@pytest.mark.parametrize("after_seq", [-1, 0, 1])
def test_follow_resumes_after_the_given_event(after_seq: int) -> None:
    stage = run(Stage(spec("r"), ScriptedRelay(CHUNKS)))
    wire = b"".join(
        follow(
            LocalFeed(stage, owner=False),
            after_seq=after_seq,
            client_socket=None,
            settings=pace(1.0),
            framing=SEED_FRAMING,
        )
    )
    rest = b"".join(w for seq, w in stage.events_since(0) if seq > after_seq)
    assert wire == b"retry: 1500\n" + rest


def test_the_log_is_bounded_in_bytes_and_keeps_the_newest() -> None:
    log = EventLog(max_events=100, max_bytes=25)
    for n in range(3):
        assert log.append(b"event-%03d\n" % n) == n  # 10 bytes each
    assert (log.first_seq, log.next_seq, len(log)) == (1, 3, 2)  # 30 > 25: the oldest went
    assert log.append(b"x" * 40) == 3  # larger than the bound: it alone stays
    assert (log.first_seq, log.read(0, log.next_seq)) == (3, (b"x" * 40, 4))


@pytest.mark.parametrize("end", [1, 4, 6, 7])
@pytest.mark.parametrize("cursor", [0, 2, 3, 5, 6, 9])
def test_a_compacted_log_reads_as_it_did(cursor: int, end: int) -> None:
    log = EventLog(max_events=4, max_bytes=1 << 20)
    for n in range(6):
        log.append(b"e%d;" % n)  # events 2 to 5 stay
    before = (log.read(cursor, end), log.since(cursor), log.first_seq, log.next_seq, len(log))
    assert before[0][0] == b"".join(b"e%d;" % n for n in range(max(cursor, 2), min(end, 6)))
    log.compact()
    after = (log.read(cursor, end), log.since(cursor), log.first_seq, log.next_seq, len(log))
    assert after == before
    with pytest.raises(RuntimeError, match="a compacted log takes no more events"):
        log.append(b"late")


def test_a_finished_stage_keeps_its_answer_not_its_request() -> None:
    stage = run(Stage(spec("k"), ScriptedRelay(CHUNKS)))
    assert (stage.text_parts, stage.read(0)[1]) == ([stage.text], 3)
    assert stage.cancel("late") is False  # nothing left to interrupt, nothing to fail on


@pytest.mark.parametrize("end", ["error", "cancel"])
def test_a_stage_ended_by_an_exception_is_freed_without_the_cyclic_collector(end: str) -> None:
    """The exception that ended a stage stays (its class and message), not the frames it
    was raised through: those hold the stage, in a cycle that only a full collection
    frees, long after the registry has let go of the stage, its text and its events."""
    gc.disable()  # no collector: only reference counts free the stage
    try:
        if end == "error":
            failing = ScriptedRelay(CHUNKS, failure=UpstreamStatusError("x", 500))
            stage = run(Stage(spec("e"), failing))
            del failing
            assert stage.error == "x"
        else:
            stage = Stage(spec("c"), ScriptedRelay(CHUNKS, hold=True))
            stage.start()
            stage.cancel("cancelled by request")
            stage.wait(5)
        assert stage.outcome == end
        freed = weakref.ref(stage)
        del stage
        assert freed() is None
    finally:
        gc.enable()
