"""A Messages stream under the faults that continue an answer, as ``/chat``'s
(``continuation.py``): a host SIGKILLed with its messages in flight, and a replica that
cuts its answers mid-way. The same rigs (``two_hosts_on_redis``, ``replica_cut_rig``),
the same fake upstream continuing a trailing assistant message; the streams go through
``POST /v1/messages``.

Every client must read the scripted answer once, as the Messages API streams it: one
``message_start``, one text block (``content_block_start``, a ``content_block_delta``
per piece, ``content_block_stop``), ``message_delta`` (``end_turn``) and
``message_stop``, each event's id ``<message id>-<type>-<n>`` counting up from 0, no
``error``; the continuation shows nowhere on the wire, and the message's status lists it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import requests

from testing.sse import OpenStream, parse_events, stage_status

from .clients import Follower, watch
from .continuation import join_all, kill_host, replica_cut_rig, seen, two_hosts_on_redis
from .harness import Outcome, Rig


def body(model: str) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": 4096,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
    }


def start_and_leave(url: str, model: str, request_id: str) -> str:
    """Start a resumable message, read its first delta, leave: it runs on. Its id."""
    answer = requests.post(
        f"{url}/v1/messages",
        json=body(model),
        headers={"X-Stage-Resumable": "true", "X-Request-ID": request_id},
        stream=True,
        timeout=10,
    )
    stream = OpenStream(answer)
    stream.read_until(b"event: content_block_delta")
    stream.close()
    return str(answer.headers["X-Stage-Id"])


def whole_once(message_id: str, events: Sequence[dict[str, Any]], chunks: int) -> str | None:
    """A problem, or None when ``events`` are the scripted answer of ``chunks`` pieces
    once, in the Messages API's events (see the module's docstring)."""
    ided = [e for e in events if "id" in e]
    errors = [e["data"].get("error") for e in ided if e["event"] == "error"]
    if errors:
        return f"an error: {errors[0]}"
    kinds = [e["event"] for e in ided]
    expected = [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * chunks,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    if kinds != expected:
        return f"{len(kinds)} events, not the {len(expected)} of one text block"
    if [e["id"] for e in ided] != [f"{message_id}-{kind}-{k}" for k, kind in enumerate(kinds)]:
        return f"ids not each once in order: {[e['id'] for e in ided][:3]}..."
    text = "".join(e["data"]["delta"]["text"] for e in ided if e["event"] == kinds[2])
    if text != "".join(f"tok{k} " for k in range(chunks)):
        return "the text has a gap or a repeat"
    if ided[-2]["data"]["delta"]["stop_reason"] != "end_turn":
        return f"message_delta says {ided[-2]['data']['delta']}"
    return None


def continued_once(url: str, message_id: str, reason: str | None) -> bool:
    """Whether the message's status is ``done`` with one continuation for ``reason``
    (none when it is None)."""
    status = stage_status(url, message_id)
    made = [c for c in status.get("continuations") or () if c.get("outcome") == "ok"]
    wanted = [] if reason is None else [reason]
    return status.get("status") == "done" and [c.get("reason") for c in made] == wanted


def host_sigkill(quick: bool) -> Outcome:
    """Resumable messages on A, a watcher of each through B, one Redis; A SIGKILLed once
    every watcher has a delta. B takes each message over and continues it: each watcher
    reads it whole, once, as one text block."""
    out = Outcome("owner SIGKILL, a Messages stream continued")
    n, chunks, interval = (10 if quick else 100), 400, 0.05
    model = f"fake?chunks={chunks}&interval={interval}"
    with two_hosts_on_redis() as rig:
        (a, b), (probe_a, probe_b) = rig.servers, rig.probes
        ids = [start_and_leave(a.url, model, f"hkm-{i}") for i in range(n)]
        watchers = [watch(b.url, message_id) for message_id in ids]
        for watcher in watchers:
            watcher.first_chunk.wait(10)
        early = sum(w.ended_at is not None or w.failure is not None for w in watchers)
        out.check(early == 0, f"{early} watchers had ended before the kill")
        killed = kill_host(a, probe_a.pid)
        join_all(watchers, chunks * interval + 30)
        whole = sum(
            out.check(
                (problem := whole_once(message_id, parse_events(w.wire), chunks)) is None,
                f"watcher of {message_id}: {w.failure or problem}",
            )
            for message_id, w in zip(ids, watchers, strict=True)
        )
        done = sum(continued_once(b.url, message_id, "owner_lost") for message_id in ids)
        out.check(done == n, f"{n - done} statuses on B are not `done` with one continuation")
        ends = [w.ended_at for w in watchers if w.ended_at is not None]
        out.time_to_terminal = max(ends) - killed if ends else None
        out.happened = (
            f"{whole}/{n} watchers on B read the whole message once, one text block; "
            f"{done}/{n} statuses `done` with one continuation (owner_lost)"
        )
        Rig([b], [probe_b], rig.upstream_connections, rig.meter).finish(out)
    return out


def replica_cut(quick: bool) -> Outcome:
    """One host, no Redis, an upstream of two replicas; the first drops each answer after
    50 of its 200 chunks. Each message cut is continued on the second replica: its client
    reads the whole message once, one text block, and its status lists one continuation
    (``upstream_failed``); one never cut lists none. The time to terminal runs from the
    first cut to the last ``message_stop``."""
    out = Outcome("replica cut mid-answer, a Messages stream")
    n, chunks, cut, interval = (10 if quick else 100), 200, 50, 0.02
    model = f"fake?chunks={chunks}&interval={interval}"
    with replica_cut_rig(cut) as (rig, one, _):
        request_ids = [f"rcm-{i}" for i in range(n)]
        streams = [
            Follower(
                "POST",
                f"{rig.server.url}/v1/messages",
                body=body(model),
                headers={"X-Request-ID": request_id},
            )
            for request_id in request_ids
        ]
        join_all(streams, chunks * interval + 30)
        whole = cut_streams = 0
        cuts: list[float] = []
        for request_id, stream in zip(request_ids, streams, strict=True):
            events = parse_events(stream.wire)
            message_id = events[0]["data"]["message"]["id"] if events else "?"
            on_one = seen(one, request_id)
            cuts += [r.finished_at for r in on_one if r.finished_at is not None]
            was_cut = bool(on_one)
            cut_streams += was_cut
            problem = whole_once(message_id, events, chunks)
            if problem is None and not continued_once(
                rig.server.url, message_id, "upstream_failed" if was_cut else None
            ):
                problem = "its status does not list the continuation it had"
            whole += out.check(problem is None, f"stream {request_id}: {stream.failure or problem}")
        out.check(cut_streams > 0, "no stream was cut: the pool sent none to replica 1")
        ends = [s.ended_at for s in streams if s.ended_at is not None]
        out.time_to_terminal = max(ends) - min(cuts) if ends and cuts else None
        out.happened = (
            f"{whole}/{n} clients read the whole message once, one text block; "
            f"{cut_streams} cut on replica 1 after {cut} chunks and continued on replica 2"
        )
        rig.finish(out)
    return out
