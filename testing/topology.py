"""The three ways stageserver is deployed, stood up once per test session and shared by
every test that runs a scenario on them:

- ``one worker``: one gunicorn host, one worker, its stages in its memory;
- ``two hosts on Redis``: two gunicorn hosts on one redis-server;
- ``two hosts on a Redis Cluster``: two gunicorn hosts on a cluster of three primaries.

A scenario (a resume, a grace, a cancel, a limit) is written once over a ``Topology``:
it starts a stage on ``start`` and follows, resumes, cancels or is refused through
``follow``, which is the same host when there is one. Where the store is sharded, a
scenario runs on every shard (``on_every_shard``), and a stage that a limit counts lives
on another shard than the limit (``apart_from_limits``): what one Redis does, every
layout does.

The hosts are started the first time a test asks for their topology, and stopped at the
end of the session (``Topologies``). They take API keys: each principal is named by its
role (``alice`` has no limit, ``solo`` one stream, ...); on the cluster, a limited
principal's name is drawn so that its limits live on the first primary. A test checks,
as it ends, that its hosts logged no traceback and no secret meanwhile (``checked``).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from .fake_upstream import FakeUpstream
from .servers import Gunicorn, RedisClusterGroup, RedisServer
from .shards import limits_slot, principal_on, stage_id_on, stage_slot
from .sse import post_chat

__all__ = [
    "CLUSTER",
    "LEASE_SECONDS",
    "ONE_WORKER",
    "REDIS",
    "ROLES",
    "TOPOLOGIES",
    "Topologies",
    "Topology",
]

ONE_WORKER = "one worker"
REDIS = "two hosts on Redis"
CLUSTER = "two hosts on a Redis Cluster"
TOPOLOGIES = (ONE_WORKER, REDIS, CLUSTER)

#: Each principal's limits, by its role (and its name, but on a cluster).
ROLES: Mapping[str, Mapping[str, int]] = {
    "alice": {},
    "bob": {"requests_per_minute": 1000},
    "pair": {"max_streams": 2},
    "solo": {"max_streams": 1},
    "tok": {"tokens_per_minute": 10},
    "rpm": {"requests_per_minute": 2},
}
#: STAGESERVER_OWNER_LEASE_SECONDS on a store: a dead host's stages are taken over soon.
LEASE_SECONDS = 2
#: What no host's log may hold, besides a secret.
FORBIDDEN_IN_LOGS = ("Traceback",)


def secret_of(name: str) -> str:
    return f"{name}-key-0123456789"


@dataclass
class Topology:
    """One topology's hosts: stages start on ``start`` and are followed through
    ``follow``. ``env`` starts another host like them (``Gunicorn(topology.env)``);
    ``redis`` and ``cluster`` are their store, if any."""

    name: str
    start: Gunicorn
    follow: Gunicorn
    env: dict[str, str]
    names: dict[str, str]  # role -> principal's name
    redis: RedisServer | None = None
    cluster: RedisClusterGroup | None = None
    _log_offsets: dict[int, int] = field(default_factory=dict)

    @property
    def hosts(self) -> tuple[Gunicorn, ...]:
        """Its hosts, each once."""
        return (self.start,) if self.follow is self.start else (self.start, self.follow)

    def principal(self, role: str) -> str:
        """The name of the principal of ``role``, as an error or a log line says it."""
        return self.names[role]

    def secret(self, role: str) -> str:
        """The API key of ``role``'s principal."""
        return secret_of(self.names[role])

    def auth(self, role: str, **headers: str) -> dict[str, str]:
        """The headers of a request of ``role``'s principal, and ``headers``."""
        return {"Authorization": f"Bearer {self.secret(role)}", **headers}

    def on_every_shard(self, prefix: str, role: str = "alice") -> list[str]:
        """Stage ids of ``role``'s principal: one whose keys live on each primary of the
        cluster, or ``[prefix]`` where the store is not sharded."""
        if self.cluster is None:
            return [prefix]
        principal = self.names[role]
        return [stage_id_on(self.cluster, port, principal, prefix) for port in self.primaries()]

    def apart_from_limits(self, prefix: str, role: str, count: int) -> list[str]:
        """``count`` stage ids of ``role``'s principal (``prefix-0``, ...): on a cluster,
        each on a primary that does not hold the principal's limits, taking those primaries
        in turn, so that two ids in a row live on two shards."""
        if self.cluster is None:
            return [f"{prefix}-{n}" for n in range(count)]
        principal = self.names[role]
        limits_on = self.cluster.primary_for_slot(limits_slot(principal))
        others = [port for port in self.primaries() if port != limits_on]
        ids = [
            stage_id_on(self.cluster, others[n % len(others)], principal, f"{prefix}{n}")
            for n in range(count)
        ]
        assert all(
            self.cluster.primary_for_slot(stage_slot(principal, i)) != limits_on for i in ids
        )
        return ids

    def primaries(self) -> list[int]:
        assert self.cluster is not None
        primaries = self.cluster.primaries()
        assert len(primaries) == 3, primaries
        return primaries

    @contextmanager
    def checked(self) -> Iterator[Topology]:
        """The block's part of each host's log holds no traceback and no secret. A block
        that restarted the Redis leaves hosts that serve again (``serving``)."""
        offsets = {id(host): len(host.log()) for host in self.hosts}
        store = self.redis.proc.pid if self.redis is not None else None
        yield self
        for host in self.hosts:
            assert_clean_log(host.log()[offsets[id(host)] :], self.names.values())
        if self.redis is not None and self.redis.proc.pid != store:
            self.serving()

    def serving(self, timeout: float = 10) -> None:
        """Until each host starts a stage again, one request at a time (after its store was
        restarted, a host's first claim may meet a connection the old server closed)."""
        deadline = time.monotonic() + timeout
        for host in self.hosts:
            for n in itertools.count():
                answer = post_chat(
                    host.url, stage_id=f"serving-{host.port}-{n}-{time.monotonic_ns()}",
                    stream=False, headers=self.auth("alice"), timeout=timeout,
                )  # fmt: skip
                if answer.status_code == 200:
                    break
                assert time.monotonic() < deadline, f"{host.url} does not serve: {answer.text}"
                time.sleep(0.1)


def assert_clean_log(log: str, principals: Any) -> None:
    found = [sign for sign in FORBIDDEN_IN_LOGS if sign in log]
    found += [f"the key of {name}" for name in principals if secret_of(name) in log]
    assert not found, f"a host's log has {found}:\n{log}"


def host_env(fake: FakeUpstream, names: Mapping[str, str], store_url: str | None) -> dict[str, str]:
    """The environment of a topology's hosts."""
    keys = {name: {"key": secret_of(name), **ROLES[role]} for role, name in names.items()}
    env = {
        "STAGESERVER_UPSTREAM_URL": fake.url,
        "STAGESERVER_API_KEYS": json.dumps(keys),
        "STAGESERVER_HEARTBEAT_SECONDS": "1",
        "STAGESERVER_RESUME_GRACE_SECONDS": "1",
    }
    if store_url is not None:
        env |= {
            "STAGESERVER_STORE_URL": store_url,
            "STAGESERVER_OWNER_LEASE_SECONDS": str(LEASE_SECONDS),
            # A dead host's stages are continued as llama-server continues an answer.
            "STAGESERVER_UPSTREAM_CONTINUATION": "trailing",
        }
    return env


def cluster_names(group: RedisClusterGroup) -> dict[str, str]:
    """The principals on ``group``: each limited one's limits on the first primary."""
    first = group.primaries()[0]
    return {
        role: principal_on(group, first, role) if limits else role for role, limits in ROLES.items()
    }


class Topologies:
    """Every topology's hosts, started when first asked for and stopped by ``close``,
    which then checks their whole logs. A topology's hosts start side by side, and all
    of them stop side by side: each takes a second or two."""

    def __init__(self, fake: FakeUpstream) -> None:
        self._fake = fake
        self._started: dict[str, Topology] = {}
        self._hosts: list[Gunicorn] = []
        self._stores = ExitStack()

    def __getitem__(self, name: str) -> Topology:
        topology = self._started.get(name)
        if topology is None:
            topology = self._started[name] = self._start(name)
        return topology

    def _start_hosts(self, env: dict[str, str], count: int) -> list[Gunicorn]:
        with ThreadPoolExecutor(count) as pool:
            starting = [pool.submit(Gunicorn, env) for _ in range(count)]
        hosts = [future.result() for future in starting if future.exception() is None]
        self._hosts += hosts
        for future in starting:
            if (exc := future.exception()) is not None:
                raise exc
        return hosts

    def _start(self, name: str) -> Topology:
        if name == ONE_WORKER:
            names = {role: role for role in ROLES}
            env = host_env(self._fake, names, None)
            [host] = self._start_hosts(env, 1)
            return Topology(name, host, host, env, names)
        if name == REDIS:
            redis = RedisServer()
            self._stores.callback(redis.stop)
            names = {role: role for role in ROLES}
            env = host_env(self._fake, names, redis.url)
            a, b = self._start_hosts(env, 2)
            return Topology(name, a, b, env, names, redis=redis)
        if name == CLUSTER:
            cluster = self._stores.enter_context(RedisClusterGroup())
            names = cluster_names(cluster)
            env = host_env(self._fake, names, cluster.url)
            a, b = self._start_hosts(env, 2)
            return Topology(name, a, b, env, names, cluster=cluster)
        raise KeyError(f"no topology {name!r}: one of {TOPOLOGIES}")

    def close(self) -> None:
        """Stop every host, then every store; then no host's log may hold a traceback or
        a key."""
        try:
            if self._hosts:
                with ThreadPoolExecutor(len(self._hosts)) as pool:
                    list(pool.map(Gunicorn.stop, self._hosts))
        finally:
            self._stores.close()
        for topology in self._started.values():
            for host in topology.hosts:
                assert_clean_log(host.log(), topology.names.values())

    def __enter__(self) -> Topologies:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
