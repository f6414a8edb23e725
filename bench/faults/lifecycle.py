"""Faults of a worker's life: retired by gunicorn mid-stream, and quiet after a burst."""

from __future__ import annotations

import time
from contextlib import ExitStack

import requests

from stageserver.shutdown import SHUTDOWN_MESSAGE
from stageserver.upstream.transport.connections import KEEPALIVE_EXPIRY, SWEEP_SECONDS
from testing.fake_upstream import FakeUpstream
from testing.sse import post_chat

from .clients import chat, one_terminal
from .harness import Outcome, start_rig
from .swarm import run_swarm

_RETIRING = "Autorestarting worker after current request."


def worker_restart(quick: bool) -> Outcome:
    """Long streams open on the one worker; then requests until gunicorn retires it
    (``--max-requests``). Every stream must end with the shutdown ``error``, and a new
    worker serve."""
    out = Outcome("worker restart")
    n = 5 if quick else 20
    with FakeUpstream() as fake, ExitStack() as stack:
        # A few requests before the streams (the start-up probe, the warm-up stage and
        # scrape), then the n streams: the worker retires a few requests after them.
        rig = start_rig(
            stack,
            fake.url,
            fake.port,
            lambda: fake.open_connections,
            GUNICORN_CMD_ARGS=f"--max-requests {n + 10}",
        )
        server, probe = rig.server, rig.probe
        streams = [chat(server.url, f"wr-{i}", "fake?chunks=2000&interval=0.05") for i in range(n)]
        for stream in streams:
            stream.first_chunk.wait(10)
        asked = 0
        while _RETIRING not in server.log() and asked < 50:
            requests.get(f"{server.url}/healthz", timeout=10)
            asked += 1
        retired = time.monotonic()
        out.check(_RETIRING in server.log(), f"the worker did not retire after {asked} requests")
        for stream in streams:
            stream.join(30)
        good = 0
        for i, stream in enumerate(streams):
            events = stream.events()
            problem = one_terminal(events)
            if problem is None and events[-1]["data"].get("error") != SHUTDOWN_MESSAGE:
                problem = f"ended with {events[-1]['event']}: {events[-1]['data']}"
            good += out.check(problem is None, f"stream wr-{i}: {problem}")
        ends = [s.ended_at for s in streams if s.ended_at is not None]
        out.time_to_terminal = max(ends) - retired if ends else None
        chats = [r for r in fake.requests if r.options.get("chunks") == 2000]
        closed = fake.wait_for(lambda: all(r.client_closed_at is not None for r in chats), 10)
        out.check(closed and not any(r.done_sent for r in chats), "an upstream was not stopped")
        probe.follow_new_worker()
        serves = post_chat(server.url, stage_id="after-restart", stream=False).status_code == 200
        out.check(serves, "the new worker does not serve")
        out.happened = (
            f"retired after {asked} more requests; {good}/{n} streams got the shutdown "
            f"`error`; {len(chats)} upstreams closed; the new worker "
            + ("serves" if serves else "does not serve")
        )
        rig.finish(out)
    return out


def burst_then_quiet(quick: bool) -> Outcome:
    """A burst of concurrent streams on one worker, then nothing: its descriptors must
    fall back to the baseline within the pool's keep-alive expiry and one reaper period,
    with no traffic to trigger it."""
    out = Outcome("burst then quiet")
    n = 50 if quick else 300
    with FakeUpstream() as fake, ExitStack() as stack:
        rig = start_rig(
            stack, fake.url, fake.port, lambda: fake.open_connections, STAGESERVER_ACCESS_LOG=""
        )
        server, probe = rig.server, rig.probe
        started = time.monotonic()
        result = run_swarm(server.port, streams=n, concurrency=n, chunks=20, interval=0.05)
        peak = fake.connections_opened
        fell = None
        while time.monotonic() - result.last_end < 20:  # /proc only: no request is sent
            if probe.leftover()[0] <= 0:
                fell = time.monotonic() - result.last_end
                break
            time.sleep(0.1)
        bound = KEEPALIVE_EXPIRY + SWEEP_SECONDS
        out.check(
            result.done == n,
            f"{n - result.done} streams did not end with done: {dict(result.problems)}",
        )
        out.check(
            fell is not None and fell <= bound + 1.0,
            f"descriptors not back to the baseline within {bound + 1.0:g} s: {fell}",
        )
        out.time_to_terminal = fell  # here: until the worker let go of everything
        out.happened = (
            f"{result.done}/{n} done in {result.last_end - started:.1f} s over {peak} upstream "
            f"connections; then, with no traffic, the worker's descriptors back to the "
            f"baseline {'never' if fell is None else f'{fell:.1f} s after the last stream'} "
            f"(keep-alive expiry {KEEPALIVE_EXPIRY:g} s + reaper period {SWEEP_SECONDS:g} s)"
        )
        rig.finish(out)
    return out
