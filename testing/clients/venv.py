"""The clients' venv: the newest release of each client library, from PyPI, in a venv of
their own outside the checkout, made again or brought up to date each time it is asked
for. The test's own venv pins the server's ``openai``; this one has whatever ``openai``
the newest clients take, as a user who installs them today gets.

It lives in ``~/.cache/stageserver/`` (``$XDG_CACHE_HOME``), one per Python version, so
a run after the first only asks PyPI whether anything is newer: pip reaches PyPI for
each package's index page and downloads only what changed (about 15 s on 2 cores). The
first run downloads and unpacks about 500 MB (litellm alone is 200 MB): 1.5 to 3.5
minutes, with the network's speed. A venv left half-made by a run that was interrupted
is made again from scratch. When pip fails (PyPI unreachable, a release that does not
install), the tests that need the venv fail with pip's output: they never skip.

Two test runs on one machine (two worktrees) share the venv: the one that brings it up
to date holds it alone, then shares it with readers until its tests end; a run that
finds it in use takes it as it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from testing.venvs import Venv, cached_venv

__all__ = ["CLIENTS", "clients_venv"]

#: What a user installs to use each client with OpenAI's API: the Agents SDK,
#: pydantic-ai with its OpenAI models, LangChain's ChatOpenAI, and LiteLLM.
CLIENTS = ("openai-agents", "pydantic-ai-slim[openai]", "langchain-openai", "litellm")
#: Brought to their newest release at every run with the clients: what makes the
#: requests the server reads (every client but LiteLLM's own HTTP code sends through
#: ``openai``; LangChain's messages are ``langchain-core``'s). The other dependencies
#: (httpx, pydantic, aiohttp, ...) are upgraded only when a client needs a newer one:
#: an eager upgrade reads the index page of each of about 150 packages, 45 s of CPU.
UPGRADED = (*CLIENTS, "openai", "langchain-core")


@contextmanager
def clients_venv() -> Iterator[Venv]:
    """The clients' venv, brought up to date with PyPI's newest releases, and kept from
    another run's update until the block ends (``testing.venvs.cached_venv``). Raises,
    with pip's output, when it cannot be brought up to date (PyPI unreachable, a release
    that does not install)."""
    with cached_venv("clients", UPGRADED) as venv:
        yield venv
