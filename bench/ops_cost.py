"""What the operations endpoints and hooks cost: /healthz, /readyz, /metrics, and the
per-stage bookkeeping (metrics, admission, log line).

    .venv/bin/python -m bench.ops_cost [--requests 300] [--workers 2] [--stages 500]

Runs stageserver under gunicorn (``--workers`` gevent workers, a throwaway redis-server
for the store that several workers need) against the loopback fake upstream, runs
``--stages`` short stages so /metrics has something to add up, then asks each endpoint
``--requests`` times, one request at a time on one kept-alive connection. Prints the
client's latency (median, p95) and the server tree's CPU per request. Then polls /readyz
ten times a second for 3 s and counts the ``GET /models`` the upstream received. Last, in
this process, times the per-stage metrics callbacks in multiprocess mode.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from bench import procs
from testing.fake_upstream import FakeUpstream
from testing.servers import ROOT, Gunicorn, RedisServer
from testing.sse import post_chat


def timed_requests(session: requests.Session, url: str, count: int, pids: list[int]) -> str:
    latencies = []
    cpu_before = procs.cpu_seconds(pids)
    for _ in range(count):
        started = time.perf_counter()
        response = session.get(url, timeout=10)
        latencies.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
    cpu_us = (procs.cpu_seconds(pids) - cpu_before) / count * 1e6
    latencies.sort()
    p95 = latencies[int(len(latencies) * 0.95)]
    return (
        f"{statistics.median(latencies):>10.2f} {p95:>8.2f} {cpu_us:>14.0f} "
        f"{len(response.content):>8}"
    )


def stage(url: str, n: int) -> None:
    post_chat(url, stage_id=f"ops{n}", model_name="fake?chunks=5").raise_for_status()


def callbacks_cost(rounds: int) -> float:
    """µs per stage for metrics.stage_started and its on_finish callback, multiprocess
    mode, measured in a child process: prometheus_client picks its storage at import."""
    with tempfile.TemporaryDirectory() as path:
        out = subprocess.run(
            [sys.executable, "-m", "bench.ops_cost", "--callbacks-only", str(rounds)],
            cwd=ROOT,
            env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": path},
            capture_output=True,
            text=True,
            check=True,
        )
        return float(out.stdout)


class _OneChunk:
    """A relay whose upstream says one word and ends: a stage to finish for real."""

    def run(self, stage: Any) -> None:
        from stageserver.stages.chunk_read import ChunkRead

        stage.append_chunk(b"{}", ChunkRead("word", "stop"))
        stage.finish()

    def unblock(self) -> None:
        pass


def _callbacks_in_this_process(rounds: int) -> float:
    from stageserver.stages.spec import StageSpec
    from stageserver.stages.stage import Stage
    from stageserver.telemetry.metrics import StageMetrics

    spec = StageSpec("s", "default", False, "r", 1.0, 100)
    stages = [Stage(spec, _OneChunk()) for _ in range(rounds)]
    for stage in stages:
        stage.start()
        stage.wait()
    listener = StageMetrics()
    started = time.perf_counter()
    for stage in stages:  # what the metrics listener does for each stage
        listener.on_start(stage)
        listener.on_finish(stage)
    return (time.perf_counter() - started) / rounds * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stages", type=int, default=500)
    parser.add_argument("--callbacks-only", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.callbacks_only:
        print(_callbacks_in_this_process(args.callbacks_only))
        return
    redis = RedisServer() if args.workers > 1 else None
    with FakeUpstream() as fake:
        env = {"STAGESERVER_UPSTREAM_URL": fake.url, "STAGESERVER_ACCESS_LOG": ""}
        if redis is not None:
            env["STAGESERVER_STORE_URL"] = redis.url
        server = Gunicorn(env, workers=args.workers)
        try:
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda n: stage(server.url, n), range(args.stages)))
            pids = procs.tree(server.proc.pid)
            print(f"{args.workers} worker(s), {args.stages} stages run before the scrapes")
            print(
                f"{'endpoint':<10} {'median ms':>10} {'p95 ms':>8} {'server µs/req':>14} "
                f"{'bytes':>8}"
            )
            with requests.Session() as session:
                for path in ("/healthz", "/readyz", "/metrics"):
                    print(
                        f"{path:<10} "
                        + timed_requests(session, server.url + path, args.requests, pids)
                    )
            fake.reset()
            with requests.Session() as session:
                deadline = time.monotonic() + 3
                polls = 0
                while time.monotonic() < deadline:
                    session.get(server.url + "/readyz", timeout=10)
                    polls += 1
                    time.sleep(0.1)
            models = sum(r.path.endswith("/models") for r in fake.requests)
            print(
                f"/readyz polled {polls} times in 3 s: the upstream got {models} GET /models "
                f"({args.workers} worker(s))"
            )
        finally:
            server.stop()
            if redis is not None:
                redis.stop()
    print(f"metrics callbacks per stage (multiprocess mode): {callbacks_cost(20000):.1f} µs")


if __name__ == "__main__":
    main()
