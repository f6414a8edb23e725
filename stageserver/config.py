"""Configuration: how ``STAGESERVER_*`` keys are read, and how upstreams are declared.

There is one mechanism. Keys live in ``app.config``; a key the application did not set is
taken from the environment variable of the same name, else from the table in
``settings.py``. Environment values are parsed as JSON when they parse (``15`` is an int,
``true`` a bool), else kept as strings, the way Flask's ``from_prefixed_env`` does it.
``StageSettings`` is the typed snapshot the server reads once, at ``init_app``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError
from .settings import PROCESS_SETTINGS, SETTINGS

__all__ = [
    "EXTRA_FIELDS",
    "PROCESS_SETTINGS",
    "SETTINGS",
    "UPSTREAM_FIELDS",
    "UPSTREAM_KINDS",
    "ConfigError",
    "FollowSettings",
    "StageSettings",
    "UpstreamConfig",
    "apply_defaults",
    "parse_env_value",
    "upstream_configs",
]

UPSTREAM_KINDS = ("openai", "ollama", "llamacpp", "vllm")
#: The fields beyond OpenAI's API that an upstream of each kind takes, unless its
#: ``extra_fields`` says otherwise: its own sampling and structured-output fields, which
#: clients send with ``extra_body``. A name ending in ``*`` stands for every name it begins.
EXTRA_FIELDS: dict[str, tuple[str, ...]] = {
    "openai": (),
    "vllm": (
        "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos",
        "chat_template_kwargs", "structured_outputs", "guided_*",
    ),
    "llamacpp": (
        "top_k", "min_p", "repeat_penalty", "typical_p", "n_probs", "grammar", "json_schema",
        "chat_template_kwargs",
    ),
    "ollama": ("options",),
}  # fmt: skip
#: How an upstream continues a partial answer (``upstream/continuation.py``).
CONTINUATION_MODES = ("auto", "flag", "trailing", "prefix", "raw", "none")


def json_setting(key: str, value: Any) -> Any:
    """A setting that holds JSON: given as text (the environment), parsed; given as a
    value (``app.config``), as it is."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError as exc:
        raise ConfigError(f"{key} is not valid JSON: {exc}") from None


def parse_env_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def apply_defaults(config: MutableMapping[str, Any], environ: Mapping[str, str]) -> None:
    """Fill every key the app did not set, from the environment first, then the defaults."""
    known = SETTINGS.keys() | PROCESS_SETTINGS.keys()
    unknown = sorted(k for k in environ if k.startswith("STAGESERVER_") and k not in known)
    if unknown:
        raise ConfigError(
            f"unknown setting {', '.join(unknown)} in the environment; "
            f"known settings: {', '.join(sorted(known))}"
        )
    for key, (default, _) in SETTINGS.items():
        if key not in config:
            config[key] = parse_env_value(environ[key]) if key in environ else default


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    #: The first replica's URL: where the upstream is named by one URL (base_url, logs).
    url: str
    kind: str
    api_key: str
    connect_timeout: float
    first_token_timeout: float
    idle_timeout: float
    max_connections: int
    transport: str = "httptools"
    #: The replicas of this upstream, ``url`` first; a pool of one when it has one URL.
    urls: tuple[str, ...] = ()
    #: Model names that select this upstream when a request names no upstream.
    models: tuple[str, ...] = ()
    #: Attempts after the first, before the first chunk, for a stage routed here.
    retries: int = 2
    #: Upstreams tried in order once this one's replicas are exhausted.
    fallbacks: tuple[str, ...] = ()
    #: Stages per replica per worker at most; None: no limit.
    max_in_flight: int | None = None
    #: Seconds one attempt may take to its first chunk; 0: ``first_token_timeout``.
    attempt_timeout: float = 0.0
    #: Failures in a row that eject a replica for a cool-down.
    eject_after: int = 3
    #: How it continues a partial answer: one of ``CONTINUATION_MODES``.
    continuation: str = "auto"
    #: For ``raw``: a GGUF or Jinja file with the model's chat template; "": the upstream's.
    chat_template: str = ""
    #: The fields beyond OpenAI's API it takes (``EXTRA_FIELDS``: its kind's, by default).
    extra_fields: tuple[str, ...] = ()

    def takes_extra(self, name: str) -> bool:
        """Whether a request may send it the field ``name``, which OpenAI's API lacks."""
        return any(
            name == field or (field.endswith("*") and name.startswith(field[:-1]))
            for field in self.extra_fields
        )

    def model_for(self, requested: str) -> str:
        """The model name to send here for a request that names ``requested``: that one
        when this upstream lists it or lists none; else the first it lists (a fallback
        that serves another model under its own name)."""
        if not self.models or requested in self.models:
            return requested
        return self.models[0]

    def __post_init__(self) -> None:
        if not self.urls:
            object.__setattr__(self, "urls", (self.url,))
        if not self.attempt_timeout:
            object.__setattr__(self, "attempt_timeout", self.first_token_timeout)


#: The fields an upstream of ``STAGESERVER_UPSTREAMS`` may set.
UPSTREAM_FIELDS = (
    "url", "urls", "kind", "api_key", "models", "retries", "fallbacks", "max_in_flight",
    "connect_timeout", "first_token_timeout", "attempt_timeout", "idle_timeout", "eject_after",
    "continuation", "chat_template", "extra_fields",
)  # fmt: skip


def upstream_configs(config: Mapping[str, Any]) -> list[UpstreamConfig]:
    """The configured upstreams, the default first. Empty when none is configured."""
    declared = json_setting("STAGESERVER_UPSTREAMS", config["STAGESERVER_UPSTREAMS"])
    if declared is None:
        kind = config["STAGESERVER_UPSTREAM_KIND"]
        if kind not in UPSTREAM_KINDS:  # refused even while no URL uses it: a typo is a typo
            raise ConfigError(
                f"STAGESERVER_UPSTREAM_KIND: {kind!r} must be one of {', '.join(UPSTREAM_KINDS)}"
            )
        if not config["STAGESERVER_UPSTREAM_URL"]:
            return []
        declared = {
            "default": {
                "url": config["STAGESERVER_UPSTREAM_URL"],
                "kind": config["STAGESERVER_UPSTREAM_KIND"],
                "api_key": config["STAGESERVER_UPSTREAM_API_KEY"],
                "continuation": config["STAGESERVER_UPSTREAM_CONTINUATION"],
                "chat_template": config["STAGESERVER_UPSTREAM_CHAT_TEMPLATE"],
            }
        }
    if not isinstance(declared, dict) or not declared:
        raise ConfigError(
            "STAGESERVER_UPSTREAMS must be a JSON object of named upstreams, e.g. "
            '{"local": {"url": "http://127.0.0.1:11434/v1", "kind": "ollama"}}'
        )
    configs = [_upstream_config(name, spec, config) for name, spec in declared.items()]
    _check_fallbacks(configs)
    return configs


def _upstream_config(name: str, spec: Any, config: Mapping[str, Any]) -> UpstreamConfig:
    where = f"upstream {name!r}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected an object with at least a 'url'")
    allowed = set(UPSTREAM_FIELDS)
    extra = set(spec) - allowed
    if extra:
        raise ConfigError(f"{where}: unknown field(s) {sorted(extra)}; allowed: {sorted(allowed)}")
    urls = _urls(where, spec)
    kind = spec.get("kind", "openai")
    if kind not in UPSTREAM_KINDS:
        raise ConfigError(f"{where}: kind {kind!r} must be one of {', '.join(UPSTREAM_KINDS)}")

    def seconds(field: str, default: Any) -> float:
        value = spec.get(field, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{where}: {field} must be a positive number of seconds")
        return float(value)

    transport = config["STAGESERVER_UPSTREAM_TRANSPORT"]
    if transport not in ("httptools", "httpx"):
        raise ConfigError(
            f"STAGESERVER_UPSTREAM_TRANSPORT must be httptools or httpx, not {transport!r}"
        )

    def count(field: str, default: int, least: int) -> int:
        value = spec.get(field, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{where}: {field} must be a whole number from {least} up")
        return value

    first_token = seconds("first_token_timeout", config["STAGESERVER_FIRST_TOKEN_TIMEOUT"])
    attempt = seconds("attempt_timeout", first_token)
    if attempt > first_token:
        raise ConfigError(
            f"{where}: attempt_timeout ({attempt:g} s) must not exceed first_token_timeout "
            f"({first_token:g} s): an attempt never outlasts the stage's first-token budget"
        )
    continuation = spec.get("continuation", "auto")
    if continuation not in CONTINUATION_MODES:
        raise ConfigError(
            f"{where}: continuation {continuation!r} must be one of {', '.join(CONTINUATION_MODES)}"
        )
    chat_template = spec.get("chat_template") or ""
    if not isinstance(chat_template, str):
        raise ConfigError(f"{where}: chat_template must be the path of a GGUF or Jinja file")
    return UpstreamConfig(
        name=name,
        url=urls[0],
        urls=urls,
        kind=kind,
        api_key=str(spec.get("api_key") or ""),
        connect_timeout=seconds("connect_timeout", config["STAGESERVER_CONNECT_TIMEOUT"]),
        first_token_timeout=first_token,
        idle_timeout=seconds("idle_timeout", config["STAGESERVER_IDLE_TIMEOUT"]),
        max_connections=int(config["STAGESERVER_UPSTREAM_MAX_CONNECTIONS"]),
        transport=transport,
        models=_names(where, "models", spec.get("models", []), "model names"),
        retries=count("retries", 2, 0),
        fallbacks=_names(where, "fallbacks", spec.get("fallbacks", []), "upstream names"),
        max_in_flight=None if spec.get("max_in_flight") is None else count("max_in_flight", 1, 1),
        attempt_timeout=attempt,
        eject_after=count("eject_after", 3, 1),
        continuation=continuation,
        chat_template=chat_template,
        extra_fields=_names(
            where, "extra_fields", spec.get("extra_fields", list(EXTRA_FIELDS[kind])), "field names"
        ),
    )


def _urls(where: str, spec: dict[str, Any]) -> tuple[str, ...]:
    """``url`` (a pool of one) or ``urls`` (its replicas), each an absolute http(s) URL."""
    if "url" in spec and "urls" in spec:
        raise ConfigError(f"{where}: give url (one replica) or urls (several), not both")
    if "urls" in spec:
        given = spec["urls"]
        if not isinstance(given, list) or not given:
            raise ConfigError(f"{where}: urls must be a non-empty list of URLs")
        label = "urls: entry"
    else:
        given, label = [spec.get("url")], "url"
    urls: list[str] = []
    for raw in given:
        url = raw.rstrip("/") if isinstance(raw, str) else str(raw or "")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{where}: {label} {url!r} must be an absolute http(s) URL")
        if url in urls:
            raise ConfigError(f"{where}: urls lists {url!r} twice")
        urls.append(url)
    return tuple(urls)


def _names(where: str, field: str, value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: {field} must be a list of {what} (non-empty strings)")
    if len(set(value)) != len(value):
        raise ConfigError(f"{where}: {field} lists a name twice: {value}")
    return tuple(value)


def _check_fallbacks(configs: list[UpstreamConfig]) -> None:
    """Every fallback is a configured upstream, and following fallbacks never leads back
    to where it started (a route is the upstream, then its fallbacks' routes, in order)."""
    by_name = {c.name: c for c in configs}
    for cfg in configs:
        for fallback in cfg.fallbacks:
            if fallback not in by_name:
                raise ConfigError(
                    f"upstream {cfg.name!r}: fallbacks: unknown upstream {fallback!r}; "
                    f"configured: {', '.join(by_name)}"
                )

    def visit(name: str, path: tuple[str, ...]) -> None:
        for fallback in by_name[name].fallbacks:
            if fallback in path:
                cycle = " -> ".join((*path[path.index(fallback) :], fallback))
                raise ConfigError(
                    f"upstream {path[0]!r}: fallbacks: a cycle, {cycle}; a fallback may not "
                    "lead back to an upstream before it"
                )
            visit(fallback, (*path, fallback))

    for cfg in configs:
        visit(cfg.name, (cfg.name,))


@dataclass(frozen=True)
class FollowSettings:
    """How a response follows its stage (``stream.follow``)."""

    heartbeat_seconds: float
    retry_ms: int
    send_timeout_seconds: float


@dataclass(frozen=True)
class StageSettings:
    """The settings a request reads, taken from ``app.config`` once, at ``init_app``."""

    follow: FollowSettings
    default_max_tokens: int
    max_tokens_limit: int
    max_prompt_chars: int
    max_body_bytes: int
    stage_ttl_seconds: float
    event_ttl_seconds: float
    max_events: int
    max_event_bytes: int
    resumable_default: bool
    resume_grace_seconds: float
    background_max_seconds: float
    max_active_streams: int
    ready_timeout: float
    store_url: str | None
    owner_lease_seconds: float
    store_flush_window: float
    store_max_connections: int
    cors_origins: frozenset[str]
    max_continuations: int = 2

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> StageSettings:
        def number(key: str) -> float:
            return float(config[f"STAGESERVER_{key}"])

        store_url = config["STAGESERVER_STORE_URL"]
        return cls(
            follow=FollowSettings(
                heartbeat_seconds=number("HEARTBEAT_SECONDS"),
                retry_ms=int(number("SSE_RETRY_MS")),
                send_timeout_seconds=number("SEND_TIMEOUT_SECONDS"),
            ),
            default_max_tokens=int(number("DEFAULT_MAX_TOKENS")),
            max_tokens_limit=int(number("MAX_TOKENS_LIMIT")),
            max_prompt_chars=int(number("MAX_PROMPT_CHARS")),
            max_body_bytes=int(number("MAX_BODY_BYTES")),
            stage_ttl_seconds=number("STAGE_TTL_SECONDS"),
            # Events outlive no stage: not longer than its status.
            event_ttl_seconds=min(number("EVENT_TTL_SECONDS"), number("STAGE_TTL_SECONDS")),
            max_events=int(number("EVENT_LOG_MAX_EVENTS")),
            max_event_bytes=int(number("EVENT_LOG_MAX_BYTES")),
            resumable_default=bool(config["STAGESERVER_RESUMABLE_DEFAULT"]),
            resume_grace_seconds=number("RESUME_GRACE_SECONDS"),
            background_max_seconds=number("BACKGROUND_MAX_SECONDS"),
            max_active_streams=int(number("MAX_ACTIVE_STREAMS")),
            ready_timeout=number("READY_TIMEOUT"),
            store_url=str(store_url) if store_url else None,
            owner_lease_seconds=number("OWNER_LEASE_SECONDS"),
            store_flush_window=_flush_window(number("STORE_FLUSH_WINDOW_SECONDS")),
            store_max_connections=_max_connections(config["STAGESERVER_STORE_MAX_CONNECTIONS"]),
            cors_origins=_origins(config["STAGESERVER_CORS_ORIGINS"]),
            max_continuations=int(number("MAX_CONTINUATIONS")),
        )


def _origins(setting: Any) -> frozenset[str]:
    setting = json_setting("STAGESERVER_CORS_ORIGINS", setting)
    if setting is None:
        return frozenset()
    if not isinstance(setting, list):
        raise ConfigError(
            "STAGESERVER_CORS_ORIGINS must be a JSON list of origins, e.g. "
            '["https://app.example.com"]'
        )
    for origin in setting:
        parts = urlsplit(origin) if isinstance(origin, str) else None
        if (
            parts is None
            or parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.path
            or parts.query
            or origin.endswith("/")
        ):
            raise ConfigError(
                f"STAGESERVER_CORS_ORIGINS: {origin!r} is not an origin: "
                "scheme://host[:port], no path"
            )
    return frozenset(setting)


def _max_connections(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"STAGESERVER_STORE_MAX_CONNECTIONS must be a whole number from 1 up, not {value!r}"
        )
    return value


def _flush_window(seconds: float) -> float:
    if not 0 <= seconds <= 1:
        raise ConfigError(
            f"STAGESERVER_STORE_FLUSH_WINDOW_SECONDS must be from 0 to 1 second, not {seconds:g}"
        )
    return seconds
