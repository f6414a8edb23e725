"""What stageserver does with each field of a dialect's request: the tables' machinery.

Each API dialect (``openai_api/fields.py``, ``anthropic_api/fields.py``) lists every field
of its requests as a ``FieldRule``: the field is

- **built**: what the stage is: its conversation, its token limit, its mode;
- **passed**: sent to the upstream;
- **ignored**: taken, and it changes nothing here;
- **refused**: it asks for what does not run here.

A rule may refuse some values of a field it otherwise takes (``refuse``). The two
dialects are siblings that import nothing of each other; what their tables are made of,
how a body is checked against one (``check_values``), and how the docs show one
(``markdown_table``) live here, once. So do the pydantic pieces their strict request
models share (``Strict``, ``Number``, ``Ignored``). What a refusal says, and how it names
a field's path, is each dialect's own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from .errors import InvalidRequest


class Treatment(StrEnum):
    BUILT = "built"
    PASSED = "passed"
    IGNORED = "ignored"
    REFUSED = "refused"


#: A value refused: the InvalidRequest that says why, given the field's name and value;
#: None for a value that is taken.
Refuse = Callable[[str, Any], InvalidRequest | None]


@dataclass(frozen=True)
class FieldRule:
    name: str
    treatment: Treatment
    #: What stageserver does with it, in a few words (the docs' table).
    says: str
    #: Which of its values are refused; None: none is (null is always taken).
    refuse: Refuse | None = None


#: The rows that say the same in every dialect's tables.
MODEL = FieldRule(
    "model",
    Treatment.BUILT,
    "picks the upstream (its `models`), and is sent as the upstream names it",
)
SAMPLING = (
    FieldRule("temperature", Treatment.PASSED, "sampling"),
    FieldRule("top_p", Treatment.PASSED, "sampling"),
)
#: What a field that asks for a prompt cache's work says.
NO_CACHE = "there is no prompt cache to control here"


def by_name(*tables: tuple[FieldRule, ...]) -> dict[str, FieldRule]:
    """The rules of ``tables``, by field name: what ``check_values`` looks them up in."""
    return {rule.name: rule for table in tables for rule in table}


def check_values(body: Mapping[str, Any], rules: Mapping[str, FieldRule]) -> None:
    """Refuse the first field whose value its rule refuses (with its InvalidRequest)."""
    for name, value in body.items():
        rule = rules.get(name)
        if rule is not None and rule.refuse is not None and value is not None:
            refusal = rule.refuse(name, value)
            if refusal is not None:
                raise refusal


def markdown_table(rules: tuple[FieldRule, ...]) -> str:
    """The docs' table of ``rules``: field, what is done with it, and how."""
    rows = ["| field | | what stageserver does |", "| --- | --- | --- |"]
    for rule in rules:
        shown = rule.treatment.value
        if rule.refuse is not None and rule.treatment is not Treatment.REFUSED:
            shown += ", some values refused"
        says = rule.says.replace("|", "\\|")
        rows.append(f"| `{rule.name}` | {shown} | {says} |")
    return "\n".join(rows)


def refused_unless(taken: Callable[[Any], bool], why: str, code: str) -> Refuse:
    """A value that ``taken`` does not hold is refused with ``why``, after the field's
    name, and ``code``."""

    def refuse(name: str, value: Any) -> InvalidRequest | None:
        if taken(value):
            return None
        return InvalidRequest(f"{name}: {why}", field=name, code=code)

    return refuse


def unsupported(why: str, *, empty_taken: bool = False) -> Refuse:
    """Any value but null is refused, with ``why``: a field that asks for what does not
    run here. With ``empty_taken``, ``[]`` and ``{}`` are taken too, as null (OpenAI's
    SDK sends them for none)."""
    if empty_taken:
        return refused_unless(lambda value: value in ([], {}), why, "unsupported_parameter")
    return refused_unless(lambda value: False, why, "unsupported_parameter")


# -- what the dialects' strict request models share -------------------------------------


# A nested object of a request: a field it does not name is refused, as the APIs
# stageserver speaks refuse it. (A comment, not a docstring: pydantic would show a
# docstring in the OpenAPI document.)
class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Number = StrictFloat | StrictInt

#: A field that is taken and changes nothing here: never sent on (``model_dump`` leaves
#: it out).
Ignored = Annotated[Any, Field(default=None, exclude=True)]
