"""A small but real OpenAI-compatible upstream with fault modes, for tests and benchmarks.

In-process::

    with FakeUpstream(defaults={"interval": "0.02"}) as fake:
        ...  # fake.url, fake.requests, fake.wait_for(...)

As a process: ``python -m testing.fake_upstream --port 8001 [--default key=value ...]``
prints ``READY <url>`` when listening and exits on SIGTERM/SIGINT.

The parts: ``http.py`` is the HTTP/1.1 server (``connection.py`` one client connection),
``openai.py`` the handler that answers as an OpenAI upstream, ``probes.py`` the endpoints
that show a rendered prompt as llama-server, vLLM and Ollama do, ``chatml.py`` the chat
template they render, ``options.py`` the options a request chooses through its model name
(``"fake?mode=drop&after=3"``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Mapping, Sequence

from .connection import UpstreamRequest
from .http import HttpServer
from .openai import respond
from .options import resolve_options

__all__ = ["FakeUpstream", "UpstreamRequest", "main"]


class FakeUpstream(HttpServer):
    """The fake OpenAI-compatible upstream; ``defaults`` are options every request gets
    unless its model name says otherwise."""

    def __init__(
        self,
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        defaults: Mapping[str, str | int | float] | None = None,
    ) -> None:
        super().__init__(respond, port, host=host, defaults=defaults)

    @property
    def url(self) -> str:
        """The OpenAI base URL."""
        return f"{self.base}/v1"


def _raise_nofile_limit() -> None:
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fake OpenAI-compatible upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--default",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="server-wide default option (repeatable), e.g. --default interval=0.05",
    )
    args = parser.parse_args(argv)
    defaults: dict[str, str | int | float] = {}
    for item in args.default:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--default expects KEY=VALUE, got {item!r}")
        defaults[key] = value
    try:
        resolve_options(defaults, "")
    except ValueError as exc:
        parser.error(str(exc))
    _raise_nofile_limit()
    fake = FakeUpstream(args.port, host=args.host, defaults=defaults)

    def ready() -> None:
        print(f"READY {fake.url}", flush=True)

    asyncio.run(fake.serve(ready, handle_signals=True))
    return 0
