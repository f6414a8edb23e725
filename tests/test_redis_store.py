"""Stages shared by two gunicorn hosts through one real redis-server: what only a shared
store does (an id unique across hosts, Redis lost and restarted under a running stage),
and the store's parts in-process. Resuming, watching, cancelling and the grace are
``test_stage_api.py``'s, on every topology, and limits ``test_limits.py``'s."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest
import redis
import requests

from stageserver import close, create_app
from stageserver.errors import ConfigError
from stageserver.launcher.supervisor import GUNICORN_ARGS
from stageserver.manager import manager_of
from stageserver.store.batch import Batcher, Command
from stageserver.store.connection import Reachability, connect
from stageserver.store.entries import events_of
from stageserver.store.keys import stage_keys
from stageserver.store.mirror import RedisStageStore
from testing.fake_upstream import FakeUpstream
from testing.servers import (
    ROOT,
    VENV_BIN,
    RedisServer,
    free_port,
)
from testing.sse import (
    assert_resumed_exactly_once,
    chunk_text,
    parse_events,
    post_chat,
    stage_status,
    terminal,
    toks,
    wait_for_status,
    with_ids,
)
from testing.threads import background_threads
from testing.topology import Topology


def test_a_live_stage_id_is_unique_across_instances(redis_hosts: Topology) -> None:
    a, b, alice = redis_hosts.start, redis_hosts.follow, redis_hosts.auth("alice")
    stream = post_chat(
        a.url, stage_id="x-dup", model_name="fake?prefill=30", headers=alice, open=True
    )
    try:
        wait_for_status(b.url, "x-dup", "running", headers=alice)
        response = post_chat(b.url, stage_id="x-dup", stream=False, headers=alice, timeout=5)
        assert response.status_code == 409
        assert response.json()["field"] == "stage_id"
    finally:
        requests.post(f"{b.url}/stages/x-dup/cancel", headers=alice, timeout=5)
        stream.close()


@pytest.mark.parametrize("model", ["fake?chunks=2", "fake?mode=status&status=500"])
def test_a_finished_stage_id_is_free_on_every_host_once_its_client_has_the_end(
    redis_hosts: Topology, model: str
) -> None:
    hosts = [redis_hosts.start, redis_hosts.follow]
    for round_ in range(10):  # the id passes from host to host, each reusing it at once
        here = hosts[round_ % 2]
        response = post_chat(
            here.url, stage_id="x-again", model_name=model, headers=redis_hosts.auth("alice"),
            timeout=5,
        )  # fmt: skip
        assert response.status_code == 200, (round_, response.text)
        assert terminal(parse_events(response.content))[0]["event"] in ("done", "error")


def test_an_id_that_runs_here_is_not_claimed_again_after_redis_lost_it(
    redis_hosts: Topology,
) -> None:
    a, redis_server, alice = redis_hosts.start, redis_hosts.redis, redis_hosts.auth("alice")
    assert redis_server is not None
    # In its prefill: no event to write, so nothing gives the lease back to Redis soon.
    stream = post_chat(
        a.url, stage_id="x-lost", model_name="fake?prefill=2&chunks=3", headers=alice, open=True
    )
    redis_server.kill()
    redis_server.start()  # empty: the stage's lease and keys are gone
    again = post_chat(a.url, stage_id="x-lost", stream=False, headers=alice, timeout=10)
    assert again.status_code == 409
    assert again.json()["field"] == "stage_id"
    # The running stage kept its lease: it ends as it would have, and its id is free then.
    assert [e["event"] for e in terminal(stream.read_to_end())] == ["done"]
    assert (
        post_chat(a.url, stage_id="x-lost", stream=False, headers=alice, timeout=10).status_code
        == 200
    )


def test_a_redis_restart_ends_no_healthy_stream_and_the_mirror_catches_up(
    redis_hosts: Topology, upstream: FakeUpstream
) -> None:
    a, b, alice = redis_hosts.start, redis_hosts.follow, redis_hosts.auth("alice")
    redis_server = redis_hosts.redis
    assert redis_server is not None
    stream = post_chat(
        a.url, stage_id="x-down", model_name="fake?chunks=60&interval=0.05", headers=alice,
        open=True,
    )  # fmt: skip
    stream.read_until(b"event: chat_completion_chunk", 2)
    watcher = requests.get(f"{b.url}/stages/x-down/events", headers=alice, stream=True, timeout=30)
    redis_server.kill()  # it keeps nothing: it comes back empty
    try:
        # What needs Redis fails, each with a word: the watcher through B ...
        watcher_end = terminal(parse_events(watcher.content))
        assert [e["event"] for e in watcher_end] == ["error"]
        assert "the stage store (Redis) is unavailable" in watcher_end[0]["data"]["error"]
        assert "id" not in watcher_end[0]  # this response's end, not the stage's
        # ... and a new stage, which needs its id claimed.
        refused = post_chat(a.url, stage_id="x-refused", stream=False, headers=alice, timeout=10)
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "1"
    finally:
        redis_server.start()
    # The stage's own client never noticed.
    events = stream.read_to_end()
    assert [e["event"] for e in terminal(events)] == ["done"]
    assert chunk_text(events) == toks(60)
    # The mirror caught up: a resume through B from the middle gets the rest exactly once.
    got = with_ids(events)[:10]
    deadline = time.monotonic() + 10
    while stage_status(b.url, "x-down", alice).get("status") != "done":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    rest = requests.get(
        f"{b.url}/stages/x-down/events",
        headers={**alice, "Last-Event-ID": got[-1]["id"]},
        timeout=10,
    )
    assert_resumed_exactly_once("x-down", got, parse_events(rest.content), 60)
    for server in (a, b):
        done = post_chat(
            server.url, stage_id=f"x-after-{server.port}", stream=False, headers=alice, timeout=10
        )
        assert done.status_code == 200
        assert done.json()["type"] == "text"


@pytest.mark.processes
def test_several_workers_without_a_store_refuse_to_start() -> None:
    result = subprocess.run(
        [str(VENV_BIN / "python"), "-m", "gunicorn", *GUNICORN_ARGS],
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "STAGESERVER_WORKERS": "2",
            "STAGESERVER_BIND": f"127.0.0.1:{free_port()}",
        },
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert b"STAGESERVER_WORKERS=2 needs a shared stage store" in result.stdout + result.stderr


def test_a_stage_of_a_worker_from_before_dialects_is_ended_in_the_seeds_words(
    redis_server: RedisServer, upstream: FakeUpstream
) -> None:
    """A rolling deploy: a worker of the earlier version claimed the stage (no record of
    its dialect in the hash) and died. A worker of this version ends it with the seed's
    error event, as before, not a 500."""
    keys = stage_keys("old-1")
    hash_key, log_key = keys.hash, keys.log
    client: Any = redis.Redis.from_url(redis_server.url)  # redis-py types results loosely
    summary = {"stage_id": "old-1", "status": "running", "events": 0}
    client.hset(hash_key, mapping={"status": "running", "summary": json.dumps(summary),
                                   "owner": "old-host:1", "prompt_tokens": 3})  # fmt: skip
    app = create_app(
        {
            "STAGESERVER_UPSTREAM_URL": upstream.url,
            "STAGESERVER_STORE_URL": redis_server.url,
            "STAGESERVER_OWNER_LEASE_SECONDS": 0.2,
        }
    )
    try:
        status = app.test_client().get("/stages/old-1")
        assert status.status_code == 200 and status.get_json()["status"] == "running"  # suspect
        time.sleep(0.15)  # past half a lease since it was first suspected
        status = app.test_client().get("/stages/old-1")
        assert status.status_code == 200
        assert status.get_json()["status"] == "error"
    finally:
        close(app)
    [(_, fields)] = client.xrange(log_key)
    [(seq, wire)], terminal = events_of(fields)
    assert seq == 0 and terminal
    assert wire.startswith(b"id: old-1-error-0\nevent: error\n")


def test_reading_a_stage_whose_owner_died_writes_nothing_until_it_is_reaped_by_name(
    redis_server: RedisServer, upstream: FakeUpstream
) -> None:
    """The reader only reads: its every question about a stage whose lease is gone leaves
    the stage as it was. The orphan is marked suspect by ``reap_orphan``, which a status
    or a cancel asks first, by name."""
    keys = stage_keys("orphan-1")
    client: Any = redis.Redis.from_url(redis_server.url)  # redis-py types results loosely
    summary = {"stage_id": "orphan-1", "status": "running", "events": 0}
    client.hset(keys.hash, mapping={"status": "running", "summary": json.dumps(summary),
                                    "owner": "gone-host:1", "prompt_tokens": 3})  # fmt: skip
    before = client.hgetall(keys.hash)
    app = create_app(
        {"STAGESERVER_UPSTREAM_URL": upstream.url, "STAGESERVER_STORE_URL": redis_server.url}
    )
    store = manager_of(app.extensions).store
    assert isinstance(store, RedisStageStore)
    try:
        reader = store.reader
        assert reader.summary("orphan-1") == {**summary, "text": ""}
        reader.check_cancellable("orphan-1", "orphan-1")
        assert (reader.answer("orphan-1"), reader.record("orphan-1")) == (None, None)
        assert (reader.first_kept("orphan-1"), reader.watchers("orphan-1")) == (0, 0)
        assert client.hgetall(keys.hash) == before
        store.reap_orphan("orphan-1", "orphan-1")
        assert client.hget(keys.hash, "suspect_since") is not None
    finally:
        close(app)


def test_closing_an_app_on_the_redis_store_ends_its_background_work(
    redis_server: RedisServer, upstream: FakeUpstream
) -> None:
    """``stageserver.close(app)`` stops the store's flusher, cancel listener, sweeper and
    lease renewal, and its continuation probe: no stageserver thread is left, none starts
    again, and the store answers StoreUnavailable (a 503) from then on."""
    before = background_threads()
    app = create_app(
        {"STAGESERVER_UPSTREAM_URL": upstream.url, "STAGESERVER_STORE_URL": redis_server.url}
    )
    try:
        client = app.test_client()
        # A stage claimed: the leases' renewal starts too.
        body = {"stage_id": "closing", "model_name": "fake", "user_prompt": "hi", "stream": False}
        assert client.post("/chat", json=body).status_code == 200
        running = {t.name for t in background_threads() - before}
        assert {"stageserver-store-flush", "stageserver-store-cancel", "stageserver-store-sweep",
                "stageserver-leases"} <= running  # fmt: skip
    finally:
        close(app)
    assert sorted(t.name for t in background_threads() - before) == []
    assert app.test_client().get("/stages/nothing-here").status_code == 503
    close(app)  # again: nothing to do
    assert sorted(t.name for t in background_threads() - before) == []


def test_redis_is_reachable_while_every_loop_reaches_it_and_each_change_is_told_once() -> None:
    """The flusher's writes and the sweeper's looks each say what they found; the store
    is unreachable while either fails (``stageserver_store_unavailable``)."""
    told: list[bool] = []
    reachability = Reachability(told.append)
    for loop, reached in [
        ("flusher", True),
        ("sweeper", False),  # unreachable
        ("flusher", False),
        ("sweeper", True),  # the flusher still fails
        ("flusher", True),  # reachable
        ("flusher", True),
    ]:
        reachability.found(loop, reached)
    assert told == [False, True]


class _Broken:
    """A lease whose renewal fails in a way no Redis error does."""

    def renew(self, lease_ms: int) -> list[Command]:
        raise RuntimeError("not a store error")

    def renewed(self, results: list[Any]) -> None:
        raise AssertionError("never reached")


class _Counted:
    """A lease that renews one key, and counts its renewals."""

    def __init__(self) -> None:
        self.renewals = 0

    def renew(self, lease_ms: int) -> list[Command]:
        return [Command("ss:test:counted", ("SET", "ss:test:counted", "1", "PX", lease_ms))]

    def renewed(self, results: list[Any]) -> None:
        self.renewals += 1


def test_the_lease_keeper_outlives_a_renewal_that_raises(redis_server: RedisServer) -> None:
    """The renewal loop is every lease's: one that raises what is not a store error is
    logged, and the loop goes on renewing."""
    from stageserver.store.leases import LeaseKeeper

    batcher = Batcher(redis.Redis.from_url(redis_server.url), ())
    keeper = LeaseKeeper(lambda: batcher, 0.3)
    broken, counted = _Broken(), _Counted()
    keeper.hold(broken)
    time.sleep(0.25)  # one pass fails with the broken lease alone
    keeper.release(broken)
    keeper.hold(counted)
    deadline = time.monotonic() + 5
    while counted.renewals < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    keeper.release(counted)
    keeper.stop()  # its renewal loop ends: the test leaves no thread behind
    batcher.close()
    assert counted.renewals >= 2


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("redis+cluster://127.0.0.1:7000,127.0.0.1:7001/2", "only database 0, not '2'"),
        ("redis+cluster:///run/redis.sock", "not through a unix socket"),
        ("rediss+cluster://127.0.0.1:7000,node-b", "cluster node 'node-b' must be host:port"),
    ],
)
def test_a_cluster_url_with_a_database_a_socket_or_no_port_is_refused(url: str, named: str) -> None:
    """Refused before any connection is tried, with a message that names the fault."""
    with pytest.raises(ConfigError) as refused:
        connect(url)
    assert named in str(refused.value)


def test_stageserver_check_refuses_a_plain_url_that_names_a_cluster_node(
    cluster_hosts: Topology,
) -> None:
    redis_cluster = cluster_hosts.cluster
    assert redis_cluster is not None
    url = f"redis://127.0.0.1:{redis_cluster.ports[0]}/0"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STAGESERVER_")}
    result = subprocess.run(
        [sys.executable, "-m", "stageserver", "check"],
        cwd=ROOT,
        env={**env, "STAGESERVER_STORE_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    named = f"name the cluster as redis+cluster://127.0.0.1:{redis_cluster.ports[0]}"
    assert "is a node of a Redis Cluster" in result.stderr and named in result.stderr
