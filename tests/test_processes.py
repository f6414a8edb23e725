"""The ``processes`` mark (``testing/processes.py``): what gets it, and what fails a test
that starts a process without it. ``pytest -m "not processes"`` is the inner loop only
as long as this holds."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testing.processes import PROCESS_FIXTURES
from testing.servers import ROOT

#: A test module run by a pytest of its own, with the plugin: a fixture that starts a
#: process under a name the plugin knows, one under a name it does not, and one that
#: keeps its process for the module, first used by a marked test.
NESTED = """
import subprocess

import pytest


@pytest.fixture(scope="module")
def server():
    subprocess.run(["true"], check=True)
    yield "known"


@pytest.fixture(scope="module")
def unknown_server():
    subprocess.run(["true"], check=True)
    yield "unknown"


def test_in_process():
    assert sum(range(4)) == 6


def test_through_a_known_fixture(server):
    assert server == "known"


@pytest.mark.processes
def test_marked_that_starts_one():
    subprocess.run(["true"], check=True)


def test_unmarked_that_starts_one():
    subprocess.run(["true", "--unmarked"], check=True)


def test_through_an_unknown_fixture(unknown_server):
    assert unknown_server == "unknown"


@pytest.fixture(scope="module")
def shared_server():
    subprocess.run(["true", "--shared"], check=True)
    yield "shared"


@pytest.mark.processes
def test_marked_first_through_a_shared_fixture(shared_server):
    assert shared_server == "shared"


def test_unmarked_later_through_the_shared_fixture(shared_server):
    assert shared_server == "shared"
"""


def run_nested(tmp_path: Path, *args: str) -> str:
    (tmp_path / "test_nested.py").write_text(NESTED)
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\naddopts = -p testing.processes --strict-markers -p no:cacheprovider\n"
        "markers =\n    processes: starts a process\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-rA", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done.stdout + done.stderr


@pytest.mark.processes
def test_an_unmarked_test_that_starts_a_process_fails_naming_it_and_its_fixture(
    tmp_path: Path,
) -> None:
    output = run_nested(tmp_path)
    assert "1 failed, 4 passed, 2 errors" in output, output
    passing = ("in_process", "through_a_known_fixture", "marked_that_starts_one",
               "marked_first_through_a_shared_fixture")  # fmt: skip
    for passed in passing:
        assert f"PASSED test_nested.py::test_{passed}" in output, output
    assert (
        "test_nested.py::test_unmarked_that_starts_one is not marked 'processes', yet its "
        "call started a process:\n  - true --unmarked (subprocess.Popen), started by the "
        "test's call" in output
    ), output
    assert (
        "test_nested.py::test_through_an_unknown_fixture is not marked 'processes', yet its "
        "setup started a process:\n  - true (subprocess.Popen), started by fixture "
        "'unknown_server'" in output
    ), output
    # Its fixture's process was started for a marked test: it starts none, and fails all the
    # same, as it would alone.
    assert (
        "test_nested.py::test_unmarked_later_through_the_shared_fixture is not marked "
        "'processes', yet its setup started a process:\n  - fixture 'shared_server', which "
        "started a process when an earlier test used it" in output
    ), output


@pytest.mark.processes
def test_not_processes_leaves_out_what_is_marked_and_what_uses_a_known_fixture(
    tmp_path: Path,
) -> None:
    output = run_nested(tmp_path, "-m", "not processes")
    assert "1 failed, 1 passed, 3 deselected, 2 errors" in output, output
    assert "PASSED test_nested.py::test_in_process" in output, output
    assert "ERROR test_nested.py::test_through_an_unknown_fixture" in output, output


def fixtures_defined_in(path: Path) -> set[str]:
    """The names of the fixtures a module defines."""
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef)
        and any("fixture" in ast.unparse(decorator) for decorator in node.decorator_list)
    }


def test_every_name_the_mark_knows_is_a_fixture_of_the_tests() -> None:
    defined = set().union(*(fixtures_defined_in(p) for p in (ROOT / "tests").glob("*.py")))
    assert sorted(PROCESS_FIXTURES - defined) == []
