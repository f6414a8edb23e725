"""The launcher's settings, read from the environment as stageserver reads its own."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stageserver.config import apply_defaults, parse_env_value, upstream_configs
from stageserver.settings import PROCESS_SETTINGS


class LaunchError(Exception):
    """Start-up cannot go on; the message tells the user what is wrong and what to do."""


@dataclass(frozen=True)
class Settings:
    bind_host: str
    bind_port: int
    model_port: int
    model_path: str
    context: int
    threads: int
    graceful_timeout: float
    upstream: str | None  # "name at url" of the configured default upstream, if any


def read_settings(environ: Mapping[str, str]) -> Settings:
    config: dict[str, Any] = {}
    apply_defaults(config, environ)  # rejects unknown STAGESERVER_* keys

    def process_setting(key: str) -> Any:
        return parse_env_value(environ[key]) if key in environ else PROCESS_SETTINGS[key][0]

    bind = str(process_setting("STAGESERVER_BIND"))
    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or "," in bind or bind.startswith(("unix:", "fd://")):
        raise LaunchError(
            f"STAGESERVER_BIND={bind!r}: the launcher needs one host:port, "
            "e.g. 127.0.0.1:8000 (run gunicorn directly for a unix socket or several binds)"
        )
    numbers = {}
    for key in (
        "STAGESERVER_EMBEDDED_MODEL_PORT",
        "STAGESERVER_EMBEDDED_CONTEXT",
        "STAGESERVER_EMBEDDED_THREADS",
        "STAGESERVER_GRACEFUL_TIMEOUT",
    ):
        value = process_setting(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise LaunchError(f"{key}={value!r} must be a whole number, 0 or more")
        numbers[key] = value
    upstreams = upstream_configs(config)
    return Settings(
        bind_host=host,
        bind_port=int(port),
        model_port=numbers["STAGESERVER_EMBEDDED_MODEL_PORT"],
        model_path=str(process_setting("STAGESERVER_EMBEDDED_MODEL_PATH") or ""),
        context=numbers["STAGESERVER_EMBEDDED_CONTEXT"],
        threads=numbers["STAGESERVER_EMBEDDED_THREADS"] or default_threads(),
        graceful_timeout=float(numbers["STAGESERVER_GRACEFUL_TIMEOUT"]),
        upstream=f"{upstreams[0].name!r} at {upstreams[0].url}" if upstreams else None,
    )


def default_threads() -> int:
    """One core is left to stageserver and its clients: llama.cpp's threads wait for each
    other at every layer, so one of them descheduled stalls them all (on 2 cores, 2 threads
    streamed anywhere from 24 to 72 tokens/s next to other work, 1 thread a steady 44)."""
    return max(1, (os.cpu_count() or 1) - 1)
