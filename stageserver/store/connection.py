"""The shared store's connection; what it raises when the store cannot answer
(``STORE_ERRORS``, which ``store_errors()`` turns into ``StoreUnavailable``), and whether
it answers this process now (``Reachability``); and the name this process writes as a
stage's owner (``owner_name``: its host and pid).

``STAGESERVER_STORE_URL`` takes one of three forms:

- ``redis://[:password@]host:6379/0`` (or ``rediss://`` for TLS): one Redis server;
- ``redis+sentinel://[:password@]host1:26379,host2:26379/<service>/<db>``: the primary of
  ``<service>`` as Redis Sentinel names it, found again after a failover. The password,
  if any, is the primary's (and its replicas'); the sentinels are asked without one;
- ``redis+cluster://[user:password@]host1:7000,host2:7001`` (``rediss+cluster://`` for
  TLS): a Redis Cluster, found through any of the nodes named. Its database is 0: a db
  in the URL other than 0, or a unix socket, is refused.

Under a Redis Cluster, the keys' hash tags (``keys.py``) keep each script to one slot. A
plain ``redis://`` URL that reaches a cluster node is refused at start
(``refuse_a_cluster_node``): it would half work, one slot in three, and call the rest an
outage.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel

from ..errors import ConfigError, StoreUnavailable

#: What a call to the store raises when the store cannot answer: redis-py's errors, its
#: cluster client's (which are not ``RedisError``s), and the socket's own. Caught wherever
#: the store is called, and turned into ``StoreUnavailable`` (or a warning, and a retry).
STORE_ERRORS = (redis.RedisError, RedisClusterException, OSError)


@contextmanager
def store_errors() -> Iterator[None]:
    """Turn what the store raises when it cannot answer (``STORE_ERRORS``) into
    ``StoreUnavailable``, the refusal a caller answers 503 with (as httpx's
    ``map_exceptions`` turns the transport's errors into its own)."""
    try:
        yield
    except STORE_ERRORS as exc:
        raise StoreUnavailable(exc) from None


class Reachability:
    """Whether Redis answers this process, as each of its loops finds it (the flusher's
    writes, the sweeper's looks, which come every quarter of a lease, so that an outage
    is seen with no stage running too): reachable while every loop reaches it.
    ``on_change(reachable)`` is told when that changes."""

    def __init__(self, on_change: Callable[[bool], None] | None = None) -> None:
        self._on_change = on_change
        self._failing: set[str] = set()

    def found(self, loop: str, reached: bool) -> None:
        """What ``loop``'s last call to Redis found."""
        before = not self._failing
        if reached:
            self._failing.discard(loop)
        else:
            self._failing.add(loop)
        reachable = not self._failing
        if reachable != before and self._on_change is not None:
            self._on_change(reachable)


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


_CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


def connect(url: str) -> Any:
    """A redis-py client for ``url`` (any: redis-py types its results loosely). A
    cluster's client asks its nodes for the slot map at once; raises one of
    ``STORE_ERRORS`` when none answers."""
    parts = urlsplit(url)
    if parts.scheme in ("redis", "rediss", "unix"):
        return redis.Redis.from_url(url, **_CLIENT_OPTIONS)
    if parts.scheme in _CLUSTER_SCHEMES:
        return _cluster(url)
    if parts.scheme != "redis+sentinel":
        raise ConfigError(
            f"STAGESERVER_STORE_URL: {parts.scheme!r} is not a Redis URL; use "
            "redis://host:6379/0, redis+sentinel://host:26379,host2:26379/service/0 or "
            "redis+cluster://host:7000,host2:7001"
        )
    hosts = _hosts(url, "sentinel")
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


def _hosts(url: str, what: str) -> list[tuple[str, int]]:
    hosts = []
    for address in urlsplit(url).netloc.rpartition("@")[2].split(","):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"STAGESERVER_STORE_URL: {what} {address!r} must be host:port")
        hosts.append((host.strip("[]"), int(port)))
    return hosts


def _cluster(url: str) -> RedisCluster:
    parts = urlsplit(url)
    if not parts.netloc.rpartition("@")[2]:
        raise ConfigError(
            "STAGESERVER_STORE_URL: a Redis Cluster is reached over TCP at host:port "
            "(redis+cluster://host1:7000,host2:7001), not through a unix socket"
        )
    if parts.path.strip("/") not in ("", "0"):
        raise ConfigError(
            f"STAGESERVER_STORE_URL: a Redis Cluster has only database 0, not "
            f"{parts.path.strip('/')!r}; drop it from the URL"
        )
    nodes = [ClusterNode(host, port) for host, port in _hosts(url, "cluster node")]  # type: ignore[no-untyped-call]
    return RedisCluster(
        startup_nodes=nodes,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        ssl=parts.scheme == "rediss+cluster",
        # A shard that is down answers 503 at once, as a lone Redis would: not after
        # redis-py's ten attempts. The store's own loops try again.
        retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 1),
        require_full_coverage=False,
        **_CLIENT_OPTIONS,
    )


def refuse_a_cluster_node(client: Any, url: str) -> None:
    """Raise ConfigError when a plain Redis URL reaches a node of a Redis Cluster. A
    Redis that cannot answer now passes: the store waits for it."""
    if isinstance(client, RedisCluster):
        return
    try:
        enabled = client.info("cluster").get("cluster_enabled")
    except STORE_ERRORS:
        return
    if enabled == 1:
        where = urlsplit(url).netloc.rpartition("@")[2]
        raise ConfigError(
            f"STAGESERVER_STORE_URL: {where} is a node of a Redis Cluster; name the "
            f"cluster as redis+cluster://{where} (more nodes after commas)"
        )


_owner = ""


def owner_name() -> str:
    """This process's name in the store, written as the owner of each stage it runs: its
    host and pid."""
    return _owner


def _name_this_process() -> None:
    global _owner
    _owner = f"{socket.gethostname()}:{os.getpid()}"


_name_this_process()
os.register_at_fork(after_in_child=_name_this_process)  # a forked worker is another owner
