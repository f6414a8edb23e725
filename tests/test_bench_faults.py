"""The fault bench still runs: two cheap faults, quick, and their table with no problem.

Outcomes only: the bench itself checks what each client saw; its timings are not tested.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from testing.servers import ROOT

#: Every test here starts a process (testing/processes.py).
pytestmark = pytest.mark.processes


def test_quick_faults_print_their_table_with_no_problem(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.faults", "--quick", "--only",
         "half-close,eventsource-after-end", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, timeout=180, check=False,
    )  # fmt: skip
    stdout = done.stdout.decode()
    assert done.returncode == 0, stdout + done.stderr.decode(errors="replace")
    rows = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| fault | what happened | time to terminal | greenlets left |")
    faults = {row.split(" | ")[0].removeprefix("| "): row.split(" | ") for row in rows[1:]}
    assert sorted(faults) == ["EventSource after the end", "half-close (SHUT_WR)"]
    for cells in faults.values():
        greenlets, upstream_left = cells[3], cells[6]
        assert (greenlets, upstream_left) == ("0", "0")
    assert "Problems: none." in stdout
    [written] = tmp_path.glob("*-faults.md")
    assert "| half-close (SHUT_WR) |" in written.read_text()


def test_a_messages_stream_cut_on_a_replica_is_read_whole_as_chats_is(tmp_path: Path) -> None:
    """The chaos of ``replica-cut``, through ``/v1/messages``: each client reads the whole
    message once, one text block, as a ``/chat`` client reads its answer."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.faults", "--quick", "--only", "replica-cut-messages",
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, timeout=300, check=False,
    )  # fmt: skip
    stdout = done.stdout.decode()
    assert done.returncode == 0, stdout + done.stderr.decode(errors="replace")
    [row] = [line for line in stdout.splitlines() if line.startswith("| replica cut")]
    cells = row.split(" | ")
    assert cells[1].startswith("10/10 clients read the whole message once"), row
    assert (cells[3], cells[6]) == ("0", "0")  # no greenlet, no upstream connection left
    assert "Problems: none." in stdout
