"""The relay benchmark still runs: one quick run, numbers for every target.

Speed itself is not tested here (no timing assertions): that is what ``bench/`` is for.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bench import procs
from bench.burst import rank_correlation, ranks
from bench.load import LoadSpec, Shape, parse_spec
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
    assert rows["stageserver"]["server_cpu_vs_nginx"] > 0
    assert rows["nginx"]["server_cpu_vs_nginx"] == 1.0
    assert rows["direct"]["server_cpu_vs_nginx"] is None
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


def test_quick_bursts_report_every_target(tmp_path: Path) -> None:
    """A burst of streams of the run's shape and a burst of one-chunk streams, each on new
    connections, side by side: the report's shape, never its timings."""
    targets = ["stageserver", "stageserver+redis", "direct", "nginx"]
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(tmp_path)]
        + ["--concurrency", "", "--burst", "20", "--new-streams", "20"]
        + ["--targets", ",".join(targets)],
        cwd=ROOT,
        capture_output=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    [result_file] = tmp_path.glob("*.json")
    summary = json.loads(result_file.read_text())
    assert summary["rows"] == [] and summary["chart"] is None
    for mode in ("burst_rows", "new_stream_rows"):
        rows = {row["target"]: row for row in summary[mode]}
        assert sorted(rows) == sorted(targets), mode
        for target, row in rows.items():
            where = (mode, target)
            assert row["errors"] == 0 and row["server_log_errors"] == 0, (where, summary)
            assert row["concurrency"] == row["streams"] == 20, where
            assert 0 < row["ttft_p50_ms"] <= row["ttft_p90_ms"] <= row["ttft_last_ms"], where
            assert -1 <= row["rank_correlation"] <= 1, where
            assert row["send_spread_ms"] >= 0 and row["other_cpu_cores"] >= 0, where
        for target in ("stageserver", "stageserver+redis", "nginx"):  # the relays' workers
            row = rows[target]
            assert 0 < row["start_cpu_ms"] <= row["burst_cpu_ms"], (mode, target)
            assert row["server_cpu_us_per_stream"] > 0 and row["server_cpu_vs_nginx"] > 0
            assert row["added_ttft_p50_ms"] is not None and row["added_vs_start_cpu"] is not None
            assert 0 < row["first_token_cpu_p50_ms"] <= row["start_cpu_ms"], (mode, target)
            assert 0 < row["p50_cpu_vs_start_cpu"] <= 1, (mode, target)
        assert rows["nginx"]["server_cpu_vs_nginx"] == 1.0
        direct = rows["direct"]
        assert direct["burst_cpu_ms"] is None and direct["added_ttft_p50_ms"] is None
        store = rows["stageserver+redis"]
        assert store["redis_connections_peak"] >= store["redis_connections_after"] >= 1, mode
        assert store["redis_worker_sockets_after"] == store["redis_connections_after"], mode
        assert rows["stageserver"]["redis_connections_peak"] is None
    assert b"| rank \xcf\x81 |" in done.stdout and b"| CPU \xc2\xb5s/stream |" in done.stdout


def test_rank_correlation_of_orders() -> None:
    """Spearman's ρ, ties at their mean rank: a table of orders and their exact ρ."""
    assert ranks([30, 10, 20, 10]) == [4.0, 1.5, 3.0, 1.5]
    cases = [
        ([1, 2, 3, 4], [10, 20, 30, 40], 1.0),  # first come, first served
        ([1, 2, 3, 4], [40, 30, 20, 10], -1.0),  # the last served first
        ([1, 2, 3, 4, 5], [2, 1, 4, 3, 5], 0.8),  # neighbours swapped: 1 - 6·4/(5·24)
        ([1, 2, 3], [5, 5, 7], 0.866025),  # a tie
        ([1, 2], [3, 3], None),  # no order on one side
        ([1], [1], None),
    ]
    for sent, first, expected in cases:
        rho = rank_correlation(sent, first)
        assert (rho if rho is None else round(rho, 6)) == expected, (sent, first)


def test_connections_to_counts_the_sockets_a_process_holds_to_a_port() -> None:
    """What bench.burst compares Redis's own count with: this process's sockets whose peer
    is a listening port, read from /proc (the accepted ends, whose local port it is, not)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        accepted = [listener.accept()[0] for _ in clients]
        try:
            assert procs.connections_to([os.getpid()], [port, 1]) == {port: 3, 1: 0}
        finally:
            for sock in clients + accepted:
                sock.close()


def test_a_load_spec_is_its_command_line() -> None:
    """bench.run starts each load generator with ``LoadSpec.argv``; it reads it back."""
    spec = LoadSpec(
        port=1,
        target="stageserver+redis@a548dc4",
        path="/v1/responses",
        shape=Shape(5, 0.01, 0.5),
        concurrency=20,
        duration=1.5,
        server_pid=2,
        upstream_pid=3,
        profile="profile.txt",
        api_key="key",
        redis=[(4, 5), (6, 7)],
        metrics=True,
        follow_port=8,
        follow_pid=9,
    )
    assert parse_spec(spec.argv(), "") == spec
    bare = LoadSpec(port=1, target="direct", path="/v1/chat/completions", shape=Shape(1, 0, 0),
                    concurrency=1)  # fmt: skip
    assert parse_spec(bare.argv(), "") == bare
