"""A request's validation error in Anthropic's words: the path of the first bad field as
the request spells it (``messages.0.content.1.type``), then what is wrong in pydantic's
words, as Anthropic's own errors say it (``Field required``, ``Extra inputs are not
permitted``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from ..errors import InvalidRequest


def refusal(exc: ValidationError, body: Mapping[str, Any]) -> InvalidRequest:
    """The InvalidRequest (400) for ``exc``, raised validating ``body``."""
    # A union reports once per alternative (a string, or a list of blocks); the error that
    # reaches deepest into the body is the one about what the caller meant, and what was
    # sent says more than what was not.
    found = [
        (path_of(list(err["loc"]), body, missing=err["type"] == "missing"), err)
        for err in exc.errors(include_url=False, include_input=False)
    ]
    (_, path), err = max(found, key=lambda pair: (pair[0][0], pair[1]["type"] != "missing"))
    kind = err["type"]
    if kind == "union_tag_invalid":
        path += ".type"
        expected = err.get("ctx", {}).get("expected_tags", "")
        message = f"is not a type this server takes (it takes {expected})"
        code = "unsupported_value"
    elif kind == "extra_forbidden":
        message, code = err["msg"], "unsupported_parameter"
    else:
        message, code = err["msg"], "invalid_value"
    return InvalidRequest(f"{path}: {message}", field=path, code=code)


def path_of(loc: list[int | str], body: Any, *, missing: bool = False) -> tuple[int, str]:
    """A validation error's location as Anthropic names a field (``messages.0.content``),
    and how many of its steps are the body's.

    pydantic puts its own names in a location (a union's alternative, a tagged union's
    tag), and a tag may be a key of the body too (a text block's tag is ``text``, and so
    is its field): only keys and indexes found in the body are the caller's, and of the
    ways to read the location so, the one with the most steps, then the one that ends at
    the location's end (the field the error is about). A missing field is found nowhere,
    and is the location's last name."""
    steps, _ = _walk(loc, 0, body, missing)
    return len(steps), ".".join(steps) or "body"


_ABSENT = object()


def _walk(loc: list[int | str], at: int, value: Any, missing: bool) -> tuple[list[str], bool]:
    """The best reading of ``loc[at:]`` in ``value``: its steps, and whether its last step
    is the location's last part."""
    if at == len(loc):
        return [], False
    part = loc[at]
    last = at == len(loc) - 1
    best = _walk(loc, at + 1, value, missing)  # the part skipped
    child: Any = _ABSENT
    if isinstance(part, int) and isinstance(value, list) and 0 <= part < len(value):
        child = value[part]
    elif isinstance(part, str) and isinstance(value, dict) and part in value:
        child = value[part]
    elif missing and last and isinstance(part, str):
        return [part], True
    if child is not _ABSENT:
        rest, ends = _walk(loc, at + 1, child, missing)
        taken = ([str(part), *rest], ends or last)
        if (len(taken[0]), taken[1]) >= (len(best[0]), best[1]):
            best = taken
    return best
