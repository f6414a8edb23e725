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

The batcher keeps its own idle connections, made by redis-py's pools but not handed back
to them: a pool checks each connection it lends for unread data (a poll) and reports its
use, which cost more than the write itself. A connection whose replies were not all read
(an error, a greenlet killed while it waited) is closed, never reused.

Do not wrap ``RedisCluster.pipeline`` instead: redis-py's own multi-key helpers
(``exists(a, b)``, ``delete(a, b)``) call it internally.
"""

from __future__ import annotations

import hashlib
import logging
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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

from .connection import STORE_ERRORS

try:  # packs a command in C; redis-py's own packing looks at every argument first
    from hiredis import pack_command

    _HIREDIS = True
except ImportError:  # pragma: no cover - hiredis comes with stageserver[redis]
    _HIREDIS = False

log = logging.getLogger("stageserver.store")

_ROUNDS = 3  # a command is sent at most this often in one run
_TRY_AGAIN_DELAY = 0.05  # a slot in migration: the keys move within milliseconds
_CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


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

    def __init__(self, client: Any, scripts: Sequence[Script]) -> None:
        self.client = client
        self.cluster = isinstance(client, RedisCluster)
        self._scripts = {script.sha: script for script in scripts}
        self._idle: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()
        # Its connections are no pool's to close: closed with it.
        weakref.finalize(self, _disconnect_all, self._idle)
        self.breaks = 0
        self._slot_map: object = None

    def close(self) -> None:
        """Close its connections, and its client's: it is not used again."""
        _disconnect_all(self._idle)
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

    def _pool(self, node: Any) -> Any:
        if node is None:
            return self.client.connection_pool
        return self.client.get_redis_connection(node).connection_pool

    # -- a batch -----------------------------------------------------------------------

    def run(self, commands: Sequence[Command]) -> list[Any]:
        """Each command's reply, or the exception it ended with, in order."""
        if self.cluster:  # learnt again, here or by any other caller of the client
            slot_map = self.client.nodes_manager.slots_cache
            if slot_map is not self._slot_map:
                self._slot_map = slot_map
                self.breaks += 1
        results: list[Any] = [None] * len(commands)
        pending = list(range(len(commands)))
        asked: dict[int, ClusterNode] = {}  # commands to send to a node after ASKING
        for _ in range(_ROUNDS):
            self._send(commands, pending, results, asked)
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
                pool = self._pool(node)
                connection = self._take(pool)
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
                self._give_back(pool, connection)
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
                self._give_back(pool, connection)

    def _take(self, pool: Any) -> Any:
        idle = self._idle.get(pool)
        connection = idle.pop() if idle else pool.make_connection()
        # Connected by its own connect(), as a pool would: a Sentinel's connection finds
        # the current primary there (sending on an unconnected one would not).
        try:
            connection.connect()
        except BaseException:
            self._give_back(pool, connection)  # kept, to connect again next time
            raise
        return connection

    def _give_back(self, pool: Any, connection: Any) -> None:
        self._idle.setdefault(pool, []).append(connection)

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


def _disconnect_all(idle: weakref.WeakKeyDictionary[Any, list[Any]]) -> None:
    for connections in list(idle.values()):
        for connection in connections:
            connection.disconnect()
