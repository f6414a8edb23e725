"""One round trip per Redis node for a batch of commands: the flush, and the leases.

The flusher and the lease keeper each send many small commands at once, one or a few
per stage: plain ``XADD``s and Lua scripts (``EVALSHA``). redis-py's pipelines do not
fit: a standalone ``Pipeline`` that holds scripts asks ``SCRIPT EXISTS`` before every
execute (a second round trip per flush), and the cluster client's pipeline refuses
scripts altogether. So the ``Batcher`` sends the commands itself, on connections
redis-py's pools make. The store's other commands that must follow a slot go through it
too: a claim, a remote follower's ``XREAD`` (which ``RedisCluster.xread`` would route
with two ``COMMAND GETKEYS`` round trips first).

- the commands are grouped by the node that owns each one's slot (the one node of a
  standalone Redis or a Sentinel service), written to every node, and only then read
  back: the batch costs one round trip, however many nodes it spans;
- each command gets its own result, or its own exception: one stage's error never
  fails another's;
- a command answered ``NOSCRIPT`` (a node restarted, or promoted) has its script loaded
  on that node and is sent again. Under Redis Cluster, one answered ``MOVED`` (the slot
  map is refreshed), ``ASK`` (it is sent to the importing node after ``ASKING``),
  ``TRYAGAIN`` (a key of a slot in migration), ``CLUSTERDOWN``, or a connection error
  of its node, is sent again at once, up to ``_ROUNDS`` times in all; whatever still
  fails is the caller's to retry (the flusher writes those stages again later).

Reads never go to replicas: a stale read would break exactly-once resume.

``breaks`` counts what may have cost Redis writes it had acknowledged: a connection
lost, a slot map learnt again (a failover), a slot moved. A writer that trusts what it
wrote before (the flusher's plain XADDs, flusher.py) checks again after one.

Its connections are the node's pool's (``connection.BoundedPool``): the same N per node
that redis-py's own calls share, so a burst of stages costs no connection more. A
connection whose replies were not all read (an error, a greenlet killed while it
waited) is closed before it goes back, never reused as it is.

**One round trip per node per flush window.** A caller that must wait for its reply (a
stage's claim, its admission by the principal's limits) does not send it itself:
``call`` queues its commands and waits, and the next batch, whoever sends it, carries
them along. The flusher owns the window (``serve``): it is woken by a call, and its next
write, at most a flush window later, sends the calls with the stages' new events. A
burst of a hundred new stages is one round trip, not a hundred, on one connection, not a
hundred.

A blocking read (a remote follower's ``XREAD BLOCK``, ``follow``) holds its connection
while it waits, so it gets one of its own, from the node's follow pool
(``connection.pool_beside``), and never carries queued calls.

Do not wrap ``RedisCluster.pipeline`` instead: redis-py's own multi-key helpers
(``exists(a, b)``, ``delete(a, b)``) call it internally.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.client import PubSub
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .connection import (
    DEFAULT_MAX_CONNECTIONS,
    STORE_ERRORS,
    WAIT_SECONDS,
    ConnectionsExhausted,
    held,
    pool_beside,
)

try:  # packs a command in C; redis-py's own packing looks at every argument first
    from hiredis import pack_command

    _HIREDIS = True
except ImportError:  # pragma: no cover - hiredis comes with stageserver[redis]
    _HIREDIS = False

log = logging.getLogger("stageserver.store")

_ROUNDS = 3  # a command is sent at most this often in one run
_TRY_AGAIN_DELAY = 0.05  # a slot in migration: the keys move within milliseconds
_CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
#: How long a blocking read waits for a free connection of its node's follow pool: as
#: long as it would block (remote_feed.py reads for a second at most).
FOLLOW_WAIT_SECONDS = 1.0
# A call waits this long at most for the batch that carries it. A batch ends sooner: its
# waits for a connection and its replies are bounded (connection.py); this is the bound
# for a window owner that is held up elsewhere.
_CALL_SECONDS = 15.0


class _Call:
    """Commands queued for the next batch (``Batcher.call``), and their results."""

    __slots__ = ("commands", "results", "done")

    def __init__(self, commands: Sequence[Command]) -> None:
        self.commands = commands
        self.results: list[Any] = []
        self.done = threading.Event()  # a gevent event where threading is patched


@dataclass(frozen=True)
class Command:
    """One command of a batch. ``key``: a key it touches, whose slot names its node."""

    key: str
    args: tuple[Any, ...]


class Script:
    """A Lua script, sent by its SHA1 (``EVALSHA``) and loaded where a node lacks it."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def command(self, keys: Sequence[str], args: Sequence[Any]) -> Command:
        return Command(keys[0], ("EVALSHA", self.sha, len(keys), *keys, *args))


class Batcher:
    """Runs batches of commands against this process's client (``connection.connect``)."""

    def __init__(
        self,
        client: Any,
        scripts: Sequence[Script],
        follow_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        """``follow_connections``: blocking reads held at once per node, at most."""
        self.client = client
        self.cluster = isinstance(client, RedisCluster)
        self._scripts = {script.sha: script for script in scripts}
        self._follow_connections = follow_connections
        # Each node's pool of blocking reads, by its pool of commands.
        self._follows: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        self._follows_lock = threading.Lock()
        weakref.finalize(self, _disconnect_all, self._follows)
        self.breaks = 0
        self._slot_map: object = None
        self._queued: list[_Call] = []
        self._queue_lock = threading.Lock()
        self._wake: Callable[[], None] | None = None
        self._server = 0  # the thread (or greenlet) that sends the window's batches
        self._subscribed: Any = None  # the cancel listener's pool of one

    # -- the window ----------------------------------------------------------------------

    def serve(self, wake: Callable[[], None]) -> None:
        """The calling thread (the flusher's) owns the window from now on: ``wake()``
        when a call is queued, and the call goes with its next batch (``run``)."""
        self._server = threading.get_ident()
        self._wake = wake

    def call(self, commands: Sequence[Command]) -> list[Any]:
        """Each command's reply, or the exception it ended with, in order, sent with the
        window's next batch (sent at once when nothing serves the window, or when the
        window's owner asks)."""
        wake = self._wake
        if wake is None or threading.get_ident() == self._server:
            return self.run(commands)
        queued = _Call(commands)
        with self._queue_lock:
            self._queued.append(queued)
        wake()
        if queued.done.wait(_CALL_SECONDS):
            return queued.results
        with self._queue_lock:
            if queued in self._queued:  # never sent: it may be refused with no doubt
                self._queued.remove(queued)
        if queued.done.is_set():
            return queued.results
        late = RedisTimeoutError(f"the stage store's batch took over {_CALL_SECONDS:g} s")
        return [late] * len(commands)

    def subscription(self, channel: str) -> Any:
        """A redis-py ``PubSub`` on a connection of its own, not one of a node's N: on the
        node of ``channel``'s slot (classic pub/sub, which the cluster bus carries to
        every node). The previous one's connection is let go."""
        node = self._node_of(Command(channel, ()))
        pool = pool_beside(self._pool(node), 1, WAIT_SECONDS)
        old, self._subscribed = self._subscribed, pool
        if old is not None:
            old.disconnect()
        return PubSub(pool, ignore_subscribe_messages=True)

    @property
    def queued(self) -> bool:
        """Whether calls wait for the next batch."""
        return bool(self._queued)

    def close(self) -> None:
        """Close its connections, and its client's: it is not used again. A call still
        queued is answered with a connection error, and a later one is sent at once (to
        a closed client), rather than waiting for a window nobody serves."""
        self._wake = None
        with self._queue_lock:
            queued, self._queued = self._queued, []
        for waiting in queued:
            waiting.results = [RedisConnectionError("the stage store is closed")] * len(
                waiting.commands
            )
            waiting.done.set()
        _disconnect_all(self._follows)
        if self._subscribed is not None:
            self._subscribed.disconnect()
        self.client.close()

    # -- nodes -------------------------------------------------------------------------

    def refresh(self) -> None:
        """Learn the cluster's slot map again (a failover, a slot moved)."""
        if self.cluster:
            try:
                self.client.nodes_manager.initialize()
            except STORE_ERRORS as exc:
                log.warning("could not refresh the Redis Cluster's slot map: %s", exc)

    def _node_of(self, command: Command, target: ClusterNode | None = None) -> Any:
        """The node to send ``command`` to: ``target`` (after an ASK), else its slot's."""
        if not self.cluster:
            return None
        if target is not None:
            return target
        return self.client.nodes_manager.get_node_from_slot(key_slot(command.key.encode()))

    def _pool(self, node: Any, follow: bool = False) -> Any:
        if node is None:
            pool = self.client.connection_pool
        else:
            pool = self.client.get_redis_connection(node).connection_pool
        return self._follow_pool(pool) if follow else pool

    def _follow_pool(self, pool: Any) -> Any:
        follows = self._follows.get(pool)
        if follows is None:
            with self._follows_lock:
                follows = self._follows.get(pool)
                if follows is None:
                    follows = pool_beside(pool, self._follow_connections, FOLLOW_WAIT_SECONDS)
                    self._follows[pool] = follows
        return follows

    def connections(self) -> dict[tuple[str, str], int]:
        """The connections this process holds open now, by node (``host:port``) and
        kind: ``commands`` (each node's bounded pool), ``follows`` (blocking reads) and
        ``subscription`` (the cancel listener's)."""
        pools: dict[int, Any] = {}
        if self.cluster:
            manager = self.client.nodes_manager
            for node in [*manager.nodes_cache.values(), *manager.startup_nodes.values()]:
                if node.redis_connection is not None:
                    pool = node.redis_connection.connection_pool
                    pools[id(pool)] = pool
        else:
            pools[id(self.client.connection_pool)] = self.client.connection_pool
        counts: dict[tuple[str, str], int] = {}
        kinds = (
            ("commands", list(pools.values())),
            ("follows", list(self._follows.values())),
            ("subscription", [self._subscribed] if self._subscribed is not None else []),
        )
        for kind, each in kinds:
            for pool in each:
                for where, count in held(pool).items():
                    counts[where, kind] = counts.get((where, kind), 0) + count
        return counts

    # -- a batch -----------------------------------------------------------------------

    def run(self, commands: Sequence[Command]) -> list[Any]:
        """Each command's reply, or the exception it ended with, in order; the calls
        queued meanwhile go with them, in the same round trip."""
        with self._queue_lock:
            calls, self._queued = self._queued, []
        if not calls:
            return self._run(commands)
        everything = list(commands)
        for queued in calls:
            everything += queued.commands
        try:
            results = self._run(everything)
        except BaseException as exc:
            failed = exc if isinstance(exc, Exception) else RedisConnectionError(repr(exc))
            for queued in calls:
                queued.results = [failed] * len(queued.commands)
                queued.done.set()
            raise
        start = len(commands)
        for queued in calls:
            queued.results = results[start : start + len(queued.commands)]
            start += len(queued.commands)
            queued.done.set()
        return results[: len(commands)]

    def follow(self, command: Command) -> Any:
        """The reply to one blocking command (a remote follower's ``XREAD BLOCK``), or the
        exception it ended with: ``ConnectionsExhausted`` when its node's follow pool had
        no connection free for ``FOLLOW_WAIT_SECONDS``."""
        [result] = self._run([command], follow=True)
        return result

    def _run(self, commands: Sequence[Command], follow: bool = False) -> list[Any]:
        if self.cluster:  # learnt again, here or by any other caller of the client
            slot_map = self.client.nodes_manager.slots_cache
            if slot_map is not self._slot_map:
                self._slot_map = slot_map
                self.breaks += 1
        results: list[Any] = [None] * len(commands)
        pending = list(range(len(commands)))
        asked: dict[int, ClusterNode] = {}  # commands to send to a node after ASKING
        for _ in range(_ROUNDS):
            self._send(commands, pending, results, asked, follow)
            pending = self._to_send_again(commands, pending, results, asked)
            if not pending:
                break
        return results

    def _send(
        self,
        commands: Sequence[Command],
        indexes: list[int],
        results: list[Any],
        asked: dict[int, ClusterNode],
        follow: bool,
    ) -> None:
        """Write every node's share, then read every node's replies."""
        groups: dict[Any, list[int]] = {}
        for index in indexes:
            try:
                node = self._node_of(commands[index], asked.get(index))
            except STORE_ERRORS as exc:  # a slot no node serves (yet)
                results[index] = exc
                continue
            groups.setdefault(node, []).append(index)
        sent = []
        for node, members in groups.items():
            try:
                pool = self._pool(node, follow)
                connection = pool.get_connection()
            except STORE_ERRORS as exc:
                for index in members:
                    results[index] = exc
                continue
            packed = []
            for index in members:
                if index in asked:
                    packed.append(("ASKING",))
                packed.append(commands[index].args)
            try:
                connection.send_packed_command(_packed(connection, packed))
            except STORE_ERRORS as exc:
                self.breaks += 1
                connection.disconnect()
                pool.release(connection)
                for index in members:
                    results[index] = exc
                continue
            sent.append((pool, connection, members))
        for pool, connection, members in sent:
            done = 0
            try:
                for index in members:
                    results[index] = self._read(connection, index in asked)
                    done += 1
            except _CONNECTION_ERRORS as exc:
                self.breaks += 1
                for unread in members[done:]:
                    results[unread] = exc
            finally:
                if done < len(members):  # replies left unread: the connection is spoilt
                    connection.disconnect()
                pool.release(connection)

    @staticmethod
    def _read(connection: Any, asking: bool) -> Any:
        try:
            if asking:
                connection.read_response()  # ASKING's OK
            return connection.read_response()
        except _CONNECTION_ERRORS:
            raise
        except STORE_ERRORS as exc:  # an error reply: this command's alone
            return exc

    def _to_send_again(
        self,
        commands: Sequence[Command],
        indexes: list[int],
        results: list[Any],
        asked: dict[int, ClusterNode],
    ) -> list[int]:
        again = []
        refresh = try_again = False
        for index in indexes:
            result = results[index]
            # A command sent after ASKING goes there again if it failed there.
            target = asked.pop(index, None)
            if isinstance(result, ConnectionsExhausted):
                continue  # no connection free: sending again would wait again
            if isinstance(result, NoScriptError):
                self._load_script(commands[index], target)
                if target is not None:
                    asked[index] = target
            elif not self.cluster:
                continue
            elif isinstance(result, MovedError):
                self.breaks += 1
                self.client.nodes_manager.move_slot(result)
            elif isinstance(result, AskError):
                asked[index] = self._node_at(result.host, result.port)
            elif isinstance(result, TryAgainError):
                try_again = True
                if target is not None:
                    asked[index] = target
            elif isinstance(result, (ClusterDownError, *_CONNECTION_ERRORS)):
                refresh = True
            else:
                continue
            again.append(index)
        if refresh:
            self.refresh()
        if try_again:
            time.sleep(_TRY_AGAIN_DELAY)
        return again

    def _node_at(self, host: str, port: int) -> ClusterNode:
        node = self.client.get_node(host=host, port=port)
        if node is None:
            node = ClusterNode(host, port)  # type: ignore[no-untyped-call]
            self.client.nodes_manager.create_redis_connections([node])
        return node  # type: ignore[no-any-return]

    def _load_script(self, command: Command, target: ClusterNode | None) -> None:
        """Load the command's script where it is sent: ``target``, else its slot's node."""
        script = self._scripts.get(str(command.args[1]))
        if script is None:
            return
        try:
            if not self.cluster:
                client = self.client
            else:
                node = self._node_of(command, target)
                client = self.client.get_redis_connection(node)
            client.script_load(script.source)
        except STORE_ERRORS as exc:
            log.warning("could not load a script into Redis: %s", exc)


def _packed(connection: Any, commands: list[tuple[Any, ...]]) -> Any:
    if not _HIREDIS:
        return connection.pack_commands(commands)
    packed = []
    for args in commands:
        try:
            packed.append(pack_command(args))
        except TypeError:  # hiredis takes no int: the writes' hot path passes none
            packed += connection.pack_command(*args)
    return [b"".join(packed)]  # send_packed_command takes a list of buffers


def _disconnect_all(follows: weakref.WeakKeyDictionary[Any, Any]) -> None:
    for pool in list(follows.values()):
        pool.disconnect()
