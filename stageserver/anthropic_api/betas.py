"""``anthropic-version`` and ``anthropic-beta``: taken, whatever they say.

The Messages API is answered as its version ``2023-06-01`` says, the one every SDK sends;
``anthropic-version`` may carry any value, or be left out (it is what tells ``GET
/v1/models`` to answer in Anthropic's shape).

``anthropic-beta`` (a comma-separated list, in one header or several) turns on features
of Anthropic's. Those ``KNOWN`` change nothing here, or name what stageserver does anyway
(it streams tool input as it comes, counts tokens, has no prompt cache), or a feature
that is refused where a request uses it (a server tool, a container): each is taken in
silence. Any other name is ignored too, and logged once per process (logger
``stageserver.anthropic``), so an operator learns what clients ask for; at most
``MAX_LOGGED`` names are remembered, so a caller cannot grow the set, and a name is
logged cut to 64 characters and escaped, never as given.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

log = logging.getLogger("stageserver.anthropic")

#: The version stageserver answers as.
VERSION = "2023-06-01"
MAX_LOGGED = 256
KNOWN = frozenset(
    {
        # Claude Code names itself, and its OAuth login.
        "claude-code-20250219",
        "oauth-2025-04-20",
        # What is done here anyway: tool input streamed as it comes, thinking between
        # tool calls (the model's business), token counting, JSON output formats.
        "fine-grained-tool-streaming-2025-05-14",
        "interleaved-thinking-2025-05-14",
        "dev-full-thinking-2025-05-14",
        "thinking-display-updates-2026-08-18",
        "token-efficient-tools-2025-02-19",
        "token-counting-2024-11-01",
        "structured-outputs-2025-11-13",
        # Limits and modes of Anthropic's: the upstream's own apply.
        "output-128k-2025-02-19",
        "output-300k-2026-03-24",
        "context-1m-2025-08-07",
        "model-context-window-exceeded-2025-08-26",
        "fast-mode-2026-02-01",
        # No prompt cache here.
        "prompt-caching-2024-07-31",
        "extended-cache-ttl-2025-04-11",
        "cache-diagnosis-2026-04-07",
        # Features refused where a request uses them (fields.py, requests.py).
        "computer-use-2024-10-22",
        "computer-use-2025-01-24",
        "computer-use-2025-11-24",
        "code-execution-2025-05-22",
        "mcp-client-2025-04-04",
        "mcp-client-2025-11-20",
        "files-api-2025-04-14",
        "pdfs-2024-09-25",
        "context-management-2025-06-27",
        "skills-2025-10-02",
    }
)

_logged: set[str] = set()
_lock = threading.Lock()


def names(headers: Iterable[str]) -> list[str]:
    """The beta names of the ``anthropic-beta`` headers given."""
    return [name.strip() for header in headers for name in header.split(",") if name.strip()]


def take(headers: Iterable[str]) -> None:
    """Take a request's ``anthropic-beta`` headers: log each unknown name, once."""
    for name in names(headers):
        if name in KNOWN or name in _logged:
            continue
        with _lock:
            if name in _logged or len(_logged) >= MAX_LOGGED:
                continue
            _logged.add(name)
        log.info("anthropic-beta %r is not one this server knows: ignored", name[:64])
