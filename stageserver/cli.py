"""The ``stageserver`` command.

- ``stageserver serve``: what ``scripts/serve`` runs. stageserver under gunicorn, with the
  embedded model unless an upstream is configured (``launcher/``).
- ``stageserver check``: reads the configuration from the environment as the server
  would, checks it, and prints the effective settings, the upstreams (with how each
  continues an answer cut short: the one question it puts to an upstream, when its
  ``continuation`` is ``auto``) and the principals, without starting anything or
  connecting anywhere else. Exit status 1, with the reason on
  stderr, for a configuration the server would refuse. Secrets are never printed: an API
  key shows as ``(set)``, a URL without its password.

``python -m stageserver`` is the same command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

from .config import (
    StageSettings,
    UpstreamConfig,
    apply_defaults,
    parse_env_value,
    upstream_configs,
)
from .errors import ConfigError
from .principals import check_upstreams, key_ring
from .release import package_version
from .settings import PROCESS_SETTINGS, SETTINGS
from .upstream.clients import UpstreamRegistry
from .upstream.continuation import ContinuationModes

#: Settings whose value is a secret, or holds secrets: shown as ``(set)``.
SECRET_SETTINGS = frozenset({"STAGESERVER_UPSTREAM_API_KEY", "STAGESERVER_API_KEYS"})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stageserver",
        description="Serve streaming LLM chat stages as Server-Sent Events. "
        "Configured through STAGESERVER_* environment variables.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    keys = "\n".join(
        f"  {key} (default {default!r}): {text}"
        for key, (default, text) in PROCESS_SETTINGS.items()
    )
    commands.add_parser(
        "serve",
        help="run stageserver under gunicorn (with the embedded model if no upstream is set)",
        description="Run stageserver under gunicorn. With no upstream configured "
        "(STAGESERVER_UPSTREAM_URL or STAGESERVER_UPSTREAMS), also run an embedded "
        "llama.cpp server with SmolLM2-135M-Instruct (pip install 'stageserver[llm]').",
        epilog=f"process settings:\n{keys}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands.add_parser(
        "check",
        help="check the configuration and print the effective settings; start nothing",
        description="Read the configuration from the environment, check it as the server "
        "would, and print the effective settings. Starts nothing; connects only to the "
        "upstreams whose continuation is auto, to probe them.",
    )
    args = parser.parse_args(argv)
    if args.command == "serve":
        from .launcher import run

        return run(os.environ)
    return check(os.environ, sys.stdout, sys.stderr)


def check(environ: Mapping[str, str], out: TextIO, err: TextIO) -> int:
    """Check the configuration in ``environ``; print the report to ``out``, or the first
    problem to ``err``. 0 when the server would start with it, else 1."""
    try:
        report = _report(environ)
    except ConfigError as exc:
        print(f"stageserver: {exc}", file=err)
        return 1
    out.write(report)
    return 0


def _report(environ: Mapping[str, str]) -> str:
    from .launcher.settings import LaunchError, read_settings

    config: dict[str, Any] = {}
    apply_defaults(config, environ)  # unknown STAGESERVER_* keys are refused here
    settings = StageSettings.from_config(config)
    upstreams = upstream_configs(config)
    principals = key_ring(config["STAGESERVER_API_KEYS"], identify=False).principals()
    check_upstreams(principals, [u.name for u in upstreams])
    try:
        read_settings(environ)
    except LaunchError as exc:
        raise ConfigError(str(exc)) from None
    workers = _process_setting(environ, "STAGESERVER_WORKERS")
    if int(workers) > 1 and not settings.store_url:
        raise ConfigError(
            f"STAGESERVER_WORKERS={workers} needs a shared stage store; set "
            "STAGESERVER_STORE_URL=redis://HOST:6379/0 (or run one worker)"
        )
    store_note = _check_store_url(settings.store_url) if settings.store_url else None

    lines = ["settings (source: app default, or environment):"]
    for key in (*SETTINGS, *PROCESS_SETTINGS):
        value = config[key] if key in SETTINGS else _process_setting(environ, key)
        source = "environment" if key in environ else "default"
        lines.append(f"  {key} = {_shown(key, value)}  [{source}]")
    if store_note:
        lines.append(store_note)
    lines.append("upstreams:" if upstreams else "upstreams: none (serve: the embedded model)")
    for upstream in upstreams:
        urls = ", ".join(_without_password(url) for url in upstream.urls)
        extra = f"; models {list(upstream.models)}" if upstream.models else ""
        extra += f"; fallbacks {list(upstream.fallbacks)}" if upstream.fallbacks else ""
        lines.append(f"  {upstream.name}: {upstream.kind} at {urls}{extra}")
    for name, mode in _continuation_modes(upstreams, settings.ready_timeout).items():
        detail = f": {mode['detail']}" if mode["detail"] else ""
        lines.append(
            f"  {name} continues answers in mode {mode['mode']} ({mode['source']}{detail})"
        )
    if principals:
        lines.append("principals:")
        for principal in principals:
            allowed = sorted(principal.upstreams) if principal.upstreams is not None else "any"
            lines.append(
                f"  {principal.name}: upstreams {allowed}; limits {_limits(principal.limits)}"
            )
    else:
        lines.append("principals: none (no API keys: the server is open to whoever reaches it)")
    return "\n".join(lines) + "\n"


def _process_setting(environ: Mapping[str, str], key: str) -> Any:
    return parse_env_value(environ[key]) if key in environ else PROCESS_SETTINGS[key][0]


def _shown(key: str, value: Any) -> str:
    if value is None or value == "":
        return "unset"
    if key in SECRET_SETTINGS:
        return "(set)"
    if isinstance(value, str) and "://" in value:
        return _without_password(value)
    return json.dumps(value) if not isinstance(value, str) else value


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))


def _limits(limits: Any) -> str:
    shown = {k: v for k, v in vars(limits).items() if v is not None}
    return json.dumps(shown) if shown else "none"


def _continuation_modes(
    upstreams: list[UpstreamConfig], timeout: float
) -> dict[str, dict[str, str]]:
    """Each upstream's continuation mode: given, defaulted by its kind, or probed (the
    one thing ``check`` asks of an upstream: whether it continues a partial answer)."""
    return ContinuationModes(UpstreamRegistry(upstreams), timeout).report()


def _check_store_url(url: str) -> str | None:
    """A note when the store cannot be reached now; raises ConfigError."""
    try:
        from .store.connection import STORE_ERRORS, connect, refuse_a_cluster_node
    except ImportError:
        raise ConfigError(
            "STAGESERVER_STORE_URL needs the redis package: pip install 'stageserver[redis]'"
        ) from None
    try:
        # Parses the URL; a cluster's client asks for the slot map at once. A Redis that
        # cannot be reached now is no configuration error: the server waits for it.
        refuse_a_cluster_node(connect(url), url)
    except STORE_ERRORS as exc:
        return f"note: the stage store cannot be reached now ({exc})"
    return None
