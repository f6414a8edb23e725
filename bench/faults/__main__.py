"""``python -m bench.faults [--only NAME,...] [--quick] [--out DIR]``: see ``__init__``."""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import procs

from . import clients_faults, continuation, lifecycle, memory, messages, store
from .harness import SETTLE_SECONDS, Outcome

RESULTS = Path(__file__).resolve().parent.parent / "results"

FAULTS: dict[str, Callable[[bool], Outcome]] = {
    "owner-sigkill": store.owner_sigkill,
    "host-sigkill": continuation.host_sigkill,
    "replica-cut": continuation.replica_cut,
    "host-sigkill-messages": messages.host_sigkill,
    "replica-cut-messages": messages.replica_cut,
    "worker-restart": lifecycle.worker_restart,
    "frozen-clients": clients_faults.frozen_clients,
    "eventsource-after-end": clients_faults.eventsource_after_end,
    "burst-then-quiet": lifecycle.burst_then_quiet,
    "redis-restart": store.redis_restart,
    "sentinel-failover": store.sentinel_failover,
    "half-close": clients_faults.half_close,
    "churn": memory.churn,
    "stage-memory": memory.stage_memory,
}

_COLUMNS = (
    "fault",
    "what happened",
    "time to terminal",
    "greenlets left",
    "descriptors left",
    "RSS delta",
    "upstream connections left",
    "other load",
)


def row(out: Outcome) -> list[str]:
    left = out.leftover
    ttt = "–" if out.time_to_terminal is None else f"{out.time_to_terminal:.2f} s"
    if left is None:
        return [out.fault, out.happened, ttt, "–", "–", "–", "–", _load(out)]
    descriptors = f"{left.descriptors:+d}" + (f" ({left.detail})" if left.detail else "")
    return [
        out.fault, out.happened, ttt, str(left.greenlets), descriptors,
        f"{round(left.rss_kb / 1024, 1) + 0.0:+.1f} MB", str(left.upstream_connections),
        _load(out),
    ]  # fmt: skip


def _load(out: Outcome) -> str:
    return "–" if out.other_load is None else f"{out.other_load:.2f} cores"


def table(outcomes: list[Outcome]) -> str:
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * 6) + "|"]
    lines += ["| " + " | ".join(row(out)) + " |" for out in outcomes]
    return "\n".join(lines)


def report(outcomes: list[Outcome], command: str) -> str:
    machine = procs.machine()
    parts = [
        f"`{command}`: {machine['cpus']} × {machine['cpu_model']}; left over read "
        f"{SETTLE_SECONDS:g} s after each fault (the upstream pool's 4 s keep-alive expiry, "
        "its 1 s reaper, 1 s more); other load: cores busy with anything else meanwhile.",
        "",
        table(outcomes),
    ]
    extra = [line for out in outcomes for line in out.lines]
    if extra:
        parts += ["", *extra]
    problems = [f"- {out.fault}: {p}" for out in outcomes for p in out.problems]
    parts += ["", "Problems:" if problems else "Problems: none.", *problems]
    return "\n".join(parts)


def run(name: str, quick: bool) -> Outcome:
    try:
        return FAULTS[name](quick)
    except Exception as exc:  # one fault that cannot run must not hide the others
        traceback.print_exc()
        out = Outcome(name, happened="did not run to its end")
        out.problems.append(f"{type(exc).__name__}: {exc}")
        return out


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(FAULTS)}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__)
    parser.add_argument("--only", type=_names, default=list(FAULTS), help="faults, by name")
    parser.add_argument("--quick", action="store_true", help="fewer clients and streams")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    procs.raise_nofile_limit()
    outcomes = []
    for name in args.only:
        print(f"{name} ...", flush=True)
        started = time.monotonic()
        out = run(name, args.quick)
        outcomes.append(out)
        verdict = "ok" if not out.problems else f"{len(out.problems)} problem(s)"
        print(f"  {verdict} in {time.monotonic() - started:.0f} s: {out.happened}", flush=True)
    command = "python -m bench.faults" + " ".join(
        [""]
        + (["--quick"] if args.quick else [])
        + ([f"--only {','.join(args.only)}"] if args.only != list(FAULTS) else [])
    )
    text = report(outcomes, command)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{time.strftime('%Y%m%d-%H%M%S')}-faults.md"
    path.write_text(text + "\n")
    print(f"\nresults: {path}")
    return 1 if any(out.problems for out in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
