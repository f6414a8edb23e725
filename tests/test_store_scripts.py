"""The Lua scripts' arguments are named on both sides: a ``NamedTuple`` that Python
builds, whose fields the script opens with as locals, in their order. A script that read
an argument by its position, or a field no script reads, would let the two sides drift."""

from __future__ import annotations

import re
from typing import Any

import pytest

from stageserver.store import scripts
from stageserver.store.batch import Script

ARGS: list[tuple[Script, Any]] = [
    (scripts.CLAIM, scripts.ClaimArgs),
    (scripts.RENEW, scripts.RenewArgs),
    (scripts.WRITE, scripts.WriteArgs),
    (scripts.HAND_OFF, scripts.HandOffArgs),
    (scripts.TAKE_OVER, scripts.TakeOverArgs),
    (scripts.DECLARE_DEAD, scripts.DeclareDeadArgs),
    (scripts.ADMIT, scripts.AdmitArgs),
]


def test_every_script_has_its_named_arguments() -> None:
    assert {script.sha for script, _ in ARGS} == {script.sha for script in scripts.ALL}


@pytest.mark.parametrize(("script", "args"), ARGS, ids=[args.__name__ for _, args in ARGS])
def test_a_script_opens_with_its_arguments_in_order_and_reads_each_by_name(
    script: Script, args: Any
) -> None:
    fields: tuple[str, ...] = args._fields
    header, _, body = script.source.partition("\n")
    assert header == f"local {', '.join(fields)} = unpack(ARGV, 1, {len(fields)})"
    # Past the header, ARGV is read only after the named arguments, from ``rest`` on.
    assert not re.search(r"ARGV\[\s*\d", body), body
    for field in fields:
        assert re.search(rf"\b{field}\b", body), f"{args.__name__}.{field} is never read"
