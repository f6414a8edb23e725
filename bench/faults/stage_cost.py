"""What a finished stage holds while it is retained, counted by tracemalloc, in-process.

    python -m bench.faults.stage_cost [--stages 10000] [--chunks 30]

Under gevent (patched first, as gunicorn's worker is), ``--stages`` stages are run one
after another by a scripted relay that appends the fake upstream's chunks (``chunks``
content chunks, the ``finish_reason`` chunk and the usage chunk, each read by
``chunks.read_chunk`` as the relay reads it) and finishes, and are kept in a
``StageRegistry`` with the default TTLs, as the server keeps them. Counted: the bytes
Python holds per stage once they are finished (events replayable), and after their
events expired (status and text only), for the stage as it is (``Stage._settle``: the
log compacted into one bytes object, the text joined, the relay dropped) and with
``_settle`` turned off. Prints one JSON object. The relay here is a small script: a real
one also holds the request body, which ``_settle`` drops as well.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import linecache  # noqa: E402
import sys  # noqa: E402
import tracemalloc  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

from stageserver.settings import SETTINGS  # noqa: E402
from stageserver.stages.registry import StageRegistry  # noqa: E402
from stageserver.stages.spec import StageSpec  # noqa: E402
from stageserver.stages.stage import Stage  # noqa: E402
from stageserver.upstream.chunks import read_chunk  # noqa: E402


class ScriptedRelay:
    """The relay's side of a stage: the fake upstream's chunks for stream ``index``, made
    as they are read (a real relay does not keep what it has read either)."""

    def __init__(self, index: int, chunks: int) -> None:
        self.index = index
        self.chunks = chunks

    def run(self, stage: Stage) -> None:
        for payload in payloads(self.index, self.chunks):
            stage.append_chunk(payload, read_chunk(payload, "default"))
        stage.finish()

    def unblock(self) -> None:
        pass


class UnsettledStage(Stage):
    """A stage that keeps what it used to get to its end: the log as a list of events,
    the text in parts, the relay."""

    def _settle(self) -> None:
        pass


def payloads(index: int, chunks: int) -> list[bytes]:
    """What the fake upstream sends for one stream, as ``testing/fake_upstream`` does."""
    head = (
        f'{{"id":"chatcmpl-fake-{index}","object":"chat.completion.chunk","created":1764032400,'
        f'"model":"fake?chunks={chunks}&interval=0.005","choices":'
    )
    out = [
        f'{head}[{{"index":0,"delta":{{"content":"tok{k} "}},"finish_reason":null}}]}}'
        for k in range(chunks)
    ]
    out.append(f'{head}[{{"index":0,"delta":{{}},"finish_reason":"stop"}}]}}')
    out.append(
        f'{head}[],"usage":{{"prompt_tokens":9,"completion_tokens":{chunks},'
        f'"total_tokens":{chunks + 9}}}}}'
    )
    return [p.encode() for p in out]


def measure(kind: type[Stage], stages: int, chunks: int) -> dict[str, Any]:
    registry = StageRegistry(
        SETTINGS["STAGESERVER_STAGE_TTL_SECONDS"][0], SETTINGS["STAGESERVER_EVENT_TTL_SECONDS"][0]
    )
    kept: list[Stage] = []
    gc.collect()
    tracemalloc.start(1)
    base = tracemalloc.take_snapshot()
    start = tracemalloc.get_traced_memory()[0]
    for n in range(stages):
        spec = StageSpec(
            stage_id=f"m-{n}", upstream="default", resumable=False, request_id=f"{n:032x}",
            grace_seconds=30.0, max_events=20_000, prompt_tokens_estimate=9,
        )  # fmt: skip
        stage = kind(spec, ScriptedRelay(n, chunks), [registry])
        registry.add(stage)
        stage.start()
        stage.wait()
        kept.append(stage)
    gc.collect()
    with_events = tracemalloc.get_traced_memory()[0] - start
    top = _top(tracemalloc.take_snapshot().compare_to(base, "lineno"), stages)
    assert all(s.status == "done" and s.next_seq == chunks + 3 for s in kept)
    wire = len(kept[0].read(0)[0])
    for stage in kept:
        stage.drop_events()  # what the registry does after the event TTL
    gc.collect()
    status_only = tracemalloc.get_traced_memory()[0] - start
    top_status = _top(tracemalloc.take_snapshot().compare_to(base, "lineno"), stages)
    tracemalloc.stop()
    return {
        "with_events_bytes": round(with_events / stages),
        "status_only_bytes": round(status_only / stages),
        "event_bytes": wire,  # the events' own bytes, as a client receives them
        "top_with_events": _named(top),
        "top_status_only": _named(top_status),
    }


def _top(stats: list[tracemalloc.StatisticDiff], stages: int) -> list[tuple[str, int, int]]:
    """Where the bytes per stage were allocated, the largest first: file, line, bytes."""
    return [
        (stat.traceback[0].filename, stat.traceback[0].lineno, round(stat.size_diff / stages))
        for stat in stats[:8]
        if stat.size_diff / stages >= 16
    ]


def _named(top: list[tuple[str, int, int]]) -> list[tuple[str, str, int]]:
    """file:line, the line itself, bytes (read once tracemalloc is off: reading costs too).
    Lines of this file are the stage's request: its spec, and the stage object itself."""
    return [
        (f"{path.rsplit('/', 1)[-1]}:{line}", linecache.getline(path, line).strip(), size)
        for path, line, size in top
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--stages", type=int, default=10_000)
    parser.add_argument("--chunks", type=int, default=30)
    args = parser.parse_args(argv)
    result = {
        "stages": args.stages,
        "chunks": args.chunks,
        "settled": measure(Stage, args.stages, args.chunks),
        "unsettled": measure(UnsettledStage, args.stages, args.chunks),
    }
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
