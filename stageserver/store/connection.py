"""The shared store's connection and key names.

``STAGESERVER_STORE_URL`` takes either form:

- ``redis://[:password@]host:6379/0`` (or ``rediss://`` for TLS): one Redis server;
- ``redis+sentinel://[:password@]host1:26379,host2:26379/<service>/<db>``: the primary of
  ``<service>`` as Redis Sentinel names it, found again after a failover. The password,
  if any, is the primary's (and its replicas'); the sentinels are asked without one.

Every key of one stage carries the stage's key as a hash tag, ``ss:{alice/summary}...``,
so that in a Redis Cluster they live in one slot, as the store's scripts need; the keys
of one principal's limits share the tag ``{alice}``. What stageserver does not do is
speak the Cluster protocol itself: ``STAGESERVER_STORE_URL`` names one primary (or a
Sentinel service), not a cluster.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.exceptions import RedisClusterException
from redis.sentinel import Sentinel

from ..errors import ConfigError

#: What a call to the store raises when the store cannot answer: redis-py's errors, its
#: cluster client's (which are not ``RedisError``s), and the socket's own. Caught wherever
#: the store is called, and turned into ``StoreUnavailable`` (or a warning, and a retry).
STORE_ERRORS = (redis.RedisError, RedisClusterException, OSError)

_CLIENT_OPTIONS: dict[str, Any] = {
    "socket_timeout": 2,
    "socket_connect_timeout": 2,
    "health_check_interval": 10,
    # Each response that follows a stage of another worker holds a connection while it
    # waits (a blocking XREAD), beside the flusher's, the leases' and the cancel
    # listener's. redis-py's pool allows 100 by default, and one more is refused as if
    # Redis were down: allow what a worker's connections can ask for.
    "max_connections": 4096,
}


def connect(url: str) -> Any:
    """A redis-py client for ``url`` (any: redis-py types its results loosely)."""
    parts = urlsplit(url)
    if parts.scheme in ("redis", "rediss", "unix"):
        return redis.Redis.from_url(url, **_CLIENT_OPTIONS)
    if parts.scheme != "redis+sentinel":
        raise ConfigError(
            f"STAGESERVER_STORE_URL: {parts.scheme!r} is not a Redis URL; use "
            "redis://host:6379/0 or redis+sentinel://host:26379,host2:26379/service/0"
        )
    hosts = []
    for address in parts.netloc.rpartition("@")[2].split(","):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"STAGESERVER_STORE_URL: sentinel {address!r} must be host:port")
        hosts.append((host.strip("[]"), int(port)))
    service, _, db = parts.path.strip("/").partition("/")
    if not service or (db and not db.isdigit()):
        raise ConfigError(
            "STAGESERVER_STORE_URL: a Sentinel URL ends in /<service name>/<db>, e.g. "
            "redis+sentinel://127.0.0.1:26379/mymaster/0"
        )
    password = unquote(parts.password) if parts.password else None
    sentinel = Sentinel(hosts, socket_timeout=1, socket_connect_timeout=1)  # type: ignore[no-untyped-call]
    return sentinel.master_for(  # type: ignore[no-untyped-call]
        service, db=int(db or 0), password=password, **_CLIENT_OPTIONS
    )


def stage_keys(stage_key: str) -> tuple[str, str, str, str]:
    """The hash, event log, text and lease keys of the stage with this key."""
    base = f"ss:{{{stage_key}}}"
    return base, f"{base}:log", f"{base}:text", f"{base}:live"
