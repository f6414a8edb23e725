"""gunicorn's forwarded-IPs decision, made once per peer address instead of per request.

For every request, gunicorn decides whether its peer may set the forwarding and scheme
headers (``forwarded_allow_ips``): ``HeaderPolicy._peer_is_trusted_proxy`` parses the
peer's address with ``ipaddress`` and tests it against each allowed network, about 9 µs
a request on the benchmark machine. The answer depends only on the peer's address and on
the worker's settings, which do not change while the worker lives; ``install(cfg)``
makes gunicorn ask it once per address, in the worker, and remember it:

- for a peer that is a ``(host, port)`` tuple, its host's decision, as gunicorn made it
  the first time, is kept in a dict of at most ``MAX_PEERS`` addresses (emptied when
  full, so that a worker reached from many addresses holds no more);
- anything else (a unix socket's peer, a request parsed with another ``cfg``, as a test
  may make) is decided by gunicorn's own method, every time.

gunicorn has no seam for this: the parser is not a setting, and the worker builds it
inside ``AsyncWorker.handle``. So this replaces the one method, on the class, and only on
the gunicorn versions it was checked against (``CHECKED_VERSIONS``, whose method has the
signature and meaning above: ``tests/test_forwarded.py`` holds it). On any other version
``install`` changes nothing and says so in the log, and gunicorn decides as it always did.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("stageserver.forwarded")

#: The gunicorn releases whose ``HeaderPolicy._peer_is_trusted_proxy`` this replaces.
CHECKED_VERSIONS = frozenset({"27.0.1"})
#: At most this many peer addresses are remembered; then the memory starts over.
MAX_PEERS = 4096


def install(cfg: Any, version: str | None = None) -> bool:
    """Remember gunicorn's decision per peer address for requests parsed with ``cfg`` (the
    worker's config). ``version``: gunicorn's, by default the one installed. False, and
    nothing changed, on a version not checked."""
    import gunicorn
    from gunicorn.http.message import HeaderPolicy

    version = gunicorn.__version__ if version is None else version
    if version not in CHECKED_VERSIONS:
        log.info("gunicorn %s: the forwarded-IPs decision is not cached (checked: %s)",
                 version, ", ".join(sorted(CHECKED_VERSIONS)))  # fmt: skip
        return False
    method = HeaderPolicy._peer_is_trusted_proxy
    HeaderPolicy._peer_is_trusted_proxy = per_peer(cfg, getattr(method, "gunicorns", method))
    return True


def uninstall() -> None:
    """gunicorn's own method back (tests)."""
    from gunicorn.http.message import HeaderPolicy

    gunicorns = getattr(HeaderPolicy._peer_is_trusted_proxy, "gunicorns", None)
    if gunicorns is not None:
        HeaderPolicy._peer_is_trusted_proxy = gunicorns


def per_peer(cfg: Any, gunicorns: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """``gunicorns`` (the method), with its answer kept per peer host for ``cfg``."""
    decided: dict[str, bool] = {}

    def _peer_is_trusted_proxy(message: Any) -> bool:
        peer = message.peer_addr
        if message.cfg is not cfg or not isinstance(peer, tuple):
            return gunicorns(message)
        host = peer[0]
        trusted = decided.get(host)
        if trusted is None:
            if len(decided) >= MAX_PEERS:
                decided.clear()
            trusted = decided[host] = bool(gunicorns(message))
        return trusted

    _peer_is_trusted_proxy.gunicorns = gunicorns  # type: ignore[attr-defined]
    return _peer_is_trusted_proxy
