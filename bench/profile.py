"""Summarise a py-spy profile (collapsed stacks, ``--format raw``) as text.

    .venv/bin/python -m bench.profile bench/results/<stamp>-profile-c200.txt [--top 25]

Prints where the samples are: by phase of a stream (per stream or per chunk, for a
stageserver worker), by package and by function, self (the innermost frame)
and inclusive (anywhere on the stack), with line numbers dropped so that a function
counts once. py-spy puts time spent in C (a system call, a greenlet switch) on the
innermost Python frame, so ``recv`` includes the switch back to the hub.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

_LINE = re.compile(r":\d+\)$")


def _frame(raw: str) -> str:
    """``func (path/to/module.py:123)`` → ``func (module.py)``."""
    name, _, where = raw.partition(" (")
    if not where:
        return raw
    path = _LINE.sub(")", where).rstrip(")")
    return f"{name} ({path.rsplit('/', 1)[-1]})"


def _package(raw: str) -> str:
    """The package a frame's code is in: ``gevent``, ``h11``, ``stageserver``, ... (the
    standard library's modules by name: ``json``, ``contextlib``)."""
    where = raw.partition(" (")[2]
    path = _LINE.sub("", where).rstrip(")")
    parts = path.split("/")
    if "site-packages" in parts:
        parts = parts[parts.index("site-packages") + 1 :]
    elif "stageserver" in parts:
        return "stageserver"
    elif len(parts) > 1 and parts[-2].startswith("python3"):
        return parts[-1].removesuffix(".py")  # the standard library
    if len(parts) > 1:
        return parts[-2] if parts[-2].startswith("python3") else parts[0]
    return parts[0].removesuffix(".py")


# Both layouts' names: the relay inside Stage (before the lifecycle issue) and the relay in
# relay.py, so that profiles of older revisions group the same way.
_CHUNK_WORK = frozenset(
    {
        "Stage._take_chunk",
        "_parse_chunk",
        "Stage._append_chunk",
        "Stage.append_chunk",
        "read_chunk",
        "StageEvents.chunk",
        "Stage._append",
        "Stage._notify",
        "EventLog.append",
        "encode_event",
        "SSEPayloadSplitter.feed",
    }
)
_BODY_READ = frozenset({"h11", "httpcore2", "httpx2", "contextlib", "httptools"})
_BODY_READ_FRAMES = frozenset(
    {
        "Stage._relay_reads",
        "UpstreamRelay._relay_reads",
        "UpstreamRelay._relay",
        "_Body.__iter__",
        "_Body.feed",
        "Connection.read",
    }
)
_DRAIN = frozenset({"Stage._drain", "UpstreamRelay._drain"})
_FOLLOW = frozenset({"follow_stage", "follow", "LocalFeed.read", "Response.write", "write_chunk"})


def phase(raw_frames: list[str]) -> str:
    """What a stageserver worker was doing in one sample, per stream or per chunk.

    Some greenlet stacks come truncated (py-spy sees a resumed generator's frames
    without the greenlet's start), so a sample is also placed by its innermost frame."""
    names = {_frame(f).split(" (")[0] for f in raw_frames}
    innermost = _frame(raw_frames[-1]).split(" (")[0]
    if "ReplicaClient.open_stream" in names:
        return "per stream: the openai client builds and sends the upstream request"
    if names & _CHUNK_WORK:
        return "per chunk: split, parse the chunk's JSON, encode the event, append, wake"
    if names & _DRAIN:
        return "per stream: read the body's end after [DONE]"
    if (
        names & _BODY_READ_FRAMES
        or _package(raw_frames[-1]) in _BODY_READ
        or innermost
        in (
            "SocketMixin.recv",
            "SyncStream.read",
        )
    ):
        return "per chunk: read the upstream body (transport, gevent's recv)"
    if names & _FOLLOW:
        return "per chunk: follow the log, write to the client (gunicorn, gevent's send)"
    if names & {"Flask.__call__", "Flask.wsgi_app"}:
        return "per stream: the Flask view (validation, Stage, admission, metrics)"
    if names & {"Stage._run", "Stage._finish", "Stage._settle"}:
        return "per stream: stage start and finish, log line"
    if names & {"AsyncWorker.handle_request", "AsyncWorker.handle"}:
        return "per stream: gunicorn reads and parses the request"
    if names == {"Hub.run"}:
        return "gevent's hub: the event loop, greenlet switches"
    return f"other: {innermost}"


def summarise(text: str) -> tuple[int, Counter[str], Counter[str], Counter[str], Counter[str]]:
    total = 0
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    phases: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        raw_frames = [f for f in stack.split(";") if " (" in f]
        if not raw_frames:
            continue
        frames = [_frame(f) for f in raw_frames]
        total += samples
        own[frames[-1]] += samples
        packages[_package(raw_frames[-1])] += samples
        phases[phase(raw_frames)] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    return total, own, inclusive, packages, phases


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    total, own, inclusive, packages, phases = summarise(args.profile.read_text())
    if not total:
        print("no samples")
        return 1
    sections = (
        ("by phase", phases),
        ("self, by package", packages),
        ("self", own),
        ("inclusive", inclusive),
    )
    for title, counts in sections:
        print(f"\n{title} ({total} samples)")
        for frame, samples in counts.most_common(args.top):
            print(f"{100 * samples / total:6.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
