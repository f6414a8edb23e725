"""The relay benchmark, in one command: stageserver, the upstream read directly, and nginx,
side by side against one fake upstream; a table, a JSON file and a chart.

    .venv/bin/python -m bench.run [--concurrency 1,50,200] [--chunks 50] [--interval 0.02]
        [--prefill 0] [--duration 10] [--repeat 3] [--slow 2000] [--new-connections]
        [--burst 200] [--new-streams 200] [--quick] [--profile]

Each (target, concurrency) gets a fresh server (so its idle memory is a clean baseline) and
its own load generator process (``bench.load``); targets take turns at each level, so a
drift of the machine touches all of them alike. With ``--repeat``, each number in the
table is the median of the runs. ``--slow N`` adds N long, slow streams at once on the one
worker. ``--new-connections`` runs each of those streams on a connection of its own
instead of a kept-alive one. ``--burst B`` adds a burst of B streams sent at once, each
on a new connection (``bench.burst``), and ``--new-streams N`` a burst of N streams of
one chunk: what a new stream costs. ``--profile`` records the stageserver worker with
py-spy during the window of the highest concurrency (a separate run, not in the table).
Results go to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import procs
from .load import LoadSpec, Shape

# "plain" and "bare" are the fixed design without stageserver (bench/plain.py): the seed's
# handler as a Flask view relaying through the openai client, and the same events written
# from memory with no upstream; run them by name, beside stageserver.
TARGETS = ("stageserver", "direct", "nginx", "plain", "bare")
DEFAULT_TARGETS = ("stageserver", "direct", "nginx")
# stageserver takes variants, asked for by name in --targets: "+redis" (the shared stage
# store), "+keys" (an API key and limits, held in Redis with +redis), "+httpx" (the
# upstream transport before httptools), "+pool" (the upstream a pool of two replicas: two
# fake upstream processes), "+replicas" (a pool of two replicas that are one fake
# upstream at two URLs, its /v1 and its root, so that only stageserver's side differs
# from one plain upstream), and "@<git revision>" (that revision's code, run from a
# checkout of it, side by side with this one): stageserver+redis+keys, stageserver@a548dc4.
# "+v1chat" and "+v1responses" stream the same stages through OpenAI's API
# (/v1/chat/completions, /v1/responses) instead of the seed's /chat, and "+messages"
# through Anthropic's Messages API (/v1/messages). "+cluster": the
# stage store a Redis Cluster of three primaries instead of one redis-server. "+follow"
# (with +redis or +cluster, through /chat): a second gunicorn host on the same store, on
# which every stream's stage is followed by a second client (GET /stages/<id>/events):
# +redis+follow less +redis is what a follower adds. "+w<ms>" (with a store): its flush
# window, STAGESERVER_STORE_FLUSH_WINDOW_SECONDS, in ms: stageserver+redis+w40.
STAGESERVER_VARIANTS = frozenset(
    {
        "redis", "cluster", "follow", "keys", "httpx", "pool", "replicas",
        "v1chat", "v1responses", "messages",
    }
)  # fmt: skip
#: The path each API variant posts to; the seed's /chat without one.
API_PATHS = {
    "v1chat": "/v1/chat/completions",
    "v1responses": "/v1/responses",
    "messages": "/v1/messages",
}


def check_target(target: str) -> str | None:
    """What is wrong with a target's name, or None."""
    name, _, revision = target.partition("@")
    base, *variants = name.split("+")
    if base not in TARGETS:
        return f"unknown target {target!r}; choose from {', '.join(TARGETS)}"
    unknown = {v for v in variants if not _window(v)} - STAGESERVER_VARIANTS
    if (variants or revision) and base != "stageserver":
        return f"{target!r}: only stageserver takes variants"
    if unknown:
        return f"{target!r}: unknown variant(s) {sorted(unknown)}"
    if {"redis", "cluster"} <= set(variants):
        return f"{target!r}: +redis or +cluster, not both"
    if "follow" in variants and not {"redis", "cluster"} & set(variants):
        return f"{target!r}: +follow needs a shared store, +redis or +cluster"
    if any(_window(v) for v in variants) and not {"redis", "cluster"} & set(variants):
        return f"{target!r}: +w<ms> (the flush window) needs a shared store"
    if "follow" in variants and set(variants) & set(API_PATHS):
        return f"{target!r}: +follow follows the stages of /chat only"
    return None


def _window(variant: str) -> bool:
    """Whether a variant is a flush window (w<ms>)."""
    return re.fullmatch(r"w\d+", variant) is not None


RESULTS = Path(__file__).resolve().parent / "results"
#: The load generators: kept-alive streams over a window, and one burst.
LOAD, BURST = "bench.load", "bench.burst"
# Metrics where the median of repeated runs is reported: those of both generators,
_SHARED_NUMBERS = (
    "ttft_p50_ms",
    "server_cpu_us_per_chunk",
    "upstream_cpu_us_per_chunk",
    "loadgen_cpu_us_per_chunk",
    "memory_per_stream_kb",
    "rss_idle_kb",
    "rss_open_kb",
    "other_cpu_cores",
)
# bench.load's,
_NUMBERS = (
    *_SHARED_NUMBERS,
    "ttft_p99_ms",
    "chunks_per_second",
    "rss_peak_kb",
    "redis_commands_per_chunk",
    "redis_cpu_us_per_chunk",
    "durable_p50_ms",
    "durable_p99_ms",
    "follow_server_cpu_us_per_chunk",
)
# and bench.burst's.
_BURST_NUMBERS = (
    *_SHARED_NUMBERS,
    "ttft_p90_ms",
    "ttft_last_ms",
    "rank_correlation",
    "start_ms",
    "start_cpu_ms",
    "first_token_cpu_p50_ms",
    "burst_cpu_ms",
    "server_cpu_us_per_stream",
    "send_spread_ms",
    "burst_seconds",
    "redis_connections_before",
    "redis_connections_peak",
    "redis_connections_peak_per_node",
    "redis_connections_after",
    "redis_connections_after_per_node",
    "redis_worker_sockets_after",
    "rss_after_kb",
    "fds_after",
)


def _start(
    target: str,
    upstream: procs.FakeUpstreamProcess,
    workdir: Path,
    replica: procs.FakeUpstreamProcess | None = None,
) -> Any:
    if target == "nginx":
        return procs.Nginx(upstream.port, workdir / "nginx")
    if target == "direct":
        return procs.Direct(upstream.port)
    if target in ("plain", "bare"):
        return procs.Plain(upstream.base, bare=target == "bare")
    name, _, revision = target.partition("@")
    variants = set(name.split("+")[1:])
    replicas = [replica.url] if "pool" in variants and replica is not None else []
    if "replicas" in variants:
        replicas.append(upstream.base)
    return procs.Stageserver(
        upstream.url,
        shared_store="redis" in variants,
        cluster="cluster" in variants,
        follower="follow" in variants,
        keys="keys" in variants,
        transport="httpx" if "httpx" in variants else None,
        replicas=replicas,
        root=procs.checkout(revision) if revision else procs.ROOT,
        path=next((API_PATHS[v] for v in variants if v in API_PATHS), "/chat"),
        flush_window=next((int(v[1:]) / 1000 for v in variants if _window(v)), None),
    )


def measure(
    target: str,
    upstream: procs.FakeUpstreamProcess,
    *,
    concurrency: int,
    shape: Shape,
    duration: float,
    workdir: Path,
    generator: str = LOAD,
    profile: Path | None = None,
    replica: procs.FakeUpstreamProcess | None = None,
    new_connections: bool = False,
) -> dict[str, Any]:
    """One run of a load generator (``generator``: ``LOAD`` or ``BURST``) against a fresh
    server; its result, as a dict. ``concurrency``: the streams at once, or the burst's
    size. ``replica``: the pool's second replica (stageserver+pool); the upstream CPU
    reported is the first one's only. ``new_connections``: each of ``LOAD``'s streams on
    a connection of its own (a burst's always are)."""
    server = _start(target, upstream, workdir, replica)
    spec = LoadSpec(
        port=server.port,
        target=target,
        path=server.path,
        shape=shape,
        concurrency=concurrency,
        duration=duration,
        server_pid=server.pid,
        upstream_pid=upstream.pid,
        profile=None if profile is None else str(profile),
        api_key=getattr(server, "api_key", None),
        new_connections=new_connections,
    )
    if isinstance(server, procs.Stageserver):
        # Its /metrics has the relay→durable delay, when the revision run has it.
        spec.metrics = True
        spec.redis = list(server.redis_nodes)
        spec.follow_port, spec.follow_pid = server.follow_port, server.follow_pid
    cmd = [sys.executable, "-m", generator, *spec.argv()]
    limit = duration + shape.seconds * 5 + 60
    try:
        done = subprocess.run(cmd, cwd=procs.ROOT, capture_output=True, timeout=limit, check=False)
    finally:
        server.stop()
    if done.returncode != 0:
        raise RuntimeError(
            f"{generator} failed against {target} at {concurrency} streams:\n"
            f"{done.stderr.decode(errors='replace')}\n{server.log()[-3000:]}"
        )
    result: dict[str, Any] = json.loads(done.stdout)
    log = server.log()
    result["server_log_errors"] = log.count("Traceback") + log.count("[ERROR]")
    return result


_STORE_VARIANTS = frozenset({"redis", "cluster", "follow"})


def memory_store_target(target: str) -> str | None:
    """The target that is ``target`` with the memory store: its store variants left out;
    None for a target that is not stageserver."""
    return _without(target, lambda v: v in _STORE_VARIANTS or _window(v))


def chat_target(target: str) -> str | None:
    """The target that is ``target`` through the seed's /chat: its API variant left out;
    None for a target that has none (it is its own), or is not stageserver."""
    if not set(target.partition("@")[0].split("+")) & set(API_PATHS):
        return None
    return _without(target, API_PATHS.__contains__)


def _without(target: str, left_out: Callable[[str], bool]) -> str | None:
    """``target`` without the variants ``left_out`` names, its revision kept; None for a
    target that is not stageserver."""
    name, at, revision = target.partition("@")
    base, *variants = name.split("+")
    if base != "stageserver":
        return None
    return "+".join([base, *(v for v in variants if not left_out(v))]) + at + revision


def median_rows(
    runs: list[dict[str, Any]], numbers: Sequence[str] = _NUMBERS
) -> list[dict[str, Any]]:
    """One row per (target, concurrency): the median of each of ``numbers`` over the
    repeats, and the ratios to other targets of the same run (below)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["target"], run["concurrency"]), []).append(run)
    rows = []
    for (target, concurrency), group in groups.items():
        row: dict[str, Any] = {"target": target, "concurrency": concurrency, "runs": len(group)}
        for key in numbers:
            values = [r[key] for r in group if r.get(key) is not None]
            row[key] = round(statistics.median(values), 2) if values else None
        row["errors"] = sum(r["errors"] for r in group)
        row["follow_errors"] = sum(r.get("follow_errors", 0) for r in group)
        row["follow_streams"] = sum(r.get("follow_streams", 0) for r in group)
        row["streams"] = sum(r["streams"] for r in group)
        row["connections"] = sum(r.get("connections", 0) for r in group)
        row["server_log_errors"] = sum(r.get("server_log_errors", 0) for r in group)
        rows.append(row)
    direct = {r["concurrency"]: r["ttft_p50_ms"] for r in rows if r["target"] == "direct"}
    for row in rows:
        floor = direct.get(row["concurrency"])
        if row["target"] != "direct" and floor is not None and row["ttft_p50_ms"] is not None:
            row["added_ttft_p50_ms"] = round(row["ttft_p50_ms"] - floor, 2)
        else:
            row["added_ttft_p50_ms"] = None
    # Server CPU per chunk against the memory store's, at the same concurrency in this run:
    # the same target without its store (+redis, +cluster, +follow), so the plain
    # stageserver for stageserver+redis, stageserver@rev for stageserver+redis@rev.
    _ratio(rows, "server_cpu_us_per_chunk", memory_store_target, "server_cpu_vs_memory")
    # Against the same target's through /chat (OpenAI's and Anthropic's APIs against the
    # seed's, the same stages): stageserver+v1chat's against stageserver's.
    _ratio(rows, "server_cpu_us_per_chunk", chat_target, "server_cpu_vs_chat")
    # Against nginx's: the issues' targets for the relay are written as these ratios.
    _ratio(rows, "server_cpu_us_per_chunk", lambda _: "nginx", "server_cpu_vs_nginx")
    # A burst's added first-token latency against the CPU its start cost the worker: 1.0
    # when the median stream waited for the whole burst's start, 0.5 when it waited for
    # the half that came before it (first come, first served).
    # The same counted in the worker's CPU: the share of the start's CPU spent by the
    # median first token, which a busy machine does not inflate as it does the clock.
    for row in rows:
        added, start = row["added_ttft_p50_ms"], row.get("start_cpu_ms")
        row["added_vs_start_cpu"] = round(added / start, 2) if added and start else None
        median = row.get("first_token_cpu_p50_ms")
        row["p50_cpu_vs_start_cpu"] = round(median / start, 2) if median and start else None
    order = list(dict.fromkeys(r["target"] for r in runs))  # as asked for
    rows.sort(key=lambda r: (r["concurrency"], order.index(r["target"])))
    return rows


def _ratio(
    rows: list[dict[str, Any]], key: str, to: Callable[[str], str | None], name: str
) -> None:
    """``row[name]``: each row's ``key`` divided by that of the target ``to(its target)``
    at the same concurrency (a ratio of medians); None without that target or value."""
    values = {(r["target"], r["concurrency"]): r[key] for r in rows}
    for row in rows:
        base = values.get((to(row["target"]), row["concurrency"]))
        mine = row[key]
        row[name] = round(mine / base, 2) if mine and base else None


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "∞"  # a delay beyond the histogram's largest finite bucket
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 10 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


_COLUMNS = (
    ("target", "target"),
    ("concurrency", "streams"),
    ("ttft_p50_ms", "TTFT p50 ms"),
    ("ttft_p99_ms", "TTFT p99 ms"),
    ("added_ttft_p50_ms", "added p50 ms"),
    ("chunks_per_second", "chunks/s"),
    ("server_cpu_us_per_chunk", "server CPU µs/chunk"),
    ("server_cpu_vs_nginx", "÷ nginx"),
    ("server_cpu_vs_memory", "÷ memory"),
    ("server_cpu_vs_chat", "÷ /chat"),
    ("redis_commands_per_chunk", "Redis cmds/chunk"),
    ("redis_cpu_us_per_chunk", "Redis µs/chunk"),
    ("durable_p50_ms", "durable p50 ms"),
    ("durable_p99_ms", "durable p99 ms"),
    ("memory_per_stream_kb", "KB/stream"),
    ("upstream_cpu_us_per_chunk", "upstream µs/chunk"),
    ("loadgen_cpu_us_per_chunk", "loadgen µs/chunk"),
    ("other_cpu_cores", "other load, cores"),
    ("errors", "errors"),
)


# The last columns of both burst tables: the worker's connections to the store (the
# largest node's too: a cluster's bound is per node), and what was not this run's.
_BURST_TAIL = (
    ("redis_connections_peak", "Redis conns peak"),
    ("redis_connections_peak_per_node", "peak per node"),
    ("redis_connections_after", "Redis conns after"),
    ("redis_connections_after_per_node", "after per node"),
    ("rss_after_kb", "RSS after KB"),
    ("fds_after", "fds after"),
    ("other_cpu_cores", "other load, cores"),
    ("errors", "errors"),
)
# A burst of streams of the run's shape: how its first tokens are served.
_BURST_COLUMNS = (
    ("target", "target"),
    ("concurrency", "burst"),
    ("ttft_p50_ms", "TTFT p50 ms"),
    ("ttft_p90_ms", "TTFT p90 ms"),
    ("ttft_last_ms", "TTFT last ms"),
    ("added_ttft_p50_ms", "added p50 ms"),
    ("start_cpu_ms", "start CPU ms"),
    ("added_vs_start_cpu", "added ÷ start CPU"),
    ("p50_cpu_vs_start_cpu", "p50 CPU ÷ start CPU"),
    ("rank_correlation", "rank ρ"),
    ("burst_cpu_ms", "burst CPU ms"),
    ("server_cpu_us_per_chunk", "CPU µs/chunk"),
    ("server_cpu_vs_nginx", "÷ nginx"),
    ("memory_per_stream_kb", "KB/stream"),
    *_BURST_TAIL,
)
# A burst of one-chunk streams: what a new stream costs.
_NEW_STREAM_COLUMNS = (
    ("target", "target"),
    ("concurrency", "burst"),
    ("server_cpu_us_per_stream", "CPU µs/stream"),
    ("server_cpu_vs_nginx", "÷ nginx"),
    ("ttft_p50_ms", "TTFT p50 ms"),
    ("ttft_last_ms", "TTFT last ms"),
    ("rank_correlation", "rank ρ"),
    *_BURST_TAIL,
)


def table(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str]] = _COLUMNS) -> str:
    """A Markdown table of ``rows``; a column without a value in any row is left out
    (the Redis columns without a store, the server's CPU with direct alone)."""
    shown = [
        (key, title)
        for key, title in columns
        if key in ("target", "errors") or any(row.get(key) is not None for row in rows)
    ]
    lines = [
        "| " + " | ".join(title for _, title in shown) + " |",
        "|" + "|".join("---" if key == "target" else "---:" for key, _ in shown) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key, _ in shown) + " |")
    return "\n".join(lines)


def chart(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cpu, ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    for number, target in enumerate(dict.fromkeys(r["target"] for r in rows)):
        color = f"C{number}"  # a target keeps its colour in both plots
        mine = [r for r in rows if r["target"] == target]
        if not mine:
            continue
        levels = [r["concurrency"] for r in mine]
        with_cpu = [r for r in mine if r["server_cpu_us_per_chunk"] is not None]
        if with_cpu:
            cpu.plot(
                [r["concurrency"] for r in with_cpu],
                [r["server_cpu_us_per_chunk"] for r in with_cpu],
                marker="o",
                color=color,
                label=target,
            )
        p50 = [r["ttft_p50_ms"] for r in mine]
        ttft.plot(levels, p50, marker="o", color=color, label=f"{target} p50")
        ttft.plot(
            levels,
            [r["ttft_p99_ms"] for r in mine],
            marker="x",
            linestyle="--",
            color=color,
            label=f"{target} p99",
        )
    for ax in (cpu, ttft):
        ax.set_xscale("log")
        ax.set_xlabel("concurrent streams")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    cpu.set_yscale("log")
    cpu.set_ylabel("server CPU per relayed chunk (µs)")
    cpu.set_title("Relay cost")
    ttft.set_yscale("log")
    ttft.set_ylabel("time to first token (ms)")
    ttft.set_title("Time to first token")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _levels(text: str) -> list[int]:
    """``1,50,200``; empty for none (``--slow`` alone)."""
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,50,200, got {text!r}") from None
    if levels and min(levels) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be positive")
    return levels


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument(
        "--concurrency", type=_levels, help="kept-alive streams at once (default 1,50,200)"
    )
    parser.add_argument("--chunks", type=int, default=50, help="content chunks per stream")
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between chunks")
    parser.add_argument("--prefill", type=float, default=0.0, help="seconds to the first chunk")
    parser.add_argument("--duration", type=float, default=10.0, help="measured window, seconds")
    parser.add_argument("--repeat", type=int, default=1, help="runs per cell; the median is shown")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS))
    parser.add_argument("--slow", type=int, default=0, help="also N slow streams at once")
    parser.add_argument("--slow-chunks", type=int, default=20)
    parser.add_argument("--slow-interval", type=float, default=1.0)
    parser.add_argument(
        "--burst",
        type=_levels,
        default=[],
        help="also bursts of B streams sent at once, each on a new connection: 100,200",
    )
    parser.add_argument(
        "--new-streams",
        type=int,
        default=0,
        help="also a burst of N one-chunk streams: what a new stream costs",
    )
    parser.add_argument(
        "--new-connections",
        action="store_true",
        help="each stream of --concurrency and --slow on a connection of its own",
    )
    parser.add_argument(
        "--quick", action="store_true", help="seconds, not minutes: proves the harness works"
    )
    parser.add_argument("--profile", action="store_true", help="py-spy the stageserver worker")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:  # each mode asked for, small
        args.concurrency = [10] if args.concurrency is None else args.concurrency[:1]
        args.burst = [min(size, QUICK_BURST) for size in args.burst[:1]]
        args.new_streams = min(args.new_streams, QUICK_BURST)
        args.chunks, args.interval = 5, 0.01
        args.duration, args.repeat, args.slow = 1.0, 1, 0
    elif args.concurrency is None:
        args.concurrency = [1, 50, 200]
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for target in args.targets:
        if (problem := check_target(target)) is not None:
            parser.error(problem)
    return args


#: The largest burst of --quick.
QUICK_BURST = 20


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    procs.raise_nofile_limit()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    shape = Shape(args.chunks, args.interval, args.prefill)
    machine = procs.machine()
    load_before = os.getloadavg()
    print(
        f"machine: {machine['cpus']} × {machine['cpu_model']}, {machine['ram_gib']} GiB; "
        f"{shape.chunks} chunks {shape.interval:g} s apart, prefill {shape.prefill:g} s; "
        f"{args.duration:g} s windows × {args.repeat}"
        f"{'; each stream on a new connection' if args.new_connections else ''}; "
        f"load average {_load(load_before)}",
        flush=True,
    )
    upstream = procs.FakeUpstreamProcess()
    pooled = any("+pool" in target for target in args.targets)
    replica = procs.FakeUpstreamProcess() if pooled else None
    runs: list[dict[str, Any]] = []
    slow_runs: list[dict[str, Any]] = []
    burst_runs: list[dict[str, Any]] = []
    new_stream_runs: list[dict[str, Any]] = []
    profiles: list[Path] = []

    def record(
        into: list[dict[str, Any]], target: str, level: int, shape: Shape, generator: str, rep: int
    ) -> None:
        result = measure(
            target, upstream, concurrency=level, shape=shape, duration=args.duration,
            workdir=out, generator=generator, replica=replica,
            new_connections=args.new_connections and generator == LOAD,
        )  # fmt: skip
        result["repeat"] = rep
        into.append(result)
        _progress(result)

    try:
        for rep in range(args.repeat):
            for level in args.concurrency:
                for target in args.targets:
                    record(runs, target, level, shape, LOAD, rep)
            for size in args.burst:
                for target in args.targets:
                    record(burst_runs, target, size, shape, BURST, rep)
            if args.new_streams:
                one_chunk = Shape(1, args.interval, args.prefill)
                for target in args.targets:
                    record(new_stream_runs, target, args.new_streams, one_chunk, BURST, rep)
            if args.slow:
                slow_shape = Shape(args.slow_chunks, args.slow_interval, args.prefill)
                for target in args.targets:
                    record(slow_runs, target, args.slow, slow_shape, LOAD, rep)
        profiled = [t for t in args.targets if t.startswith("stageserver")]
        if args.profile and args.concurrency and profiled:
            for target in profiled:  # each stageserver variant asked for, in a run of its own
                name = target.replace("@", "-at-").replace("+", "-")
                profile_path = out / f"{stamp}-profile-{name}-c{max(args.concurrency)}.txt"
                measure(
                    target, upstream, concurrency=max(args.concurrency), shape=shape,
                    duration=args.duration, workdir=out, profile=profile_path, replica=replica,
                )  # fmt: skip
                profiles.append(profile_path)
    finally:
        upstream.stop()
        if replica is not None:
            replica.stop()
    load_after = os.getloadavg()

    rows = median_rows(runs)
    slow_rows = median_rows(slow_runs)
    burst_rows = median_rows(burst_runs, _BURST_NUMBERS)
    new_stream_rows = median_rows(new_stream_runs, _BURST_NUMBERS)
    sections = [table(rows)] if rows else []
    if slow_rows:
        sections += [
            f"{args.slow} slow streams at once ({args.slow_chunks} chunks "
            f"{args.slow_interval:g} s apart):",
            table(slow_rows),
        ]
    if burst_rows:
        sections += [
            f"Bursts: B streams sent at once, each on a new connection ({shape.chunks} "
            f"chunks {shape.interval:g} s apart); CPU is the worker's:",
            table(burst_rows, _BURST_COLUMNS),
        ]
    if new_stream_rows:
        sections += [
            f"{args.new_streams} streams of one chunk sent at once, each on a new connection: "
            "what a new stream costs the worker:",
            table(new_stream_rows, _NEW_STREAM_COLUMNS),
        ]
    text = "\n\n".join(sections)
    print("\n" + text)
    print(f"\nload average at the end: {_load(load_after)}")
    png = out / f"{stamp}.png" if rows or slow_rows else None
    if png is not None:
        chart(rows or slow_rows, png)  # one shape of stream per chart
    summary = {
        "machine": machine,
        "load_average": {"start": load_before, "end": load_after},
        "shape": {"chunks": shape.chunks, "interval": shape.interval, "prefill": shape.prefill},
        "duration": args.duration,
        "repeat": args.repeat,
        "new_connections": args.new_connections,
        "rows": rows,
        "slow_rows": slow_rows,
        "burst_rows": burst_rows,
        "new_stream_rows": new_stream_rows,
        "runs": runs,
        "slow_runs": slow_runs,
        "burst_runs": burst_runs,
        "new_stream_runs": new_stream_runs,
        "chart": None if png is None else str(png),
        "profiles": [str(path) for path in profiles],
    }
    (out / f"{stamp}.json").write_text(json.dumps(summary, indent=1))
    (out / f"{stamp}.md").write_text(text + "\n")
    print(f"\nresults: {out / stamp}.json, .md" + (f"; chart: {png}" if png else ""))
    for path in profiles:
        print(f"profile (py-spy, collapsed stacks): {path}")
    return 0


def _load(average: tuple[float, float, float]) -> str:
    """The machine's load average, as ``uptime`` shows it (1, 5, 15 minutes)."""
    return ", ".join(f"{value:.2f}" for value in average)


def _progress(result: dict[str, Any]) -> None:
    if "rank_correlation" in result:  # a burst's
        print(
            f"  {result['target']:<11} burst={result['concurrency']:<5} "
            f"ttft p50 {_cell(result['ttft_p50_ms'])}, "
            f"last {_cell(result['ttft_last_ms'])} ms, "
            f"rank ρ {_cell(result['rank_correlation'])}, "
            f"worker {_cell(result['burst_cpu_ms'])} ms "
            f"({_cell(result['server_cpu_us_per_stream'])} µs/stream), "
            f"{_cell(result['memory_per_stream_kb'])} KB/stream, "
            f"Redis conns {_cell(result['redis_connections_peak'])} peak, "
            f"{_cell(result['redis_connections_after'])} after, errors {result['errors']}, "
            f"other load {_cell(result['other_cpu_cores'])} cores",
            flush=True,
        )
        return
    print(
        f"  {result['target']:<11} c={result['concurrency']:<5} "
        f"ttft p50 {_cell(result['ttft_p50_ms'])} ms, "
        f"{_cell(result['chunks_per_second'])} chunks/s, "
        f"server {_cell(result['server_cpu_us_per_chunk'])} µs/chunk, "
        f"Redis {_cell(result.get('redis_commands_per_chunk'))} cmds/chunk, "
        f"{_cell(result['memory_per_stream_kb'])} KB/stream, errors {result['errors']}, "
        f"other load {_cell(result['other_cpu_cores'])} cores",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
