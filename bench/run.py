"""The relay benchmark, in one command: stageserver, the upstream read directly, and nginx,
side by side against one fake upstream; a table, a JSON file and a chart.

    .venv/bin/python -m bench.run [--concurrency 1,50,200] [--chunks 50] [--interval 0.02]
        [--prefill 0] [--duration 10] [--repeat 3] [--slow 2000] [--quick] [--profile]

Each (target, concurrency) gets a fresh server (so its idle memory is a clean baseline) and
its own load generator process (``bench.load``); targets take turns at each level, so a
drift of the machine touches all of them alike. With ``--repeat``, each number in the
table is the median of the runs. ``--slow N`` adds N long, slow streams at once on the one
worker. ``--profile`` records the stageserver worker with py-spy during the window of the
highest concurrency (a separate run, not in the table). Results go to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import procs
from .load import Shape

TARGETS = ("stageserver", "direct", "nginx")
DEFAULT_TARGETS = TARGETS
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
# Metrics where the median of repeated runs is reported.
_NUMBERS = (
    "ttft_p50_ms",
    "ttft_p99_ms",
    "chunks_per_second",
    "server_cpu_us_per_chunk",
    "upstream_cpu_us_per_chunk",
    "loadgen_cpu_us_per_chunk",
    "memory_per_stream_kb",
    "rss_idle_kb",
    "rss_open_kb",
    "rss_peak_kb",
    "other_cpu_cores",
    "redis_commands_per_chunk",
    "redis_cpu_us_per_chunk",
    "durable_p50_ms",
    "durable_p99_ms",
    "follow_server_cpu_us_per_chunk",
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
    profile: Path | None = None,
    replica: procs.FakeUpstreamProcess | None = None,
) -> dict[str, Any]:
    """One load run against a fresh server; the load generator's result, as a dict.
    ``replica``: the pool's second replica (stageserver+pool); the upstream CPU reported
    is the first one's only."""
    server = _start(target, upstream, workdir, replica)
    cmd = [
        sys.executable, "-m", "bench.load",
        "--port", str(server.port),
        "--target", target,
        "--path", server.path,
        "--concurrency", str(concurrency),
        "--chunks", str(shape.chunks),
        "--interval", str(shape.interval),
        "--prefill", str(shape.prefill),
        "--duration", str(duration),
        "--upstream-pid", str(upstream.pid),
    ]  # fmt: skip
    if server.pid is not None:
        cmd += ["--server-pid", str(server.pid)]
    if getattr(server, "api_key", None):
        cmd += ["--api-key", server.api_key]
    if isinstance(server, procs.Stageserver):
        # Its /metrics has the relay→durable delay, when the revision run has it.
        cmd += ["--metrics"]
        for port, pid in server.redis_nodes:
            cmd += ["--redis", f"{port}:{pid}"]
        if server.follow_port is not None:
            cmd += [
                "--follow-port",
                str(server.follow_port),
                "--follow-pid",
                str(server.follow_pid),
            ]
    if profile is not None:
        cmd += ["--profile", str(profile)]
    limit = duration + shape.seconds * 5 + 60
    try:
        done = subprocess.run(cmd, cwd=procs.ROOT, capture_output=True, timeout=limit, check=False)
    finally:
        server.stop()
    if done.returncode != 0:
        raise RuntimeError(
            f"the load generator failed against {target} at c={concurrency}:\n"
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
    name, at, revision = target.partition("@")
    base, *variants = name.split("+")
    if base != "stageserver":
        return None
    kept = [v for v in variants if v not in _STORE_VARIANTS and not _window(v)]
    return "+".join([base, *kept]) + at + revision


def median_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (target, concurrency): the median of each number over the repeats."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["target"], run["concurrency"]), []).append(run)
    rows = []
    for (target, concurrency), group in groups.items():
        row: dict[str, Any] = {"target": target, "concurrency": concurrency, "runs": len(group)}
        for key in _NUMBERS:
            values = [r[key] for r in group if r.get(key) is not None]
            row[key] = round(statistics.median(values), 2) if values else None
        row["errors"] = sum(r["errors"] for r in group)
        row["follow_errors"] = sum(r.get("follow_errors", 0) for r in group)
        row["follow_streams"] = sum(r.get("follow_streams", 0) for r in group)
        row["streams"] = sum(r["streams"] for r in group)
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
    # stageserver for stageserver+redis, stageserver@rev for stageserver+redis@rev. A
    # ratio of medians; None without that target.
    cpu = {(r["target"], r["concurrency"]): r["server_cpu_us_per_chunk"] for r in rows}
    for row in rows:
        base = cpu.get((memory_store_target(row["target"]), row["concurrency"]))
        mine = row["server_cpu_us_per_chunk"]
        row["server_cpu_vs_memory"] = round(mine / base, 2) if mine and base else None
    order = list(dict.fromkeys(r["target"] for r in runs))  # as asked for
    rows.sort(key=lambda r: (r["concurrency"], order.index(r["target"])))
    return rows


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
    ("server_cpu_vs_memory", "÷ memory"),
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


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| " + " | ".join(title for _, title in _COLUMNS) + " |",
        "|" + "|".join("---" if key == "target" else "---:" for key, _ in _COLUMNS) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key, _ in _COLUMNS) + " |")
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
    parser.add_argument("--concurrency", type=_levels, default=[1, 50, 200])
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
        "--quick", action="store_true", help="seconds, not minutes: proves the harness works"
    )
    parser.add_argument("--profile", action="store_true", help="py-spy the stageserver worker")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.chunks, args.interval = [10], 5, 0.01
        args.duration, args.repeat, args.slow = 1.0, 1, 0
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for target in args.targets:
        if (problem := check_target(target)) is not None:
            parser.error(problem)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    procs.raise_nofile_limit()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    shape = Shape(args.chunks, args.interval, args.prefill)
    machine = procs.machine()
    print(
        f"machine: {machine['cpus']} × {machine['cpu_model']}, {machine['ram_gib']} GiB; "
        f"{shape.chunks} chunks {shape.interval:g} s apart, prefill {shape.prefill:g} s; "
        f"{args.duration:g} s windows × {args.repeat}",
        flush=True,
    )
    upstream = procs.FakeUpstreamProcess()
    pooled = any("+pool" in target for target in args.targets)
    replica = procs.FakeUpstreamProcess() if pooled else None
    runs: list[dict[str, Any]] = []
    slow_runs: list[dict[str, Any]] = []
    profiles: list[Path] = []
    try:
        for rep in range(args.repeat):
            for level in args.concurrency:
                for target in args.targets:
                    result = measure(
                        target, upstream, concurrency=level, shape=shape,
                        duration=args.duration, workdir=out, replica=replica,
                    )  # fmt: skip
                    result["repeat"] = rep
                    runs.append(result)
                    _progress(result)
        if args.slow:
            slow_shape = Shape(args.slow_chunks, args.slow_interval, args.prefill)
            for target in args.targets:
                result = measure(
                    target, upstream, concurrency=args.slow, shape=slow_shape,
                    duration=args.duration, workdir=out, replica=replica,
                )  # fmt: skip
                slow_runs.append(result)
                _progress(result)
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

    rows = median_rows(runs)
    slow_rows = median_rows(slow_runs)
    report = [table(rows)] if rows else []
    if slow_rows:
        report += [
            "",
            f"{args.slow} slow streams at once ({args.slow_chunks} chunks "
            f"{args.slow_interval:g} s apart):",
            "",
            table(slow_rows),
        ]
    text = "\n".join(report)
    print("\n" + text)
    png = out / f"{stamp}.png"
    chart(rows or slow_rows, png)  # one shape of stream per chart
    summary = {
        "machine": machine,
        "shape": {"chunks": shape.chunks, "interval": shape.interval, "prefill": shape.prefill},
        "duration": args.duration,
        "repeat": args.repeat,
        "rows": rows,
        "slow_rows": slow_rows,
        "runs": runs,
        "slow_runs": slow_runs,
        "chart": str(png),
        "profiles": [str(path) for path in profiles],
    }
    (out / f"{stamp}.json").write_text(json.dumps(summary, indent=1))
    (out / f"{stamp}.md").write_text(text + "\n")
    print(f"\nresults: {out / stamp}.json, .md; chart: {png}")
    for path in profiles:
        print(f"profile (py-spy, collapsed stacks): {path}")
    return 0


def _progress(result: dict[str, Any]) -> None:
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
