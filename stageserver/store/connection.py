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

What a worker holds, per Redis node (``STAGESERVER_STORE_MAX_CONNECTIONS``, N, 8 by
default), whatever its load:

- **commands**: at most N connections, in one pool per node (``BoundedPool``, a redis-py
  ``BlockingConnectionPool``) that every command shares: the batcher's round trips (the
  flush with the claims and admissions it carries, the leases) and redis-py's own calls
  (reads, idempotency keys, takeovers). A caller that finds all N in use waits for one,
  ``WAIT_SECONDS`` at most, then gets ``ConnectionsExhausted`` (one of ``STORE_ERRORS``:
  a 503 ``StoreUnavailable``), never an (N+1)th connection and never a wait without end;
- **follows**: a remote follower's blocking ``XREAD`` holds its connection while it waits
  (a second at most), so it cannot share one: at most N more, in a pool of their own per
  node (``pool_beside``), made only when responses here follow stages of other workers
  (and then kept, as the commands' are). A follower that finds none free within its
  read's block reads nothing this time, and tries again (remote_feed.py);
- **the subscription**: the cancel listener's one pub/sub connection (cancels.py), on one
  node: one per worker.

So a worker holds at most 2N + 1 connections to a node, and N + 1 when nothing here
follows a stage of another worker. ``stageserver_store_connections`` reports them, by node
(its ``host:port``, never a URL: a password stays out of labels) and kind; Redis's own
``CLIENT LIST`` shows them by name (``client_name``: ``stageserver:<host>:<pid>``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from queue import Empty, LifoQueue
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import BlockingConnectionPool, Connection, SSLConnection
from redis.exceptions import MaxConnectionsError, RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

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


DEFAULT_MAX_CONNECTIONS = 8  # STAGESERVER_STORE_MAX_CONNECTIONS
#: How long a caller waits for one of the node's connections when all are in use: as
#: long as a reply may take (``socket_timeout``), so a wait ends no sooner than a stall.
WAIT_SECONDS = 2.0

_CLIENT_OPTIONS: dict[str, Any] = {
    "socket_timeout": 2,
    "socket_connect_timeout": 2,
    "health_check_interval": 10,
}


class ConnectionsExhausted(MaxConnectionsError):
    """Every connection this worker may hold to a Redis node was in use, and none came
    back in time: the store is as good as unavailable to this caller (a 503). A
    ``MaxConnectionsError``, which redis-py's cluster client takes for what it is (the
    client's own limit), not for a node's failure: it learns no slot map again for it."""


class _Waiting(LifoQueue):  # type: ignore[type-arg]
    """A pool's queue of free connections whose wait, when it runs out, says so: redis-py
    would say only "No connection available."."""

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        try:
            return super().get(block, timeout)
        except Empty:
            raise ConnectionsExhausted(
                f"all {self.maxsize} connections this worker may hold to a Redis node "
                f"(STAGESERVER_STORE_MAX_CONNECTIONS) stayed in use for {timeout} s"
            ) from None


class BoundedPool(BlockingConnectionPool):
    """A node's connections for commands: at most ``max_connections``, made as they are
    needed and kept; a caller waits for a free one (``WAIT_SECONDS``), then gets
    ``ConnectionsExhausted``."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("timeout", WAIT_SECONDS)
        super().__init__(queue_class=_Waiting, **kwargs)  # type: ignore[no-untyped-call]


class _SentinelBoundedPool(SentinelConnectionPool, BoundedPool):
    """A Sentinel service's primary, as ``BoundedPool`` bounds it (redis-py has no
    blocking Sentinel pool: this is its pool on a blocking base)."""


def pool_beside(pool: Any, max_connections: int, wait_seconds: float) -> BoundedPool:
    """A pool beside ``pool`` (a node's, or the Sentinel primary's), of connections made
    as ``pool``'s are, for what holds one while it waits (blocking reads, a
    subscription): at most ``max_connections``, each waited for ``wait_seconds`` at
    most."""
    kwargs = dict(pool.connection_kwargs)
    kwargs.pop("queue_class", None)
    kwargs.pop("timeout", None)
    return BoundedPool(
        connection_class=pool.connection_class,
        max_connections=max_connections,
        timeout=wait_seconds,
        **kwargs,
    )


def address(connection: Any) -> str:
    """Where ``connection`` goes, for a label: ``host:port`` (or ``unix:<path>``), never
    its URL, which may hold a password."""
    path = getattr(connection, "path", "")
    if path:
        return f"unix:{path}"
    return f"{connection.host}:{connection.port}"


def held(pool: Any) -> dict[str, int]:
    """The connections ``pool`` holds open now, by ``address``."""
    counts: dict[str, int] = {}
    for connection in list(getattr(pool, "_connections", ())):
        if connection.is_connected:
            where = address(connection)
            counts[where] = counts.get(where, 0) + 1
    return counts


_CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


def connect(url: str, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> Any:
    """A redis-py client for ``url`` (any: redis-py types its results loosely), holding
    at most ``max_connections`` connections per node for commands (``BoundedPool``). A
    cluster's client asks its nodes for the slot map at once; raises one of
    ``STORE_ERRORS`` when none answers."""
    if max_connections < 1:
        raise ConfigError(
            f"STAGESERVER_STORE_MAX_CONNECTIONS must be 1 or more, not {max_connections}"
        )
    bound = {
        **_CLIENT_OPTIONS,
        "max_connections": max_connections,
        # Each connection names its worker (CLIENT LIST shows who holds what).
        "client_name": client_name(),
    }
    parts = urlsplit(url)
    if parts.scheme in ("redis", "rediss", "unix"):
        return redis.Redis(connection_pool=BoundedPool.from_url(url, **bound))
    if parts.scheme in _CLUSTER_SCHEMES:
        return _cluster(url, bound)
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
        service,
        db=int(db or 0),
        password=password,
        connection_pool_class=_SentinelBoundedPool,
        **bound,
    )


def _hosts(url: str, what: str) -> list[tuple[str, int]]:
    hosts = []
    for address in urlsplit(url).netloc.rpartition("@")[2].split(","):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"STAGESERVER_STORE_URL: {what} {address!r} must be host:port")
        hosts.append((host.strip("[]"), int(port)))
    return hosts


def _cluster(url: str, bound: dict[str, Any]) -> RedisCluster:
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
    (first_host, first_port), *more = _hosts(url, "cluster node")
    tls = parts.scheme == "rediss+cluster"
    return RedisCluster(
        # redis-py gives each node a pool of ``connection_pool_class`` only for a client
        # made from a URL: the first seed, without its credentials (given below).
        url=f"{'rediss' if tls else 'redis'}://{first_host}:{first_port}",
        startup_nodes=[ClusterNode(host, port) for host, port in more],  # type: ignore[no-untyped-call]
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        connection_pool_class=BoundedPool,
        connection_class=SSLConnection if tls else Connection,
        # A shard that is down answers 503 at once, as a lone Redis would: not after
        # redis-py's ten attempts. The store's own loops try again.
        retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 1),
        require_full_coverage=False,
        **bound,
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


def client_name() -> str:
    """The name this process's connections give Redis (``CLIENT SETNAME``):
    ``stageserver:`` and its ``owner_name``."""
    return f"stageserver:{_owner}"


def _name_this_process() -> None:
    global _owner
    _owner = f"{socket.gethostname()}:{os.getpid()}"


_name_this_process()
os.register_at_fork(after_in_child=_name_this_process)  # a forked worker is another owner
