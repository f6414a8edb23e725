"""Faults of clients: ones that never read, ones that half-close, and an EventSource that
comes back after the end."""

from __future__ import annotations

import socket
import time
from contextlib import ExitStack

from testing.fake_upstream import FakeUpstream
from testing.servers import Gunicorn
from testing.sse import post_chat, stage_status

from .clients import EventSourceClient, chat, raw_chat, read_to_close, status_of
from .harness import Outcome, WorkerProbe, start_rig, wait_until

_LONG = "fake?chunks=2000&interval=0.05"
_FROZEN_TTL = 2


def _cancelled_by_disconnect(url: str, ids: list[str]) -> bool:
    return all(
        (s := stage_status(url, i)).get("status") == "cancelled"
        and s.get("cancel_reason") == "client disconnected"
        for i in ids
    )


def frozen_clients(quick: bool) -> Outcome:
    """Clients that send their request and never read (a 4 KB receive buffer, 16 KB
    chunks): after the send timeout (2 s) each must be let go, its stage cancelled. Two
    rounds, so that what the first leaves in the worker's RSS is seen to be reused."""
    out = Outcome("frozen clients")
    n = 10 if quick else 40
    with FakeUpstream() as fake, ExitStack() as stack:
        # Each stage's log bounded to 1 MiB (the relay reads on while its client is
        # frozen: 40 logs of the default 8 MiB would be 320 MB), and finished stages kept
        # 2 s, not 600: their text, 16 KB a chunk, is what the TTL keeps, not a leak.
        rig = start_rig(
            stack, fake.url, fake.port, lambda: fake.open_connections,
            STAGESERVER_EVENT_LOG_MAX_BYTES=str(1 << 20),
            STAGESERVER_STAGE_TTL_SECONDS=str(_FROZEN_TTL),
            STAGESERVER_EVENT_TTL_SECONDS=str(_FROZEN_TTL),
        )  # fmt: skip
        server, probe = rig.server, rig.probe
        rss: list[int] = []
        for number in range(2):
            released = _freeze(out, server, fake, probe, [f"fz{number}-{i}" for i in range(n)])
            if number == 0:
                out.time_to_terminal = released
            # Past the TTL, one stage so that the registry drops the frozen ones (it sweeps
            # when a stage is added); then what the worker holds.
            time.sleep(_FROZEN_TTL + 0.5)
            post_chat(server.url, stage_id=f"sweep-{number}", stream=False)
            rss.append(probe.leftover()[2])
        reused = out.check(
            rss[1] <= rss[0] + max(rss[0], 0) * 0.1 + 1024,
            f"round 2 grew the worker's RSS further: {rss}",
        )
        out.happened = (
            f"2 × {n}: every stage cancelled (`client disconnected`) "
            f"{'never' if out.time_to_terminal is None else f'{out.time_to_terminal:.1f} s'} "
            f"after the requests (send timeout 2 s), every connection closed by the server, "
            f"every upstream closed; RSS {', '.join(f'{r / 1024:+.0f} MB' for r in rss)} "
            f"after rounds 1, 2 ({'the high-water mark of round 1, reused' if reused else 'grew'})"
        )
        rig.finish(out)
    return out


def _freeze(
    out: Outcome, server: Gunicorn, fake: FakeUpstream, probe: WorkerProbe, ids: list[str]
) -> float | None:
    """One round of frozen clients; the seconds until all were let go."""
    fake.reset()
    fake.defaults.update({"chunks": "400", "interval": "0.02", "text": "x" * 400 * 16384})
    socks = [raw_chat(server.port, stage_id, "fake", rcvbuf=4096) for stage_id in ids]
    try:
        released = wait_until(
            lambda: _cancelled_by_disconnect(server.url, ids) and probe.greenlets() == 0, 60, 0.1
        )
        out.check(released is not None, "not every frozen client was let go within 60 s")
        closed = sum(read_to_close(sock, 10) is not None for sock in socks)
        out.check(closed == len(ids), f"{len(ids) - closed} frozen connections left open")
    finally:
        for sock in socks:
            sock.close()
        fake.defaults.clear()
    chats = fake.requests
    stopped = fake.wait_for(lambda: all(r.client_closed_at is not None for r in chats), 10)
    out.check(stopped and len(chats) == len(ids), "an upstream of a frozen client ran on")
    return released


def eventsource_after_end(quick: bool) -> Outcome:
    """An EventSource follows each stage to its end; it comes back once, `retry:` (500 ms)
    later, with the `done` event's id, gets 204 and stops. Its requests are counted in
    the access log for 5 s after the end."""
    out = Outcome("EventSource after the end")
    n = 5 if quick else 20
    watch_seconds = 5.0
    with FakeUpstream() as fake, ExitStack() as stack:
        # The access log on, as by default: the requests are counted in it.
        rig = start_rig(stack, fake.url, fake.port, lambda: fake.open_connections)
        server = rig.server
        ids = [f"es-{i}" for i in range(n)]
        stages = [chat(server.url, stage_id, "fake?chunks=20&interval=0.05") for stage_id in ids]
        for stage in stages:
            stage.first_chunk.wait(10)
        sources = [EventSourceClient(server.url, stage_id, watch_seconds) for stage_id in ids]
        for source in sources:
            source.join(30)
        time.sleep(watch_seconds)  # any further request would show in the log meanwhile
        log = server.log()
        good, after = 0, []
        for stage_id, source in zip(ids, sources, strict=True):
            wanted = [f"{stage_id}-chunk-{k}" for k in range(22)] + [f"{stage_id}-done-22"]
            logged = log.count(f'"GET /stages/{stage_id}/events HTTP/1.1"')
            no_content = log.count(f'"GET /stages/{stage_id}/events HTTP/1.1" 204')
            ended = source.ended_at or float("inf")
            later = [status for sent, status in source.requests if sent > ended]
            after.append(len(later))
            ok = (source.ids == wanted and later == [204] and (logged, no_content) == (2, 1)
                  and source.stopped_at is not None)  # fmt: skip
            good += out.check(
                ok, f"{stage_id}: ids {len(source.ids)}, after the end {later}, logged "
                    f"{logged} ({no_content} × 204), failure {source.failure}",
            )  # fmt: skip
        waits = [s.stopped_at - s.ended_at for s in sources if s.stopped_at and s.ended_at]
        out.time_to_terminal = max(waits) if waits else None
        out.happened = (
            f"{good}/{n} EventSources got every event once, then exactly "
            f"{'/'.join(sorted(set(map(str, after))))} request after the end (204) and stopped; "
            f"{watch_seconds:g} s watched"
        )
        rig.finish(out)
    return out


def half_close(quick: bool) -> Outcome:
    """Clients that shut their sending side (SHUT_WR) after the request: counted as gone,
    as nginx counts them; the stage is cancelled and the upstream closed."""
    out = Outcome("half-close (SHUT_WR)")
    n = 5 if quick else 20
    with FakeUpstream() as fake, ExitStack() as stack:
        rig = start_rig(stack, fake.url, fake.port, lambda: fake.open_connections)
        server = rig.server
        fake.reset()
        ids = [f"hc-{i}" for i in range(n)]
        socks = [raw_chat(server.port, stage_id, _LONG) for stage_id in ids]
        for sock in socks:
            stack.callback(sock.close)
            sock.shutdown(socket.SHUT_WR)
        gone = wait_until(
            lambda: (
                all(status_of(server.url, i) == "cancelled" for i in ids)
                and all(r.client_closed_at is not None for r in fake.requests)
            ),
            30,
        )
        out.time_to_terminal = gone
        out.check(gone is not None, "a stage ran on, or an upstream stayed open, for 30 s")
        cancelled = _cancelled_by_disconnect(server.url, ids)
        out.check(cancelled, "not every stage was cancelled as `client disconnected`")
        answers = [read_to_close(sock, 10) for sock in socks]
        closed = sum(a is not None for a in answers)
        out.check(closed == n, f"{n - closed} half-closed connections were not closed")
        quiet = sum(a is not None and b"\nevent: " not in a for a in answers)
        out.check(quiet == n, f"{n - quiet} half-closed clients were sent an event")
        called = len(fake.requests)
        out.happened = (
            f"{n if cancelled else '?'}/{n} stages cancelled (`client disconnected`); "
            f"{closed}/{n} connections closed by the server, {quiet}/{n} with no event "
            f"written; {called}/{n} had called the upstream by then: all closed"
        )
        rig.finish(out)
    return out
