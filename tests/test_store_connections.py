"""A worker holds a few Redis connections, whatever its load: at most
``STAGESERVER_STORE_MAX_CONNECTIONS`` per node for commands, and the cancel listener's
one subscription (store/connection.py). Counted from Redis's side (``CLIENT LIST``, by
the name each connection gives, ``connection.client_name``), through a burst of stages
on an app in this process and after it, on one redis-server and on a Redis Cluster; the
gauge ``stageserver_store_connections`` says the same. With every connection taken and
Redis silent, a new stage is refused with the store's 503, never left to hang."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from flask import Flask

from stageserver import create_app
from stageserver.errors import ConfigError
from stageserver.manager import manager_of
from stageserver.store.connection import client_name
from stageserver.store.mirror import RedisStageStore
from testing.fake_upstream import FakeUpstream
from testing.metrics import scrape
from testing.servers import RedisClusterGroup, RedisServer

BOUND = 4  # below the default, so that a burst would pass it, were it not held
BURST = 100
PRINCIPAL = "burst"
SECRET = "sk-burst-connections"
# Streams long enough to overlap: the burst is at its peak while they all run.
MODEL = "fake?chunks=10&interval=0.05"


def _clients(ports: list[int]) -> dict[int, Any]:
    return {port: redis.Redis(port=port) for port in ports}


def _held(clients: dict[int, Any]) -> dict[int, int]:
    """This process's store connections on each node, as the node counts them."""
    name = client_name()
    return {
        port: sum(1 for c in client.client_list() if c["name"] == name)
        for port, client in clients.items()
    }


class _Peak:
    """The most connections each node counted, sampled until stopped."""

    def __init__(self, clients: dict[int, Any]) -> None:
        self._clients = clients
        self.most = dict.fromkeys(clients, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            for port, count in _held(self._clients).items():
                self.most[port] = max(self.most[port], count)

    def stop(self) -> dict[int, int]:
        self._stop.set()
        self._thread.join(10)
        return self.most


def _app(url: str, upstream: FakeUpstream, bound: int = BOUND) -> Flask:
    return create_app(
        {
            "STAGESERVER_UPSTREAM_URL": upstream.url,
            "STAGESERVER_STORE_URL": url,
            "STAGESERVER_STORE_MAX_CONNECTIONS": bound,
            # An admission with every stage: the limits' script rides the batch too.
            "STAGESERVER_API_KEYS": json.dumps(
                {PRINCIPAL: {"key": SECRET, "max_streams": 1000, "requests_per_minute": 10000}}
            ),
        }
    )


def _store(app: Flask) -> RedisStageStore:
    store = manager_of(app.extensions).store
    assert isinstance(store, RedisStageStore)
    return store


def _burst(app: Flask, prefix: str) -> list[str]:
    """``BURST`` stages at once, each read to its end: the terminal event of each."""
    ends: list[str] = [""] * BURST
    start = threading.Barrier(BURST)

    def one(index: int) -> None:
        client = app.test_client()
        start.wait()
        body = {
            "model_name": MODEL,
            "user_prompt": "hi",
            "stage_id": f"{prefix}-{index}",
            "stream": True,
        }
        response = client.post("/chat", json=body, headers={"Authorization": f"Bearer {SECRET}"})
        ends[index] = f"{response.status_code} " + (
            "done" if b"event: done" in response.data else response.get_data(as_text=True)
        )

    threads = [threading.Thread(target=one, args=(i,)) for i in range(BURST)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return ends


def _gauge(app: Flask) -> dict[tuple[str, str], float]:
    """This process's ``stageserver_store_connections``, by node and kind, as the store
    last told it (every second)."""
    samples = scrape(app.test_client().get("/metrics").get_data(as_text=True))
    return {
        (dict(labels)["node"], dict(labels)["kind"]): sample
        for (name, labels), sample in samples.items()
        if name == "stageserver_store_connections"
    }


def _gauge_settles(app: Flask, ports: list[int], clients: dict[int, Any]) -> None:
    """The gauge comes to say what each node counts (it is told every second)."""
    for _ in range(100):
        held = _held(clients)
        gauge = _gauge(app)
        told = {
            port: sum(v for (node, _), v in gauge.items() if node == f"127.0.0.1:{port}")
            for port in ports
        }
        if told == held:
            return
        threading.Event().wait(0.1)
    raise AssertionError(f"the gauge says {gauge}, the nodes count {held}")


@pytest.fixture
def redis_alone() -> Iterator[RedisServer]:
    """A redis-server of the test's own: no other app of this process holds connections."""
    server = RedisServer()
    yield server
    server.stop()


def _burst_within_the_bound(
    app: Flask, clients: dict[int, Any], prefix: str
) -> tuple[dict[int, int], dict[int, int]]:
    """A burst on ``app``, every stage of it done: the most connections each node
    counted through it, and what each counts once the gauge says the same."""
    try:
        _store(app).start()
        peak = _Peak(clients)
        ends = _burst(app, prefix)
        most = peak.stop()
        assert ends == ["200 done"] * BURST
        _gauge_settles(app, list(clients), clients)
        return most, _held(clients)
    finally:
        manager_of(app.extensions).close()


@pytest.mark.processes
def test_a_burst_of_stages_holds_the_bound_and_the_gauge_says_so(
    upstream: FakeUpstream,
) -> None:
    password = "s3cret-of-the-store"
    server = RedisServer(args=["--requirepass", password])
    try:
        url = f"redis://:{password}@127.0.0.1:{server.port}/0"
        app = _app(url, upstream)
        clients = {server.port: redis.Redis(port=server.port, password=password)}
        most, held = _burst_within_the_bound(app, clients, "b")
        # Commands within the bound, and the cancel listener's one subscription.
        assert most[server.port] <= BOUND + 1, most
        assert held[server.port] <= BOUND + 1, held
        gauge = _gauge(app)
        node = f"127.0.0.1:{server.port}"
        assert gauge[node, "subscription"] == 1
        assert 1 <= gauge[node, "commands"] <= BOUND
        # The node by its address: the URL's password is in no label.
        exposed = app.test_client().get("/metrics").get_data(as_text=True)
        assert password not in exposed
    finally:
        server.stop()


@pytest.mark.processes
def test_a_burst_on_a_cluster_holds_the_bound_on_every_node(
    upstream: FakeUpstream,
) -> None:
    with RedisClusterGroup() as cluster:
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in cluster.ports)
        ports = cluster.primaries()
        most, held = _burst_within_the_bound(_app(url, upstream), _clients(ports), "c")
    # Stages on every node, each within the bound (one node has the subscription).
    assert all(1 <= most[port] <= BOUND + 1 for port in ports), most
    assert all(held[port] <= BOUND + 1 for port in ports), held


@pytest.mark.processes
def test_with_every_connection_taken_and_redis_silent_a_stage_is_refused_not_left_to_hang(
    redis_alone: RedisServer, upstream: FakeUpstream
) -> None:
    """Every connection of the bound is in use (taken here, as stuck callers would hold
    them) and Redis answers nothing (``CLIENT PAUSE``): a new stage waits for a connection
    no longer than the store's wait, then gets the store's 503."""
    app = _app(redis_alone.url, upstream, bound=2)
    admin = redis.Redis(port=redis_alone.port)
    store = _store(app)
    pool = store.batcher.client.connection_pool
    taken = [pool.get_connection() for _ in range(2)]
    answer: list[Any] = []

    def start() -> None:
        body = {"model_name": "fake", "user_prompt": "hi", "stage_id": "stuck-1"}
        answer.append(
            app.test_client().post(
                "/chat", json=body, headers={"Authorization": f"Bearer {SECRET}"}
            )
        )

    try:
        admin.client_pause(10_000)  # longer than any wait the store allows itself
        thread = threading.Thread(target=start, daemon=True)
        thread.start()
        thread.join(60)  # a hang guard, not a timing: the store gives up long before
        assert answer, "a stage start hung on the store"
        [refused] = answer
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "1"
        assert "the stage store (Redis) is unavailable" in refused.get_data(as_text=True)
        assert "connections this worker may hold" in refused.get_data(as_text=True)
        admin.client_unpause()
        for connection in taken:
            pool.release(connection)
        taken.clear()
        # The bound given back, the next stage runs.
        body = {"model_name": "fake", "user_prompt": "hi", "stage_id": "stuck-2", "stream": True}
        again = app.test_client().post(
            "/chat", json=body, headers={"Authorization": f"Bearer {SECRET}"}
        )
        assert again.status_code == 200 and b"event: done" in again.data
        assert _held(_clients([redis_alone.port]))[redis_alone.port] <= 2 + 1
    finally:
        admin.client_unpause()
        for connection in taken:
            pool.release(connection)
        manager_of(app.extensions).close()


@pytest.mark.parametrize("bound", [0, -1, 1.5, "eight", True])
def test_a_bound_that_is_not_a_whole_number_from_1_is_refused(
    upstream: FakeUpstream, bound: Any
) -> None:
    with pytest.raises(ConfigError) as refused:
        create_app(
            {
                "STAGESERVER_UPSTREAM_URL": upstream.url,
                "STAGESERVER_STORE_URL": "redis://127.0.0.1:1/0",
                "STAGESERVER_STORE_MAX_CONNECTIONS": bound,
            }
        )
    assert "STAGESERVER_STORE_MAX_CONNECTIONS must be a whole number from 1 up" in str(
        refused.value
    )
