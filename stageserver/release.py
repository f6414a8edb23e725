"""The package's version: its installed metadata's, else (a checkout that was never
installed) the ``pyproject.toml`` beside it. Read once, when first asked for."""

from __future__ import annotations

import re
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

_PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


@cache
def package_version() -> str:
    try:
        return version("stageserver")
    except PackageNotFoundError:
        pass
    try:
        found = re.search(r'^version = "([^"]+)"', _PYPROJECT.read_text(), re.MULTILINE)
    except OSError:
        found = None
    return found.group(1) if found else "0+unknown"
