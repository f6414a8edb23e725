"""``testing/``'s map: its package docstring names each of its modules and packages, so
that a newcomer finds what the tests share where the tests say to look."""

from __future__ import annotations

import testing
from testing.servers import ROOT


def test_the_map_of_testing_names_each_of_its_modules() -> None:
    folder = ROOT / "testing"
    modules = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    packages = {p.name for p in folder.iterdir() if (p / "__init__.py").exists()}
    folders = {"js"}  # node's programs, not Python's
    doc = testing.__doc__ or ""
    named = {name for name in modules if f"``{name}``" in doc}
    named |= {name for name in packages | folders if f"``{name}/``" in doc}
    assert sorted((modules | packages | folders) - named) == []
