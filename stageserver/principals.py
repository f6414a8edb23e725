"""Who may call: principals, their API keys and their limits (``STAGESERVER_API_KEYS``).

The setting holds a JSON object, or ``@/path/to/keys.json`` to read one from a file (so
secrets stay out of the process list), naming one principal per entry::

    {"alice": {"key_sha256": "<hex sha256 of the secret>", "max_streams": 4,
               "requests_per_minute": 60, "tokens_per_minute": 20000, "upstreams": ["local"]},
     "ci":    {"key": "<secret, for development>"}}

``key_sha256`` is the form for production; a plain ``key`` is accepted for development.
Every limit is optional, and ``upstreams``, when given, lists the upstreams the principal
may use. A malformed entry stops start-up with a message naming it, never its secret.

A caller presents ``Authorization: Bearer <secret>``. The secret's SHA-256 is compared
with every principal's, each with ``hmac.compare_digest``, so the time taken says nothing
about which principal, if any, matched.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import json_setting
from .errors import ConfigError

# Principal names go into stage keys, Redis keys and metric labels.
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_LIMIT_FIELDS = ("max_streams", "requests_per_minute", "tokens_per_minute")
_FIELDS = {"key", "key_sha256", "upstreams", *_LIMIT_FIELDS}
_RESERVED = frozenset({"anonymous", "other"})


@dataclass(frozen=True)
class Limits:
    max_streams: int | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    def __bool__(self) -> bool:
        return any(
            v is not None
            for v in (self.max_streams, self.requests_per_minute, self.tokens_per_minute)
        )


@dataclass(frozen=True)
class Principal:
    """Who a request comes from. ``namespace`` prefixes the principal's stage ids
    everywhere (``alice/summary``), so two principals' ids never meet."""

    name: str
    limits: Limits = Limits()
    upstreams: frozenset[str] | None = None  # None: any
    #: The label under which /metrics counts it: its name, bounded by the configuration.
    metrics_label: str = "anonymous"

    @property
    def namespace(self) -> str:
        return "" if self is ANONYMOUS else f"{self.name}/"


#: Every caller when the server is open (no keys, no ``identify``).
ANONYMOUS = Principal("anonymous")


@dataclass(frozen=True)
class _Entry:
    principal: Principal
    key_sha256: bytes | None  # None: a principal that only ``identify`` can name


class KeyRing:
    """The configured principals, and which one a bearer secret names."""

    def __init__(self, entries: Mapping[str, _Entry]) -> None:
        self._entries = dict(entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def principals(self) -> list[Principal]:
        """Every configured principal."""
        return [entry.principal for entry in self._entries.values()]

    def by_secret(self, secret: str) -> Principal | None:
        digest = hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()
        found: Principal | None = None
        for entry in self._entries.values():  # every one, matched or not
            if entry.key_sha256 is not None and hmac.compare_digest(digest, entry.key_sha256):
                found = entry.principal
        return found

    def by_name(self, name: str) -> Principal:
        """The principal ``identify`` named: its entry's limits where it has one, else
        none, counted in /metrics as ``other``."""
        entry = self._entries.get(name)
        if entry is not None:
            return entry.principal
        return Principal(name, metrics_label="other")


def check_name(name: object, where: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"{where}: principal name {name!r} must be 1 to 64 characters of A-Z a-z 0-9 . _ -"
        )
    if name in _RESERVED:
        raise ConfigError(f"{where}: {name!r} is reserved (a /metrics label); choose another")
    return name


def key_ring(setting: object, *, identify: bool = False) -> KeyRing:
    """Parse ``STAGESERVER_API_KEYS`` (a dict, JSON text, or ``@path``). ``identify``: the
    host app names principals itself, so an entry without a key is allowed."""
    declared = _load(setting)
    if declared is None:
        return KeyRing({})
    if not isinstance(declared, dict):
        raise ConfigError(
            'STAGESERVER_API_KEYS must be a JSON object of principals, e.g. {"alice": '
            '{"key_sha256": "<hex sha256 of the secret>"}}'
        )
    entries: dict[str, _Entry] = {}
    seen: dict[bytes, str] = {}
    for name, spec in declared.items():
        entry = _entry(check_name(name, "STAGESERVER_API_KEYS"), spec, identify)
        if entry.key_sha256 is not None:
            if entry.key_sha256 in seen:
                raise ConfigError(
                    f"STAGESERVER_API_KEYS: principals {seen[entry.key_sha256]!r} and {name!r} "
                    "have the same key"
                )
            seen[entry.key_sha256] = name
        entries[name] = entry
    return KeyRing(entries)


def _load(setting: object) -> Any:
    if isinstance(setting, str):
        setting = setting.strip()
        if not setting:
            return None
        if setting.startswith("@"):
            path = Path(setting[1:])
            try:
                setting = path.read_text()
            except OSError as exc:
                raise ConfigError(f"STAGESERVER_API_KEYS: cannot read {path}: {exc}") from None
    return json_setting("STAGESERVER_API_KEYS", setting)


def _entry(name: str, spec: object, identify: bool) -> _Entry:
    where = f"STAGESERVER_API_KEYS: principal {name!r}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected an object with a 'key_sha256' (or a 'key')")
    unknown = set(spec) - _FIELDS
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(_FIELDS)}"
        )
    if "key" in spec and "key_sha256" in spec:
        raise ConfigError(f"{where}: give 'key_sha256' or 'key', not both")
    digest: bytes | None = None
    if "key_sha256" in spec:
        hexdigest = spec["key_sha256"]
        if not isinstance(hexdigest, str) or not _SHA256_HEX.match(hexdigest.lower()):
            raise ConfigError(f"{where}: key_sha256 must be 64 hexadecimal digits")
        digest = bytes.fromhex(hexdigest)
    elif "key" in spec:
        key = spec["key"]
        if not isinstance(key, str) or len(key) < 8 or key != key.strip():
            raise ConfigError(f"{where}: key must be a string of at least 8 characters")
        digest = hashlib.sha256(key.encode()).digest()
    elif not identify:
        raise ConfigError(f"{where}: needs a 'key_sha256' (or a 'key')")
    limits = {}
    for field in _LIMIT_FIELDS:
        value = spec.get(field)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ConfigError(f"{where}: {field} must be a whole number of at least 1")
        limits[field] = value
    upstreams = spec.get("upstreams")
    if upstreams is not None and (
        not isinstance(upstreams, list) or not all(isinstance(u, str) for u in upstreams)
    ):
        raise ConfigError(f"{where}: upstreams must be a list of upstream names")
    principal = Principal(
        name,
        Limits(**limits),
        None if upstreams is None else frozenset(upstreams),
        metrics_label=name,
    )
    return _Entry(principal, digest)


def check_upstreams(principals: list[Principal], upstreams: list[str]) -> None:
    """Every upstream a principal may use is configured; else a ConfigError naming it."""
    for principal in principals:
        unknown = sorted((principal.upstreams or set()) - set(upstreams))
        if unknown:
            raise ConfigError(
                f"STAGESERVER_API_KEYS: principal {principal.name!r} names unknown "
                f"upstream(s) {unknown}; configured: {', '.join(upstreams)}"
            )
