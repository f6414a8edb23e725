"""System calls per relayed chunk of the stageserver worker, by kind, counted by the
kernel's tracepoints (``perf stat``) while ``bench.load`` runs streams through it.

    .venv/bin/python -m bench.syscalls                       # this checkout
    .venv/bin/python -m bench.syscalls --revisions HEAD,a548dc4

A profile says where the worker's time goes; this says how many trips into the kernel a
chunk costs (a read of the upstream, a send to the client), which a profile cannot. The
counts are exact and cost the worker almost nothing, unlike ``strace``'s, which slows it
down enough to change how events batch. Needs ``perf`` (Debian's ``linux-perf``) and
root, or ``kernel.perf_event_paranoid`` at -1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence

from . import procs
from .load import Shape

KINDS = ("read", "recvfrom", "sendto", "getsockopt", "epoll_wait", "epoll_ctl", "poll")
_WARM_UP = 5.0  # seconds of load before counting: every stream open, the pools warm
_COUNTED = 4.0


def per_chunk(revision: str | None, concurrency: int, shape: Shape) -> dict[str, float]:
    """Each kind's calls per relayed chunk, and the chunks per second they were counted at."""
    upstream = procs.FakeUpstreamProcess()
    root = procs.checkout(revision) if revision else procs.ROOT
    server = procs.Stageserver(upstream.url, root=root)
    try:
        assert server.pid is not None
        worker = procs.tree(server.pid)[-1]
        load = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.load",
                "--port",
                str(server.port),
                "--target",
                "stageserver",
                "--path",
                server.path,
                "--concurrency",
                str(concurrency),
                "--chunks",
                str(shape.chunks),
                "--interval",
                str(shape.interval),
                "--prefill",
                str(shape.prefill),
                "--duration",
                str(_WARM_UP + _COUNTED + 1),
            ],  # fmt: skip
            cwd=procs.ROOT,
            stdout=subprocess.PIPE,
        )
        time.sleep(_WARM_UP)
        events = ",".join(f"syscalls:sys_enter_{kind}" for kind in KINDS)
        counted = subprocess.run(
            ["perf", "stat", "-x", ",", "-e", events, "-p", str(worker), "sleep", str(_COUNTED)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        result = json.loads(load.communicate()[0])
    finally:
        server.stop()
        upstream.stop()
    chunks = result["chunks_per_second"] * _COUNTED
    calls: dict[str, float] = {"chunks/s": result["chunks_per_second"]}
    for line in counted.stderr.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and "_enter_" in fields[2] and fields[0].isdigit():
            calls[fields[2].split("_enter_")[1]] = int(fields[0]) / chunks
    return calls


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revisions", default="", help="git revisions; '' is this checkout")
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--chunks", type=int, default=50)
    parser.add_argument("--interval", type=float, default=0.02)
    args = parser.parse_args(argv)
    procs.raise_nofile_limit()
    shape = Shape(chunks=args.chunks, interval=args.interval, prefill=0.0)
    print(
        f"system calls per relayed chunk, {args.concurrency} streams of {args.chunks} "
        f"chunks {args.interval} s apart, 1 gevent worker"
    )
    print("| revision | " + " | ".join(KINDS) + " | chunks/s |")
    print("|---|" + "---:|" * (len(KINDS) + 1))
    for revision in args.revisions.split(","):
        calls = per_chunk(revision or None, args.concurrency, shape)
        cells = " | ".join(f"{calls.get(kind, 0.0):.2f}" for kind in KINDS)
        print(f"| {revision or 'this checkout'} | {cells} | {calls['chunks/s']:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
