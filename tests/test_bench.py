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
from typing import Any

import pytest

from bench import procs
from bench.burst import rank_correlation, ranks
from bench.load import LoadSpec, Shape, parse_spec
from bench.run import chat_target, memory_store_target
from testing.fake_upstream import FakeUpstream
from testing.servers import ROOT

#: Every test here starts a process (testing/processes.py).
pytestmark = pytest.mark.processes


def quick_bench(tmp_path: Path, *args: str) -> tuple[dict[str, Any], bytes]:
    """``bench.run --quick`` with ``args``, its results into ``tmp_path``: the summary it
    wrote (the JSON) and what it printed."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(tmp_path), *args],
        cwd=ROOT,
        capture_output=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    [result_file] = tmp_path.glob("*.json")
    return json.loads(result_file.read_text()), done.stdout


def by_target(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["target"]: row for row in rows}


def test_quick_bench_reports_every_target(tmp_path: Path) -> None:
    summary, printed = quick_bench(tmp_path)
    rows = by_target(summary["rows"])
    assert sorted(rows) == ["direct", "nginx", "stageserver"]
    assert summary["new_connections"] is False
    for target, row in rows.items():
        assert row["errors"] == 0, (target, summary["runs"])
        assert row["streams"] > 0
        assert row["connections"] == row["concurrency"] == 10, target  # kept alive
        assert row["ttft_p50_ms"] > 0 and row["ttft_p99_ms"] >= row["ttft_p50_ms"]
        assert row["chunks_per_second"] > 0
        assert row["loadgen_cpu_us_per_chunk"] > 0
        assert row["server_cpu_vs_chat"] is None, target  # no other API in the run
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
    assert b"| stageserver |" in printed


def test_quick_bench_streams_the_same_stages_through_each_api(tmp_path: Path) -> None:
    """The seed's /chat, OpenAI's two and Anthropic's Messages API, side by side, each
    stream on a connection of its own (as issue 28 compares them): every stream whole, no
    error, a connection per stream, each API's cost against /chat's."""
    apis = ["stageserver+v1chat", "stageserver+v1responses", "stageserver+messages"]
    targets = ["stageserver", *apis]
    summary, printed = quick_bench(tmp_path, "--new-connections", "--targets", ",".join(targets))
    rows = by_target(summary["rows"])
    assert sorted(rows) == sorted(targets)
    assert summary["new_connections"] is True
    for target, row in rows.items():
        assert row["errors"] == 0, target
        assert row["streams"] > 0 and row["chunks_per_second"] > 0
        assert row["connections"] == row["streams"], target
        assert row["server_cpu_us_per_chunk"] > 0
    assert rows["stageserver"]["server_cpu_vs_chat"] is None
    for target in apis:
        assert rows[target]["server_cpu_vs_chat"] > 0, target
    assert "÷ /chat".encode() in printed


def test_quick_bench_runs_the_fixed_design_written_plainly(tmp_path: Path) -> None:
    """``plain`` and ``bare`` (bench/plain.py under gunicorn's gevent worker), kept alive
    and in a burst of one-chunk streams: every stream whole, their worker's CPU read."""
    targets = ["plain", "bare"]
    summary, printed = quick_bench(tmp_path, "--new-streams", "20", "--targets", ",".join(targets))
    for mode in ("rows", "new_stream_rows"):
        rows = by_target(summary[mode])
        assert sorted(rows) == sorted(targets), mode
        for target, row in rows.items():
            assert row["errors"] == 0 and row["server_log_errors"] == 0, (mode, target, summary)
            assert row["streams"] > 0, (mode, target)
        assert rows["plain"]["server_cpu_vs_nginx"] is None  # no nginx in the run
    for target, row in by_target(summary["rows"]).items():
        assert row["server_cpu_us_per_chunk"] > 0, target
        assert row["memory_per_stream_kb"] is not None, target
    for target, row in by_target(summary["new_stream_rows"]).items():
        assert row["server_cpu_us_per_stream"] > 0, target
    assert b"| plain |" in printed and b"| bare |" in printed


def test_quick_bench_counts_the_shared_stores_work(tmp_path: Path) -> None:
    """The memory store, Redis, and Redis with a follower on a second host: Redis's
    commands and CPU per chunk are read, the followers read every stage whole."""
    targets = ["stageserver", "stageserver+redis", "stageserver+redis+follow"]
    summary, printed = quick_bench(tmp_path, "--targets", ",".join(targets))
    rows = by_target(summary["rows"])
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
    assert b"| Redis cmds/chunk |" in printed


def test_quick_bursts_report_every_target(tmp_path: Path) -> None:
    """A burst of streams of the run's shape and a burst of one-chunk streams, each on new
    connections, side by side: the report's shape, never its timings."""
    targets = ["stageserver", "direct", "nginx"]
    summary, printed = quick_bench(
        tmp_path,
        *("--concurrency", "", "--burst", "20", "--new-streams", "20"),
        *("--targets", ",".join(targets)),
    )
    assert summary["rows"] == [] and summary["chart"] is None
    for mode in ("burst_rows", "new_stream_rows"):
        rows = by_target(summary[mode])
        assert sorted(rows) == sorted(targets), mode
        for target, row in rows.items():
            where = (mode, target)
            assert row["errors"] == 0 and row["server_log_errors"] == 0, (where, summary)
            assert row["concurrency"] == row["streams"] == row["connections"] == 20, where
            assert 0 < row["ttft_p50_ms"] <= row["ttft_p90_ms"] <= row["ttft_last_ms"], where
            assert -1 <= row["rank_correlation"] <= 1, where
            assert row["send_spread_ms"] >= 0 and row["other_cpu_cores"] >= 0, where
            assert row["redis_connections_peak"] is None, where  # no store
        for target in ("stageserver", "nginx"):  # the relays' workers
            row = rows[target]
            assert 0 < row["start_cpu_ms"] <= row["burst_cpu_ms"], (mode, target)
            assert row["server_cpu_us_per_stream"] > 0 and row["server_cpu_vs_nginx"] > 0
            assert row["added_ttft_p50_ms"] is not None and row["added_vs_start_cpu"] is not None
            assert 0 < row["first_token_cpu_p50_ms"] <= row["start_cpu_ms"], (mode, target)
            assert 0 < row["p50_cpu_vs_start_cpu"] <= 1, (mode, target)
        assert rows["nginx"]["server_cpu_vs_nginx"] == 1.0
        direct = rows["direct"]
        assert direct["burst_cpu_ms"] is None and direct["added_ttft_p50_ms"] is None
    assert b"| rank \xcf\x81 |" in printed and b"| CPU \xc2\xb5s/stream |" in printed


def test_quick_burst_counts_the_workers_redis_connections_per_node(tmp_path: Path) -> None:
    """A burst on the Redis store and on a Redis Cluster of three primaries: the worker's
    connections to the store at their peak and after the burst, summed and on the node
    that had the most; after it, Redis's count is the worker's own sockets to the nodes."""
    targets = ["stageserver+redis", "stageserver+cluster"]
    summary, printed = quick_bench(
        tmp_path, "--concurrency", "", "--burst", "20", "--targets", ",".join(targets)
    )
    rows = by_target(summary["burst_rows"])
    runs = by_target(summary["burst_runs"])
    assert sorted(rows) == sorted(targets)
    for target, row in rows.items():
        assert row["errors"] == 0 and row["server_log_errors"] == 0, (target, summary)
        assert row["streams"] == row["connections"] == 20, target
        assert row["redis_connections_before"] >= 1, target
        peak, after = row["redis_connections_peak"], row["redis_connections_after"]
        assert peak >= after >= 1, target
        assert 1 <= row["redis_connections_peak_per_node"] <= peak, target
        assert 1 <= row["redis_connections_after_per_node"] <= after, target
        assert row["redis_worker_sockets_after"] == after, target
        # The store's bound (8 per node for commands) and the cancel listener's one.
        assert row["redis_connections_peak_per_node"] <= 8 + 1, target
        assert row["rss_after_kb"] > 0 and row["fds_after"] > after, target
        by_node = runs[target]["redis_connections_peak_by_node"]
        assert max(by_node.values()) == row["redis_connections_peak_per_node"], target
    assert len(runs["stageserver+redis"]["redis_connections_peak_by_node"]) == 1
    assert len(runs["stageserver+cluster"]["redis_connections_peak_by_node"]) == 3
    redis = rows["stageserver+redis"]
    assert redis["redis_connections_peak_per_node"] == redis["redis_connections_peak"]
    assert b"| peak per node |" in printed and b"| after per node |" in printed


def test_a_burst_runs_on_its_own(fake: FakeUpstream) -> None:
    """``python -m bench.burst``, as bench.run starts it, against the fake upstream read
    directly: one JSON object, a connection per stream, the orders' correlation."""
    spec = LoadSpec(
        port=fake.port,
        target="direct",
        path="/v1/chat/completions",
        shape=Shape(3, 0.01, 0.0),
        concurrency=12,
    )
    done = subprocess.run(
        [sys.executable, "-m", "bench.burst", *spec.argv()],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    result = json.loads(done.stdout)
    assert result["errors"] == 0, result["error_samples"]
    assert result["concurrency"] == result["streams"] == result["connections"] == 12
    assert result["chunks"] == 12 * Shape(3, 0.01, 0.0).events
    assert 0 < result["ttft_p50_ms"] <= result["ttft_p90_ms"] <= result["ttft_last_ms"]
    assert -1 <= result["rank_correlation"] <= 1
    assert result["burst_seconds"] > 0 and result["send_spread_ms"] >= 0
    # No server process: the worker's CPU and memory are not read, nor a store.
    assert result["burst_cpu_ms"] is None and result["memory_per_stream_kb"] is None
    assert result["redis_connections_peak"] is None
    assert result["rss_after_kb"] is None and result["fds_after"] is None


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
        new_connections=True,
    )
    assert parse_spec(spec.argv(), "") == spec
    bare = LoadSpec(port=1, target="direct", path="/v1/chat/completions", shape=Shape(1, 0, 0),
                    concurrency=1)  # fmt: skip
    assert parse_spec(bare.argv(), "") == bare


def test_the_targets_a_ratio_is_taken_against() -> None:
    """÷ memory: the same target without its store; ÷ /chat: the same target without
    its API (none for a target through /chat); neither for direct or nginx."""
    against_memory = {
        "stageserver+redis+v1chat@abc": "stageserver+v1chat@abc",
        "stageserver+cluster+follow+w50": "stageserver",
        "stageserver": "stageserver",
        "direct": None,
    }
    for target, expected in against_memory.items():
        assert memory_store_target(target) == expected, target
    against_chat = {
        "stageserver+v1chat": "stageserver",
        "stageserver+redis+v1responses@abc": "stageserver+redis@abc",
        "stageserver+messages": "stageserver",
        "stageserver+redis": None,
        "nginx": None,
    }
    for target, expected in against_chat.items():
        assert chat_target(target) == expected, target
