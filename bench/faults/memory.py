"""Memory: churn must leave it on a plateau, and a finished stage must stay compact.

Both run many streams through one worker from the asyncio swarm, against the fake
upstream in a process of its own (``bench.procs``), so that the client side, the
upstream and the worker each have a core's worth of room on two cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from contextlib import ExitStack
from typing import Any

import requests

from bench import procs
from testing.sse import post_chat

from .harness import SETTLE_SECONDS, Outcome, start_rig
from .swarm import run_swarm

_CHURN_TTL = 5  # seconds: a round's finished stages are gone before the next is measured


def _upstream_open(upstream: procs.FakeUpstreamProcess) -> int:
    reply = requests.get(f"{upstream.base}/_fake/connections", timeout=10).json()
    return int(reply["open"])


def _mb(kb: float) -> str:
    return f"{kb / 1024:.1f} MB"


def churn(quick: bool) -> Outcome:
    """Three rounds of streams (30 chunks, 5 ms apart) on one worker, 30 % of them dropped
    by their client at a random point; after each round has settled, the worker's RSS
    must be within 10 % of the first round's."""
    out = Outcome("churn: 3 rounds, 30 % dropped")
    streams, concurrency = (1000, 50) if quick else (10_000, 100)
    upstream = procs.FakeUpstreamProcess()
    with ExitStack() as stack:
        stack.callback(upstream.stop)
        # Finished stages retained for 5 s, not the default 600 s: what is measured is
        # what churn leaves behind, not what the TTLs keep on purpose (see stage-memory).
        rig = start_rig(
            stack, upstream.url, upstream.port, lambda: _upstream_open(upstream),
            STAGESERVER_ACCESS_LOG="", STAGESERVER_STAGE_TTL_SECONDS=str(_CHURN_TTL),
            STAGESERVER_EVENT_TTL_SECONDS=str(_CHURN_TTL),
        )  # fmt: skip
        server, probe = rig.server, rig.probe
        rss: list[int] = []
        fds: list[int] = []
        rounds: list[str] = []
        for number in range(3):
            result = run_swarm(
                server.port, streams=streams, concurrency=concurrency, chunks=30,
                interval=0.005, drop_fraction=0.3, seed=number, prefix=f"c{number}",
            )  # fmt: skip
            out.check(not result.problems, f"round {number + 1}: {dict(result.problems)}")
            rig.settle(out)
            # One stage, so that the registry forgets the round's stages (it sweeps when
            # a stage is added); then what the worker holds.
            post_chat(server.url, stage_id=f"sweep-{number}", stream=False)
            time.sleep(0.5)
            assert out.leftover is not None
            rss.append(probe.snapshot().rss_kb)
            fds.append(out.leftover.descriptors)
            rounds.append(f"{result.summary()} in {result.seconds:.0f} s")
        first = rss[0]
        growth = [(r - first) / first * 100 for r in rss[1:]]
        out.check(all(abs(g) <= 10 for g in growth), f"RSS off the plateau: {growth}")
        out.happened = (
            f"{streams:,} streams × 3, {concurrency} at a time: "
            + "; ".join(rounds)
            + f". RSS after each round {', '.join(_mb(r) for r in rss)} "
            f"({', '.join(f'{g:+.1f} %' for g in growth)} on round 1)"
        )
        out.lines.append(
            f"Plateau ({streams:,} streams a round, 30 % dropped; read after "
            f"{SETTLE_SECONDS:g} s and one stage to sweep the {_CHURN_TTL} s "
            "TTLs): worker RSS "
            f"{_mb(probe.baseline.rss_kb)} before, then {', '.join(_mb(r) for r in rss)} "
            f"after rounds 1, 2, 3; descriptors above the baseline after each: "
            f"{', '.join(f'{d:+d}' for d in fds)}."
        )
        rig.finish(out, settled=True)
    return out


def stage_memory(quick: bool) -> Outcome:
    """Stages of 30 chunks finished and retained with the default TTLs: the worker's RSS
    per finished stage; then the same in-process, counted by tracemalloc, with the
    stage's settling (its log compacted) on and off."""
    out = Outcome("finished-stage memory")
    stages = 1000 if quick else 10_000
    upstream = procs.FakeUpstreamProcess()
    with ExitStack() as stack:
        stack.callback(upstream.stop)
        rig = start_rig(
            stack,
            upstream.url,
            upstream.port,
            lambda: _upstream_open(upstream),
            STAGESERVER_ACCESS_LOG="",
        )
        result = run_swarm(
            rig.server.port, streams=stages, concurrency=100, chunks=30, interval=0.005, prefix="fs"
        )
        out.check(result.done == stages, f"{stages - result.done} stages did not end with done")
        rig.finish(out)
        assert out.leftover is not None
        per_stage = out.leftover.rss_kb * 1024 / stages
    cost = _in_process(1000 if quick else stages)
    settled, unsettled = cost["settled"], cost["unsettled"]
    out.happened = (
        f"{result.done:,}/{stages:,} stages of 30 chunks done in {result.seconds:.0f} s and "
        f"retained (default TTLs): the worker's RSS grew {per_stage / 1024:.1f} KB per stage"
    )
    out.lines += [
        f"A finished stage while retained: {per_stage / 1024:.1f} KB of the worker's RSS "
        f"({stages:,} stages of 30 chunks, none left running). Counted "
        f"in-process by tracemalloc ({cost['stages']:,} stages, the same chunks): "
        f"{settled['with_events_bytes'] / 1024:.1f} KB while its events are replayable "
        f"(their bytes: {settled['event_bytes'] / 1024:.1f} KB), "
        f"{settled['status_only_bytes'] / 1024:.1f} KB once they expired "
        f"(`STAGESERVER_EVENT_TTL_SECONDS`); without the settling (`Stage._settle`: the log "
        f"compacted into one bytes object, the text joined, the relay dropped) "
        f"{unsettled['with_events_bytes'] / 1024:.1f} KB and "
        f"{unsettled['status_only_bytes'] / 1024:.1f} KB.",
        "Where a retained stage's bytes were allocated (tracemalloc, per stage): "
        + "; ".join(
            f"{size} B at `{where}` (`{line}`)" for where, line, size in settled["top_with_events"]
        )
        + ".",
    ]
    return out


def _in_process(stages: int) -> dict[str, Any]:
    """``bench.faults.stage_cost`` in a process of its own: it patches with gevent."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.faults.stage_cost", "--stages", str(stages)],
        cwd=procs.ROOT, capture_output=True, timeout=600, check=True,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(done.stdout)
    return result
