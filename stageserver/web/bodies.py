"""A request body, strictly: bytes in, a JSON object out, or a 400 that says what is wrong.

``json_object(raw)`` refuses, with ``InvalidRequest(field="body")`` and the message
"request body ...", a body that

- is empty;
- is not UTF-8: ``is not UTF-8 (byte 0xff at offset 3)``; UTF-16 and UTF-32, which
  ``json.loads`` would guess and accept, are named (RFC 8259: JSON between systems is
  UTF-8). A leading UTF-8 byte order mark is ignored, as RFC 8259 allows;
- nests deeper than ``MAX_DEPTH`` levels: counted on the text, without recursion and
  before parsing, so a body of 100,000 ``[`` costs one scan, never a RecursionError;
- is not valid JSON: ``is not valid JSON: Expecting value at line 1 column 9``;
- has a number too long to parse (Python's integer digit limit), or so large it would
  become infinity;
- contains ``NaN``, ``Infinity`` or ``-Infinity``, which ``json.loads`` accepts and
  JSON does not;
- has a key twice in one object (``json.loads`` would keep the last one silently);
- has a lone surrogate escape (``"\\ud800"``), which is no Unicode character and cannot
  be sent upstream;
- is valid JSON but not an object: ``must be a JSON object, not an array``.

The checks cost one regex pass over the text for the depth, and hooks in the C parser;
the surrogate check runs only when the text has a surrogate escape at all.

``digest(body)`` is what such an object is known by beside its request's
``Idempotency-Key``: the SHA-256, in hex, of the object as canonical JSON (keys sorted,
no whitespace, no escapes but JSON's own). A retry that spells the same object another
way (its keys in another order, other whitespace, ``\u00e9`` for ``é``) has the same
digest; one that changes a value does not.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any, NoReturn

from ..errors import InvalidRequest

MAX_DEPTH = 64

# A JSON string, or an unterminated one to the end of the text: a match that cannot fail
# once begun, so the scan stays linear (a pattern that must find the closing quote would
# retry from every quote of a body of '"\\' repeated: quadratic).
_STRING = re.compile(r'"[^"\\]*(?:\\(?:.|\Z)[^"\\]*)*(?:"|\Z)', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_KINDS = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


def json_object(raw: bytes) -> dict[str, Any]:
    """``raw`` as a JSON object; raises InvalidRequest naming what is wrong with it."""
    if not raw.strip(b" \t\r\n"):  # JSON's whitespace
        _refuse("is empty: send a JSON object")
    text = _text(raw)
    if _deeper_than(text, MAX_DEPTH):
        _refuse(f"nests deeper than {MAX_DEPTH} levels")
    try:
        value = json.loads(
            text,
            object_pairs_hook=_object,
            parse_int=_int,
            parse_float=_float,
            parse_constant=_constant,
        )
    except json.JSONDecodeError as exc:
        what = exc.msg.removesuffix(" at")  # "Unterminated string starting at"
        _refuse(f"is not valid JSON: {what} at line {exc.lineno} column {exc.colno}")
    if _SURROGATE_ESCAPE.search(text):
        _check_surrogates(value)
    if not isinstance(value, dict):
        _refuse(f"must be a JSON object, not {_KINDS.get(type(value), 'that')}")
    return value


def digest(body: dict[str, Any]) -> str:
    """The digest of a body ``json_object`` gave (see the module docstring)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _refuse(problem: str) -> NoReturn:
    raise InvalidRequest(f"request body {problem}", field="body")


def _text(raw: bytes) -> str:
    encoding = json.detect_encoding(raw)
    if encoding not in ("utf-8", "utf-8-sig"):
        _refuse(f"is not UTF-8 (it looks like {encoding.upper()})")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        _refuse(f"is not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})")


def _deeper_than(text: str, limit: int) -> bool:
    """Whether the brackets outside strings nest deeper than ``limit``. A body that is
    not JSON may be judged either way; the parser then says what is wrong with it."""
    if text.count("[") + text.count("{") <= limit:
        return False  # those in strings included: the common case, without the scan
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    if brackets.count("[") + brackets.count("{") <= limit:
        return False
    depth = 0
    for bracket in brackets:
        if bracket in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                _refuse(f"has the key {_short(key)} twice")
            seen.add(key)
    return result


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:  # more digits than sys.get_int_max_str_digits()
        _refuse(f"has a number too long to parse ({len(text.lstrip('-'))} digits)")


def _float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        _refuse(f"has a number too large to parse ({text[:40]})")
    return value


def _constant(name: str) -> NoReturn:
    _refuse("contains NaN or Infinity, which JSON does not allow")


def _check_surrogates(value: Any) -> None:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(exc.object[exc.start])
        _refuse(f"has a lone surrogate (\\u{code:04x}), which is not a Unicode character")


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
