"""Answers that outlive what breaks under them (issue 20): a host SIGKILLed with its
stages in flight, and a replica that cuts its answers mid-way. The fake upstream
continues a trailing assistant message (as llama-server does), and each host is told so
(``STAGESERVER_UPSTREAM_CONTINUATION=trailing``, or ``continuation`` in a pool).

Every client must read the scripted answer (``tok0 tok1 ...``) exactly once: its events'
ids count up from 0, each named after its event, with one ``continued`` where its answer
was continued, and ``done`` last. What is timed comes from the moment each read of a
client's body returned (``Follower.arrivals``), an event at the read that completed it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

from testing.fake_upstream import FakeUpstream, UpstreamRequest
from testing.servers import Gunicorn, RedisServer
from testing.sse import chunk_text, parse_events, stage_status

from .clients import Follower, one_terminal, start_and_leave, watch
from .harness import SETTLE_SECONDS, Outcome, Rig, start_rig, wait_until

#: The owner's lease in ``host-sigkill``: a stage is taken over within two of them.
LEASE_SECONDS = 2
_CHUNK = "chat_completion_chunk"

Timed = list[tuple[float, dict[str, Any]]]


def host_sigkill(quick: bool) -> Outcome:
    """Resumable stages on A, a watcher of each through B, one Redis; A (its arbiter and
    its worker) SIGKILLed once every watcher has a chunk. B takes each stage over and
    continues its answer: each watcher reads it whole, once, with one ``continued``
    (``owner_lost``). Reported: the time from the kill to each stream's first chunk
    after its ``continued`` (a chunk A wrote before it died may reach B just after the
    kill: it is not the stream going on), which must be within two leases."""
    out = Outcome("owner SIGKILL, continued")
    n, chunks, interval = (10 if quick else 100), 400, 0.05
    ids = [f"hk-{i}" for i in range(n)]
    model = f"fake?chunks={chunks}&interval={interval}"
    with two_hosts_on_redis() as rig:
        (a, b), (probe_a, probe_b) = rig.servers, rig.probes
        for stage_id in ids:
            start_and_leave(a.url, stage_id, model)
        watchers = [watch(b.url, stage_id) for stage_id in ids]
        for watcher in watchers:
            watcher.first_chunk.wait(10)
        early = sum(w.ended_at is not None or w.failure is not None for w in watchers)
        out.check(early == 0, f"{early} watchers had ended before the kill")
        killed = kill_host(a, probe_a.pid)
        join_all(watchers, chunks * interval + 30)

        whole = 0
        resumed: list[float] = []
        for stage_id, watcher in zip(ids, watchers, strict=True):
            timed = timed_events(watcher)
            problem = whole_once(stage_id, [e for _, e in timed], chunks, "owner_lost")
            whole += out.check(
                problem is None, f"watcher of {stage_id}: {watcher.failure or problem}"
            )
            around = around_continued(timed)
            if around is not None:
                resumed.append(around[2] - killed)
        statuses = [stage_status(b.url, stage_id) for stage_id in ids]
        done = sum(
            s.get("status") == "done" and len(s.get("continuations") or []) == 1 for s in statuses
        )
        out.check(done == n, f"{n - done} statuses on B are not `done` with one continuation")
        ends = [w.ended_at for w in watchers if w.ended_at is not None]
        out.time_to_terminal = max(ends) - killed if ends else None
        out.happened = (
            f"{whole}/{n} watchers on B read the whole answer once, with one `continued` "
            f"(owner_lost); {done}/{n} statuses `done`"
        )
        if resumed:
            out.lines.append(
                f"- owner SIGKILL, continued ({n} stages of {chunks} chunks, one every "
                f"{interval:g} s; STAGESERVER_OWNER_LEASE_SECONDS={LEASE_SECONDS}): from the "
                f"kill to each stream's next chunk (its first after `continued`): "
                f"{spread(resumed)}; {len(resumed)} of {n} streams went on"
            )
            p99 = percentile(resumed, 99)
            out.check(
                p99 <= 2 * LEASE_SECONDS,
                f"kill to next chunk p99 {p99:.2f} s, beyond two leases ({2 * LEASE_SECONDS} s)",
            )
        # A is gone, arbiter and all: what is left over is B's alone.
        Rig([b], [probe_b], rig.upstream_connections, rig.meter).finish(out)
    return out


@contextmanager
def two_hosts_on_redis() -> Iterator[Rig]:
    """``host-sigkill``'s rig, for every API: hosts A and B on one Redis, A's lease
    ``LEASE_SECONDS``, both on a fake upstream that continues a trailing assistant
    message, as they are told."""
    with FakeUpstream(defaults={"continuation": "trailing"}) as fake, ExitStack() as stack:
        redis = RedisServer()
        stack.callback(redis.stop)
        yield start_rig(
            stack, fake.url, fake.port, lambda: fake.open_connections, names=("A", "B"),
            store_ports={redis.port}, STAGESERVER_STORE_URL=redis.url,
            STAGESERVER_OWNER_LEASE_SECONDS=str(LEASE_SECONDS),
            STAGESERVER_UPSTREAM_CONTINUATION="trailing",
        )  # fmt: skip


@contextmanager
def replica_cut_rig(cut: int) -> Iterator[tuple[Rig, FakeUpstream, FakeUpstream]]:
    """``replica-cut``'s rig, for every API: one host, no Redis, a pool of two replicas
    that continue a trailing assistant message; the first drops each answer after ``cut``
    chunks. The rig, and the two replicas."""
    with (
        FakeUpstream(defaults={"mode": "drop", "after": cut, "continuation": "trailing"}) as one,
        FakeUpstream(defaults={"continuation": "trailing"}) as two,
        ExitStack() as stack,
    ):
        pool = {"urls": [one.url, two.url], "continuation": "trailing", "kind": "openai"}
        rig = start_rig(
            stack, one.url, one.port, lambda: one.open_connections + two.open_connections,
            STAGESERVER_UPSTREAMS=json.dumps({"default": pool}),
        )  # fmt: skip
        # The probe tells apart the sockets to replica 1 alone: the baseline is taken again
        # once the warm-up's connection, to either replica, has expired.
        wait_until(lambda: rig.upstream_connections() == 0, SETTLE_SECONDS)
        rig.probe.baseline = rig.probe.snapshot()
        yield rig, one, two


def join_all(followers: Sequence[Follower], seconds: float) -> None:
    """Wait for every follower, ``seconds`` in all (not each: a stuck run ends)."""
    deadline = time.monotonic() + seconds
    for follower in followers:
        follower.join(max(deadline - time.monotonic(), 0.0))


def kill_host(host: Gunicorn, worker: int) -> float:
    """SIGKILL a whole host: its arbiter stopped first, so that it respawns no worker and
    its worker does not see its parent go (and drain), then the worker, then the arbiter.
    The moment the worker was killed."""
    os.kill(host.proc.pid, signal.SIGSTOP)
    os.kill(worker, signal.SIGKILL)
    killed = time.monotonic()
    os.kill(host.proc.pid, signal.SIGKILL)
    host.proc.wait(timeout=10)
    return killed


def replica_cut(quick: bool) -> Outcome:
    """One host, no Redis, an upstream of two replicas; the first drops each answer after
    50 of its 200 chunks, the second is sound. The streams are balanced over the two; each
    one cut is continued on the second replica: its client reads the whole answer once,
    with one ``continued`` (``upstream_failed``), and one never cut reads it with none.
    Reported: the gap a client of a cut stream sees, from the last chunk before
    ``continued`` to the first after it, beside the gaps between its other chunks. The
    time to terminal runs from the first cut to the last ``done``."""
    out = Outcome("replica cut mid-answer")
    n, chunks, cut, interval = (10 if quick else 100), 200, 50, 0.02
    model = f"fake?chunks={chunks}&interval={interval}"
    ids = [f"rc-{i}" for i in range(n)]
    with replica_cut_rig(cut) as (rig, one, two):
        streams = [tagged_chat(rig.server.url, stage_id, model) for stage_id in ids]
        join_all(streams, chunks * interval + 30)

        whole = cut_streams = 0
        gaps: list[float] = []
        steady: list[float] = []
        cuts: list[float] = []
        for stage_id, stream in zip(ids, streams, strict=True):
            on_one, on_two = seen(one, stage_id), seen(two, stage_id)
            cuts += [r.finished_at for r in on_one if r.finished_at is not None]
            cut_streams += bool(on_one)
            asked = (len(on_one), len(on_two)) in ((1, 1), (0, 1))
            timed = timed_events(stream)
            problem = None if asked else f"asked replica 1 {len(on_one)}, 2 {len(on_two)} times"
            problem = problem or whole_once(
                stage_id, [e for _, e in timed], chunks, "upstream_failed" if on_one else None
            )
            whole += out.check(problem is None, f"stream {stage_id}: {stream.failure or problem}")
            around = around_continued(timed)
            if around is not None:
                gaps.append(around[2] - around[0])
            steady += chunk_gaps(timed)
        out.check(cut_streams > 0, "no stream was cut: the pool sent none to replica 1")
        ends = [s.ended_at for s in streams if s.ended_at is not None]
        out.time_to_terminal = max(ends) - min(cuts) if ends and cuts else None
        out.happened = (
            f"{whole}/{n} clients read the whole answer once; {cut_streams} cut on replica 1 "
            f"after {cut} chunks and continued on replica 2, with one `continued` "
            f"(upstream_failed), {n - cut_streams} served by replica 2 alone"
        )
        if gaps:
            out.lines.append(
                f"- replica cut mid-answer ({n} streams of {chunks} chunks, one every "
                f"{interval:g} s): the gap around `continued`, {spread(gaps)}; between "
                f"the other chunks, {spread(steady)}"
            )
        rig.finish(out)
    return out


def tagged_chat(url: str, stage_id: str, model: str) -> Follower:
    """``clients.chat``, with the stage's id as its request id: what the upstream sees."""
    body = {"stage_id": stage_id, "model_name": model, "user_prompt": "hi", "stream": True}
    return Follower("POST", f"{url}/chat", body=body, headers={"X-Request-ID": stage_id})


def seen(fake: FakeUpstream, request_id: str) -> list[UpstreamRequest]:
    """What ``fake`` was asked for one stage, in order."""
    return [r for r in fake.requests if r.headers.get("x-request-id") == request_id]


def timed_events(follower: Follower) -> Timed:
    """The events of ``follower``'s body that have an id, each with the moment the read
    that completed it returned."""
    timed: Timed = []
    arrivals = list(follower.arrivals)  # the wire grows first: cut at its last read
    wire = follower.wire[: arrivals[-1][0]] if arrivals else b""
    start = read = 0
    while (end := wire.find(b"\n\n", start) + 2) > 1:
        while arrivals[read][0] < end:
            read += 1
        timed += [(arrivals[read][1], e) for e in parse_events(wire[start:end]) if "id" in e]
        start = end
    return timed


def whole_once(
    stage_id: str, events: Sequence[dict[str, Any]], chunks: int, reason: str | None
) -> str | None:
    """A problem, or None when ``events`` (those with an id) are the scripted answer of
    ``chunks`` pieces once: ids counting up from 0, each named after its event, one
    ``continued`` for ``reason`` (none when it is None) and ``done`` last."""
    ided = [e for e in events if "id" in e]
    errors = [e["data"].get("error") for e in ided if e["event"] == "error"]
    if errors:
        return f"an error: {errors[0]}"
    problem = one_terminal(ided)
    if problem is None and ided[-1]["event"] != "done":
        problem = f"ended with {ided[-1]['event']}"
    if problem is not None:
        return problem
    names = ["chunk" if e["event"] == _CHUNK else e["event"] for e in ided]
    if [e["id"] for e in ided] != [f"{stage_id}-{name}-{k}" for k, name in enumerate(names)]:
        return f"ids not each once in order: {[e['id'] for e in ided][:3]}..."
    continued = [(k, e["data"]) for k, e in enumerate(ided) if e["event"] == "continued"]
    if len(continued) != (reason is not None):
        return f"{len(continued)} `continued` events"
    for k, data in continued:
        expected = {"stage_id": stage_id, "after": k - 1, "reason": reason, "mode": "trailing"}
        if {key: data.get(key) for key in expected} != expected:
            return f"`continued` says {data}"
    if chunk_text(ided) != "".join(f"tok{k} " for k in range(chunks)):
        return "the text has a gap or a repeat"
    return None


def around_continued(timed: Timed) -> tuple[float, float, float] | None:
    """When the last chunk before the ``continued`` event, it, and the first chunk after it
    were read; None without one."""
    marks = [k for k, (_, e) in enumerate(timed) if e["event"] == "continued"]
    if len(marks) != 1:
        return None
    k = marks[0]
    before = [t for t, e in timed[:k] if e["event"] == _CHUNK]
    after = [t for t, e in timed[k + 1 :] if e["event"] == _CHUNK]
    if not before or not after:
        return None
    return before[-1], timed[k][0], after[0]


def chunk_gaps(timed: Timed) -> list[float]:
    """The time between each two chunks read one after the other, with no ``continued``
    between them."""
    gaps: list[float] = []
    last: float | None = None
    for at, event in timed:
        if event["event"] == "continued":
            last = None
        elif event["event"] == _CHUNK:
            if last is not None:
                gaps.append(at - last)
            last = at
    return gaps


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank ``p``th percentile of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def spread(values: Sequence[float]) -> str:
    return (
        f"p50 {percentile(values, 50):.3f} s, p99 {percentile(values, 99):.3f} s, "
        f"max {max(values):.3f} s"
    )
