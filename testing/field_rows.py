"""What a row of a dialect's field table (``stageserver/fields.py``) is expected to do,
checked by ``tests/test_openai_fields.py`` and ``tests/test_anthropic_fields.py`` on
the wire, in what the fake upstream was sent, and the docs' table of those rows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stageserver.fields import FieldRule, markdown_table


@dataclass(frozen=True)
class Sent:
    """Passed: the upstream got ``fields`` (its names, Chat Completions')."""

    fields: dict[str, Any]


@dataclass(frozen=True)
class Dropped:
    """Taken, and not sent on."""


@dataclass(frozen=True)
class Refused:
    """A 400 that names the field, and no upstream request. OpenAI's errors carry a
    ``code`` and a ``param`` (the field's own name when empty); Anthropic's carry neither,
    and their message starts as ``says``."""

    code: str = ""
    param: str = ""
    says: str = ""


@dataclass(frozen=True)
class Check:
    """Built: ``check(answer, upstream body)`` holds."""

    check: Callable[[Any, dict[str, Any]], bool]


Expect = Sent | Dropped | Refused | Check


def assert_docs_table_has_a_row_per_field(rules: tuple[FieldRule, ...]) -> None:
    """The docs' table of ``rules``: a row for each, in order, with its treatment."""
    table = markdown_table(rules).splitlines()
    assert len(table) == 2 + len(rules)
    for rule, row in zip(rules, table[2:], strict=True):
        assert row.startswith(f"| `{rule.name}` | {rule.treatment.value}")
