"""CPU per relayed chunk and per request of each upstream transport, side by side.

    .venv/bin/python -m bench.transport [--streams 100] [--chunks 50] [--interval 0.01]
                                        [--rounds 5] [--transports httpx,httptools]

One process under gevent, as a worker runs: for each transport a ``ReplicaClient`` (the
openai client as stages use it), ``--streams`` concurrent streams from the fake upstream
(``python -m testing.fake_upstream``, its own process) read to the end as the stage reads
them: a transport named ``NAME:stream`` is read through ``iter(response.stream)``, the
transport's own stream (what the relay does), ``NAME`` through ``iter_raw()``. Each round
runs, for every transport in turn (the order alternating between rounds), a long
workload (``--chunks`` chunks per stream, ``--interval`` apart, so each arrives in a read
of its own) and a short one (1 chunk).
The process's CPU time over each workload gives CPU = requests × a + chunks × b; the two
workloads give ``a`` (µs per request) and ``b`` (µs per chunk). A warm-up round is not
counted; the medians over ``--rounds`` are. Compare transports within one run only.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--chunks", type=int, default=50)
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--transports", default="httpx,httptools")
    args = parser.parse_args()

    from gevent import monkey

    monkey.patch_all()
    from bench import procs

    procs.raise_nofile_limit()
    fake = procs.FakeUpstreamProcess()
    try:
        results = measure(fake.url, args)
    finally:
        fake.stop()
    report(results, args)


def measure(url: str, args: argparse.Namespace) -> dict[str, list[tuple[float, float]]]:
    from stageserver.config import UpstreamConfig
    from stageserver.upstream.clients import ReplicaClient

    names = args.transports.split(",")
    upstreams = {
        name: ReplicaClient(
            UpstreamConfig(
                name, url, "openai", "", 5.0, 30.0, 30.0, args.streams * 2,
                transport=name.partition(":")[0],
            )
        )
        for name in names
    }  # fmt: skip
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for number in range(args.rounds + 1):
        order = names if number % 2 == 0 else names[::-1]
        for name in order:
            direct = name.endswith(":stream")
            long_cpu, long_chunks = workload(upstreams[name], args, args.chunks, direct)
            short_cpu, short_chunks = workload(upstreams[name], args, 1, direct)
            per_chunk = (long_cpu - short_cpu) / (long_chunks - short_chunks)
            per_request = (short_cpu - per_chunk * short_chunks) / args.streams
            if number:  # round 0 warms up: connections, imports, caches
                results[name].append((per_chunk * 1e6, per_request * 1e6))
    for upstream in upstreams.values():
        upstream.close()
    return results


def workload(
    upstream: Any, args: argparse.Namespace, chunks: int, direct: bool
) -> tuple[float, int]:
    """CPU seconds of this process to read ``--streams`` streams; chunks read in all."""
    import gevent

    from stageserver.stages.conversation import Conversation
    from stageserver.upstream.request_body import RequestBody

    model = f"fake?chunks={chunks}&interval={args.interval}"
    body = RequestBody(Conversation.of_prompts(model, "", max_tokens=chunks), chunks)(upstream)
    counts: list[int] = []

    def stream() -> None:
        response = upstream.open_stream(body, {})
        try:
            n = 0
            for _ in iter(response.stream) if direct else response.iter_raw():
                n += 1
            counts.append(n)
        finally:
            response.close()

    gc.collect()  # so that no workload pays for the garbage of the one before it
    started = time.process_time()
    greenlets = [gevent.spawn(stream) for _ in range(args.streams)]
    gevent.joinall(greenlets, raise_error=True)
    return time.process_time() - started, sum(counts)


def report(results: dict[str, list[tuple[float, float]]], args: argparse.Namespace) -> None:
    print(
        f"{args.streams} concurrent streams of {args.chunks} chunks {args.interval:g} s apart, "
        f"and of 1 chunk; medians of {args.rounds} rounds"
    )
    print(f"{'transport':<10} {'µs/chunk':>9} {'µs/request':>11}   rounds (µs/chunk, µs/request)")
    for name, rows in results.items():
        chunk = statistics.median(r[0] for r in rows)
        request = statistics.median(r[1] for r in rows)
        each = "  ".join(f"{c:.1f},{r:.0f}" for c, r in rows)
        print(f"{name:<10} {chunk:>9.1f} {request:>11.0f}   {each}")
    first, *others = results
    for name in others:
        # Rounds ran their transports back to back: a difference within a round is less
        # exposed to the machine's other load than a difference of medians.
        pairs = list(zip(results[name], results[first], strict=True))
        chunk = statistics.median(a[0] - b[0] for a, b in pairs)
        request = statistics.median(a[1] - b[1] for a, b in pairs)
        faster = sum(a[0] < b[0] for a, b in pairs)
        print(
            f"{name} - {first}, median of the rounds' differences: {chunk:+.1f} µs/chunk, "
            f"{request:+.0f} µs/request; fewer µs/chunk in {faster} of {len(pairs)} rounds"
        )


if __name__ == "__main__":
    main()
