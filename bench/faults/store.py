"""Faults of the shared store's world: an owner that dies, a Redis that restarts empty, a
Sentinel failover. Two instances, A and B, share the store; stages run on A."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack

from testing.fake_upstream import FakeUpstream
from testing.servers import RedisServer, SentinelGroup
from testing.sse import post_chat, stage_status

from .clients import (
    Follower,
    chat,
    one_terminal,
    resumed_exactly_once,
    start_and_leave,
    status_of,
    watch,
)
from .harness import Outcome, Rig, start_rig, wait_until


def _pair(stack: ExitStack, fake: FakeUpstream, store_url: str, store_ports: set[int]) -> Rig:
    """Instances A and B sharing the store."""
    return start_rig(
        stack, fake.url, fake.port, lambda: fake.open_connections, names=("A", "B"),
        store_ports=store_ports, STAGESERVER_STORE_URL=store_url,
    )  # fmt: skip


def owner_sigkill(quick: bool) -> Outcome:
    """Resumable stages on A, a watcher of each through B; SIGKILL A's worker. The
    upstream cannot continue an answer (kind ``openai``, continuation ``auto``: none), so
    the worker that takes a stage over ends it with one ``error`` naming the dead worker
    (``host-sigkill`` of ``continuation.py`` is the same with an upstream that can)."""
    out = Outcome("owner SIGKILL")
    n = 5 if quick else 20
    ids = [f"ow-{i}" for i in range(n)]
    with FakeUpstream() as fake, ExitStack() as stack:
        redis = RedisServer()
        stack.callback(redis.stop)
        rig = _pair(stack, fake, redis.url, {redis.port})
        (a, b), (probe_a, _) = rig.servers, rig.probes
        for stage_id in ids:
            start_and_leave(a.url, stage_id, "fake?chunks=2000&interval=0.05")
        watchers = [watch(b.url, stage_id) for stage_id in ids]
        for watcher in watchers:
            watcher.first_chunk.wait(10)
        worker = probe_a.pid
        killed = time.monotonic()
        os.kill(worker, signal.SIGKILL)
        for watcher in watchers:
            watcher.join(30)
        named = f"({socket.gethostname()}:{worker}) stopped"
        good = sum(
            _one_error_naming(out, stage_id, watcher, named)
            for stage_id, watcher in zip(ids, watchers, strict=True)
        )
        statuses = [stage_status(b.url, stage_id) for stage_id in ids]
        errors = sum(s.get("status") == "error" and named in s.get("error", "") for s in statuses)
        out.check(errors == n, f"{n - errors} statuses on B are not the owner's death")
        reused = sum(
            post_chat(b.url, stage_id=stage_id, stream=False).status_code == 200 for stage_id in ids
        )
        out.check(reused == n, f"{n - reused} ids could not be used again")
        ends = [w.ended_at for w in watchers if w.ended_at is not None]
        out.time_to_terminal = max(ends) - killed if ends else None
        out.happened = (
            f"{good}/{n} watchers on B got one `error` naming the dead worker; "
            f"{errors}/{n} statuses `error`; {reused}/{n} ids reusable"
        )
        probe_a.follow_new_worker()
        rig.finish(out, logs=[b])  # A's log has the SIGKILL itself
    return out


def _one_error_naming(out: Outcome, stage_id: str, watcher: Follower, named: str) -> bool:
    events = watcher.events()
    problem = one_terminal(events)
    if problem is None and events[-1]["event"] != "error":
        problem = f"ended with {events[-1]['event']}"
    if problem is None and named not in events[-1]["data"]["error"]:
        problem = f"the error does not name the worker: {events[-1]['data']['error']}"
    ids = [e["id"] for e in events if "id" in e]
    if problem is None and ids != [f"{stage_id}-chunk-{k}" for k in range(len(ids) - 1)] + [
        f"{stage_id}-error-{len(ids) - 1}"
    ]:
        problem = "its ids are not the whole stage in order"
    return out.check(problem is None, f"watcher of {stage_id}: {problem}")


def redis_restart(quick: bool) -> Outcome:
    """Streams on A; redis-server killed, and started again (empty) 1.5 s later."""
    out = Outcome("Redis restart mid-stream")
    with FakeUpstream() as fake, ExitStack() as stack:
        redis = RedisServer()
        stack.callback(redis.stop)
        rig = _pair(stack, fake, redis.url, {redis.port})

        def outage() -> None:
            redis.kill()
            time.sleep(1.5)
            redis.start()

        _store_fault(out, rig, "rr", 5 if quick else 20, 60, outage, resume_within=15)
        rig.finish(out)
    return out


def sentinel_failover(quick: bool) -> Outcome:
    """Streams on A through Sentinel; the primary killed; the replica promoted."""
    out = Outcome("Sentinel failover")
    with FakeUpstream() as fake, ExitStack() as stack:
        group = SentinelGroup()
        stack.callback(group.stop)
        ports = {group.primary.port, group.replica.port, *group.ports}
        rig = _pair(stack, fake, group.url, ports)
        promoted: list[float] = []

        def failover() -> None:
            group.primary.kill()
            threading.Thread(target=watch_promotion, daemon=True).start()

        def watch_promotion() -> None:  # the sentinels' view, while the streams go on
            took = wait_until(lambda: _promoted(group), 30, 0.1)
            promoted.append(-1.0 if took is None else took)

        _store_fault(out, rig, "fo", 5 if quick else 20, 80, failover, resume_within=30)
        wait_until(lambda: bool(promoted), 30)
        out.check(bool(promoted) and promoted[0] >= 0, "the sentinels did not promote the replica")
        if promoted and promoted[0] >= 0:
            out.happened += f"; the replica promoted {promoted[0]:.1f} s after the kill"
        rig.finish(out)
    return out


def _promoted(group: SentinelGroup) -> bool:
    try:
        return group.primary_port() == group.replica.port
    except Exception:  # a sentinel busy with the failover: ask again
        return False


def _store_fault(
    out: Outcome, rig: Rig, prefix: str, n: int, chunks: int, fault: Callable[[], None], *,
    resume_within: float,
) -> None:  # fmt: skip
    """``n`` streams on A; ``fault()``; each local stream must go on to ``done``; then a
    client that had its first five events resumes through B: the rest, exactly once (or
    an error that says what was lost)."""
    a, b = rig.servers
    ids = [f"{prefix}-{i}" for i in range(n)]
    model = f"fake?chunks={chunks}&interval=0.05"
    streams = [chat(a.url, stage_id, model) for stage_id in ids]
    for stream in streams:
        stream.first_chunk.wait(10)
    injected = time.monotonic()
    fault()
    for stream in streams:
        stream.join(60)
    done = 0
    for stage_id, stream in zip(ids, streams, strict=True):
        events = stream.events()
        problem = one_terminal(events) or resumed_exactly_once(stage_id, events, [], chunks)
        done += out.check(problem is None, f"local stream {stage_id}: {problem}")
    ends = [s.ended_at for s in streams if s.ended_at is not None]
    out.time_to_terminal = max(ends) - injected if ends else None
    # Through B, once the store has the stage's end (after the catch-up, or the failover).
    reached = wait_until(
        lambda: all(status_of(b.url, i) == "done" for i in ids), resume_within, 0.2
    )
    out.check(reached is not None, f"B did not see every stage done within {resume_within:g} s")
    exact = lost = 0
    for stage_id, stream in zip(ids, streams, strict=True):
        before = [e for e in stream.events() if "id" in e][:5]
        resumed = watch(b.url, stage_id, before[-1]["id"])
        resumed.join(30)
        problem = resumed_exactly_once(stage_id, before, resumed.events(), chunks)
        said_what = (
            problem is not None
            and problem.startswith("ended with error")
            and ("lost" in problem or "not in the stage store" in problem)
        )
        exact += problem is None
        lost += said_what
        out.check(problem is None or said_what, f"resume of {stage_id} through B: {problem}")
    out.happened = (
        f"{done}/{n} local streams went on to `done`; resumes through B: {exact}/{n} "
        f"exactly once, {lost} told what was lost"
    )
