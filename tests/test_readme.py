"""The README stays true: its two commands. (The configuration table is on the docs
site, generated from the code: tests/test_docs.py.)"""

from __future__ import annotations

import re

from testing.servers import ROOT

README = (ROOT / "README.md").read_text()


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)


def test_quickstart_opens_with_the_run_and_test_commands() -> None:
    quickstart = README.split("## Quickstart", 1)[1]
    run, test = code_blocks(quickstart)[:2]
    assert run == "./scripts/serve\n"
    assert test == "./scripts/test\n"
    assert re.findall(r"^## .*", README, flags=re.M)[0] == "## Quickstart"


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == "scripts/test"
