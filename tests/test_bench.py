"""The relay benchmark still runs: one quick run, numbers for every target.

Speed itself is not tested here (no timing assertions): that is what ``bench/`` is for.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from testing.servers import ROOT

#: Every test here starts a process (testing/processes.py).
pytestmark = pytest.mark.processes


def test_quick_bench_reports_every_target(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    [result_file] = tmp_path.glob("*.json")
    summary = json.loads(result_file.read_text())
    rows = {row["target"]: row for row in summary["rows"]}
    assert sorted(rows) == ["direct", "nginx", "stageserver"]
    for target, row in rows.items():
        assert row["errors"] == 0, (target, summary["runs"])
        assert row["streams"] > 0
        assert row["ttft_p50_ms"] > 0 and row["ttft_p99_ms"] >= row["ttft_p50_ms"]
        assert row["chunks_per_second"] > 0
        assert row["loadgen_cpu_us_per_chunk"] > 0
    for target in ("stageserver", "nginx"):  # the relays: their CPU and memory are read
        assert rows[target]["server_cpu_us_per_chunk"] > 0
        assert rows[target]["memory_per_stream_kb"] is not None
        assert rows[target]["server_log_errors"] == 0
    assert rows["direct"]["server_cpu_us_per_chunk"] is None
    assert rows["stageserver"]["added_ttft_p50_ms"] is not None
    assert Path(summary["chart"]).stat().st_size > 0
    assert b"| stageserver |" in done.stdout


def test_quick_bench_streams_the_same_stages_through_each_api(tmp_path: Path) -> None:
    """The seed's /chat, OpenAI's two and Anthropic's Messages API, side by side: every
    stream whole, no error."""
    targets = [
        "stageserver",
        "stageserver+v1chat",
        "stageserver+v1responses",
        "stageserver+messages",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(tmp_path)]
        + ["--targets", ",".join(targets)],
        cwd=ROOT,
        capture_output=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    [result_file] = tmp_path.glob("*.json")
    rows = {row["target"]: row for row in json.loads(result_file.read_text())["rows"]}
    assert sorted(rows) == sorted(targets)
    for target, row in rows.items():
        assert row["errors"] == 0, target
        assert row["streams"] > 0 and row["chunks_per_second"] > 0
        assert row["server_cpu_us_per_chunk"] > 0


def test_quick_bench_counts_the_shared_stores_work(tmp_path: Path) -> None:
    """The memory store, Redis, and Redis with a follower on a second host: Redis's
    commands and CPU per chunk are read, the followers read every stage whole."""
    targets = ["stageserver", "stageserver+redis", "stageserver+redis+follow"]
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(tmp_path)]
        + ["--targets", ",".join(targets)],
        cwd=ROOT,
        capture_output=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    [result_file] = tmp_path.glob("*.json")
    summary = json.loads(result_file.read_text())
    rows = {row["target"]: row for row in summary["rows"]}
    assert sorted(rows) == sorted(targets)
    for target, row in rows.items():
        assert row["errors"] == 0, (target, summary["runs"])
        assert row["server_log_errors"] == 0, target
        assert row["server_cpu_us_per_chunk"] > 0
        assert row["server_cpu_vs_memory"] > 0, target
        p50, p99 = row["durable_p50_ms"], row["durable_p99_ms"]
        assert p50 is None or 0 < p50 <= p99, (target, p50, p99)
    memory = rows["stageserver"]
    assert memory["server_cpu_vs_memory"] == 1.0
    assert memory["redis_commands_per_chunk"] is None and memory["redis_cpu_us_per_chunk"] is None
    for target in ("stageserver+redis", "stageserver+redis+follow"):
        assert rows[target]["redis_commands_per_chunk"] > 0, target
        assert rows[target]["redis_cpu_us_per_chunk"] > 0, target
    assert rows["stageserver+redis"]["follow_streams"] == 0
    follow = rows["stageserver+redis+follow"]
    assert follow["follow_streams"] > 0 and follow["follow_errors"] == 0
    assert b"| Redis cmds/chunk |" in done.stdout
