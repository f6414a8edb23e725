"""Stages on a Redis Cluster (``STAGESERVER_STORE_URL=redis+cluster://...``): two gunicorn
hosts, A and B, on a loopback cluster of three primaries (``RedisClusterGroup``), each
stage's keys on the primary its id chooses, and each principal's limits on the primary
its name chooses.

What a client sees is what it sees on one Redis: every event once, in order, whichever
host it asks and whichever shard holds the stage; while a slot moves and while a primary
fails over, too. A ``redis://`` URL that names a cluster node refuses to start."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from redis.crc import key_slot

from stageserver.store.connection import stage_keys
from testing.fake_upstream import FakeUpstream
from testing.hosts import kill_host, worker_of
from testing.servers import (
    ROOT,
    VENV_BIN,
    Gunicorn,
    RedisClusterGroup,
    free_port,
    gunicorn_args,
    gunicorn_server,
)
from testing.sse import (
    assert_each_once,
    assert_resumed_exactly_once,
    assert_whole_once,
    estimated_usage,
    ids_of,
    parse_events,
    post_chat,
    read_rest,
    seq,
    stage_status,
    terminal,
    toks,
    wait_for_status,
    with_ids,
)
from testing.takeover import assert_continued_from_the_durable_text, continuations

LEASE = 2  # STAGESERVER_OWNER_LEASE_SECONDS, as in tests/test_takeover.py
ALICE_KEY = "alice-key-0123456789"
ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}


# -- where a key lives --------------------------------------------------------------------


def stage_slot(principal: str, stage_id: str) -> int:
    """The slot of a stage's keys: ``ss:{<principal>/<stage id>}...``."""
    return key_slot(stage_keys(f"{principal}/{stage_id}")[0].encode())


def limits_slot(principal: str) -> int:
    """The slot of a principal's limit keys: ``ss:limits:{<principal>}:...``."""
    return key_slot(f"ss:limits:{{{principal}}}:streams".encode())


def owner(ranges: list[tuple[int, int, int]], slot: int) -> int:
    [port] = [port for first, last, port in ranges if first <= slot <= last]
    return port


def stage_id_on(group: RedisClusterGroup, port: int, principal: str, prefix: str) -> str:
    """A stage id that starts with ``prefix`` whose keys live on the primary on ``port``."""
    ranges = group.slots()
    for n in range(10_000):
        stage_id = f"{prefix}-{n}"
        if owner(ranges, stage_slot(principal, stage_id)) == port:
            return stage_id
    raise AssertionError(f"no id {prefix}-<n> on {port}")


def principal_on(group: RedisClusterGroup, port: int, prefix: str) -> str:
    """A principal's name that starts with ``prefix`` whose limits live on ``port``."""
    ranges = group.slots()
    for n in range(10_000):
        name = f"{prefix}{n}"
        if owner(ranges, limits_slot(name)) == port:
            return name
    raise AssertionError(f"no name {prefix}<n> on {port}")


# -- the hosts ----------------------------------------------------------------------------


@dataclass
class Cluster:
    """The module's cluster, its hosts, and its principals: ``alice`` (no limit), ``solo``
    (one stream at a time) and ``tok`` (10 tokens a minute), whose limits live on the
    first primary."""

    group: RedisClusterGroup
    a: Gunicorn
    b: Gunicorn
    keys: dict[str, dict[str, Any]]
    solo: str
    tok: str

    def auth(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[name]['key']}"}


def host_env(fake: FakeUpstream, store_url: str, keys: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {
        "STAGESERVER_UPSTREAM_URL": fake.url,
        "STAGESERVER_STORE_URL": store_url,
        "STAGESERVER_API_KEYS": json.dumps(keys),
        "STAGESERVER_OWNER_LEASE_SECONDS": str(LEASE),
        "STAGESERVER_HEARTBEAT_SECONDS": "1",
        "STAGESERVER_RESUME_GRACE_SECONDS": "30",
        "STAGESERVER_UPSTREAM_CONTINUATION": "trailing",
    }


def principals(group: RedisClusterGroup) -> tuple[dict[str, dict[str, Any]], str, str]:
    first = group.primaries()[0]
    solo, tok = principal_on(group, first, "solo"), principal_on(group, first, "tok")
    keys: dict[str, dict[str, Any]] = {
        "alice": {"key": ALICE_KEY},
        solo: {"key": f"{solo}-key-0123456789", "max_streams": 1},
        tok: {"key": f"{tok}-key-0123456789", "tokens_per_minute": 10},
    }
    return keys, solo, tok


@pytest.fixture(scope="module")
def cluster(fake: FakeUpstream, redis_cluster: RedisClusterGroup) -> Iterator[Cluster]:
    keys, solo, tok = principals(redis_cluster)
    env = host_env(fake, redis_cluster.url, keys)
    with gunicorn_server(env) as a, gunicorn_server(env) as b:
        yield Cluster(redis_cluster, a, b, keys, solo, tok)


@pytest.fixture
def trailing(upstream: FakeUpstream) -> Iterator[FakeUpstream]:
    """The fake upstream, continuing a trailing assistant message (as llama-server does)."""
    upstream.defaults["continuation"] = "trailing"
    yield upstream
    upstream.defaults.clear()  # the fake is the session's


SERVER_ERROR = re.compile(r'HTTP/1\.[01]" 500 ')


def assert_clean(log: str) -> None:
    """No traceback and no 500 in (a part of) a host's log."""
    assert "Traceback" not in log, log
    assert not SERVER_ERROR.search(log), log


# -- every shard --------------------------------------------------------------------------


def test_a_stage_on_every_primary_is_resumed_and_cancelled_through_the_other_host(
    cluster: Cluster, upstream: FakeUpstream
) -> None:
    a, b, group = cluster.a, cluster.b, cluster.group
    primaries = group.primaries()
    assert len(primaries) == 3
    for port in primaries:
        stage_id = stage_id_on(group, port, "alice", "every")
        stream = post_chat(
            a.url, stage_id=stage_id, model_name="fake?chunks=40&interval=0.02",
            resumable=True, headers=ALICE, open=True,
        )  # fmt: skip
        stream.read_until(b"event: chat_completion_chunk", 5)
        stream.close()
        got = with_ids(stream.events())

        status = stage_status(b.url, stage_id, ALICE)
        assert status["status"] in ("running", "done"), (port, status)
        rest = requests.get(
            f"{b.url}/stages/{stage_id}/events",
            headers={**ALICE, "Last-Event-ID": got[-1]["id"]},
            timeout=30,
        )
        assert rest.status_code == 200, (port, rest.text)
        assert_resumed_exactly_once(stage_id, got, parse_events(rest.content), 40)
        final = stage_status(b.url, stage_id, ALICE)
        assert (final["status"], final["text"]) == ("done", toks(40)), port

        long_id = stage_id_on(group, port, "alice", "cancel")
        stream = post_chat(
            a.url, stage_id=long_id, model_name="fake?chunks=2000&interval=0.02",
            headers=ALICE, open=True,
        )  # fmt: skip
        stream.read_until(b"event: chat_completion_chunk")
        cancel = requests.post(f"{b.url}/stages/{long_id}/cancel", headers=ALICE, timeout=5)
        assert cancel.status_code == 202, (port, cancel.text)
        events = stream.read_to_end()
        assert_each_once(long_id, events, "cancel")
        chunks = len(ids_of(events)) - 1
        assert terminal(events)[0]["data"] == {
            "stage_id": long_id,
            "reason": "cancelled by request",
            "usage": estimated_usage(chunks),
        }
        cancelled = wait_for_status(b.url, long_id, "cancelled", headers=ALICE)
        assert cancelled["cancel_reason"] == "cancelled by request"


# -- limits across shards -----------------------------------------------------------------


def test_max_streams_holds_across_hosts_when_the_limit_and_the_stages_are_on_other_shards(
    cluster: Cluster, upstream: FakeUpstream
) -> None:
    a, b, group, solo = cluster.a, cluster.b, cluster.group, cluster.solo
    limits_on = group.primary_for_slot(limits_slot(solo))
    first_shard, second_shard = [p for p in group.primaries() if p != limits_on]
    first = stage_id_on(group, first_shard, solo, "first")
    second = stage_id_on(group, second_shard, solo, "second")
    third = stage_id_on(group, second_shard, solo, "third")
    headers = cluster.auth(solo)

    stream = post_chat(
        a.url, stage_id=first, model_name="fake?chunks=2000&interval=0.02", headers=headers,
        open=True,
    )  # fmt: skip
    stream.read_until(b"event: chat_completion_chunk")
    over = post_chat(b.url, stage_id=second, headers=headers)
    assert over.status_code == 429, over.text
    assert over.headers["Retry-After"] == "1"
    assert (over.json()["limit"], over.json()["principal"]) == ("max_streams", solo)
    assert len(upstream.requests) == 1  # refused before any upstream call

    stream.close()  # not resumable: its stage is cancelled, its slot given back
    status = wait_for_status(b.url, first, "cancelled", headers=headers)
    assert status["cancel_reason"] == "client disconnected"
    deadline = time.monotonic() + 1.0
    while True:
        response = post_chat(b.url, stage_id=third, headers=headers, stream=False)
        if response.status_code == 200:
            assert response.json()["type"] == "text"
            break
        assert response.status_code == 429, response.text
        assert time.monotonic() < deadline, "the slot was not given back within 1 s"
        time.sleep(0.05)


def test_tokens_per_minute_counts_across_hosts_when_the_limit_and_the_stages_are_on_other_shards(
    cluster: Cluster,
) -> None:
    a, b, group, tok = cluster.a, cluster.b, cluster.group, cluster.tok
    limits_on = group.primary_for_slot(limits_slot(tok))
    shards = [p for p in group.primaries() if p != limits_on]
    headers = cluster.auth(tok)
    # The fake upstream reports 1 prompt token ("hi") and one per chunk: 6 each.
    first = post_chat(
        a.url, stage_id=stage_id_on(group, shards[0], tok, "t1"), model_name="fake?chunks=5",
        headers=headers,
    )  # fmt: skip
    assert terminal(parse_events(first.content))[0]["data"]["usage"] == {
        "prompt_tokens": 1,
        "completion_tokens": 5,
        "total_tokens": 6,
    }
    second = post_chat(b.url, stage_id=stage_id_on(group, shards[1], tok, "t2"), headers=headers)
    assert second.status_code == 200  # 6 < 10
    refused = post_chat(a.url, stage_id=stage_id_on(group, shards[0], tok, "t3"), headers=headers)
    assert refused.status_code == 429  # 12 >= 10
    assert refused.json()["limit"] == "tokens_per_minute"


# -- a host dies --------------------------------------------------------------------------


def follow(url: str, headers: dict[str, str], marker: bytes) -> tuple[bytes, float | None]:
    """A whole follow's bytes, and when ``marker`` first arrived."""
    response = requests.get(url, headers=headers, stream=True, timeout=60)
    assert response.status_code == 200, response.text
    wire, seen_at = b"", None
    for piece in response.iter_content(None):
        wire += piece
        if seen_at is None and marker in wire:
            seen_at = time.monotonic()
    return wire, seen_at


def test_a_stage_of_a_killed_host_is_continued_on_the_other_each_event_once(
    trailing: FakeUpstream, cluster: Cluster
) -> None:
    # A of its own, killed; B watches. The module's hosts (B, and its A) live on: one of
    # them takes the stage over.
    group, b, survivors = cluster.group, cluster.b, (cluster.a, cluster.b)
    a = Gunicorn(host_env(trailing, group.url, cluster.keys))
    try:
        a_worker = worker_of(a)
        counted = sum(continuations(host) for host in survivors)
        stage_id = stage_id_on(group, group.primaries()[1], "alice", "t-kill")
        headers = {**ALICE, "X-Request-ID": stage_id}
        stream = post_chat(
            a.url, stage_id=stage_id, model_name="fake?chunks=60&interval=0.05",
            resumable=True, headers=headers, open=True,
        )  # fmt: skip
        with ThreadPoolExecutor(1) as pool:
            watcher = pool.submit(
                follow, f"{b.url}/stages/{stage_id}/events", ALICE, b"event: continued"
            )
            stream.read_until(b"event: chat_completion_chunk", 20)
            killed_at = time.monotonic()
            kill_host(a)
            got_on_a = with_ids(read_rest(stream))
            wire, continued_at = watcher.result(timeout=60)
    finally:
        a.stop()
    watched = parse_events(wire)

    continued = assert_whole_once(stage_id, watched, 60)
    assert continued_at is not None
    assert continued_at - killed_at < 2 * LEASE + 4, continued_at - killed_at
    delivered = assert_continued_from_the_durable_text(trailing, stage_id)
    before = watched[: watched.index(continued)]
    assert len([e for e in before if e.get("event") == "chat_completion_chunk"]) == delivered
    assert continued["data"] == {
        "stage_id": stage_id,
        "after": seq(continued) - 1,
        "reason": "owner_lost",
        "mode": "trailing",
        "model": "fake?chunks=60&interval=0.05",
    }
    # A's client got only what the log held: the watcher's first events, exactly.
    assert got_on_a and got_on_a == with_ids(watched)[: len(got_on_a)]

    status = stage_status(b.url, stage_id, ALICE)
    assert (status["status"], status["text"]) == ("done", toks(60))
    [record] = status["continuations"]
    assert {k: record[k] for k in ("after", "reason", "mode", "outcome")} == {
        "after": seq(continued) - 1,
        "reason": "owner_lost",
        "mode": "trailing",
        "outcome": "ok",
    }
    assert record["from_worker"] == a_worker
    assert record["to_worker"] in [worker_of(host) for host in survivors]

    rest = requests.get(
        f"{b.url}/stages/{stage_id}/events",
        headers={**ALICE, "Last-Event-ID": got_on_a[-1]["id"]},
        timeout=30,
    )
    assert rest.status_code == 200
    assert_whole_once(stage_id, got_on_a + parse_events(rest.content), 60)
    assert sum(continuations(host) for host in survivors) == counted + 1


# -- a slot moves -------------------------------------------------------------------------


def statuses_for(url: str, stage_id: str, seconds: float) -> list[int]:
    """Ask for a stage's status every 50 ms for ``seconds``: the HTTP statuses."""
    codes = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        codes.append(
            requests.get(f"{url}/stages/{stage_id}", headers=ALICE, timeout=10).status_code
        )
        time.sleep(0.05)
    return codes


def test_a_slot_migrated_key_by_key_mid_stream_loses_no_event_and_fails_no_request(
    cluster: Cluster, upstream: FakeUpstream
) -> None:
    a, b, group = cluster.a, cluster.b, cluster.group
    logs_from = (len(a.log()), len(b.log()))
    source, target = group.primaries()[:2]
    stage_id = stage_id_on(group, source, "alice", "moved")
    slot = stage_slot("alice", stage_id)
    hash_key, log_key, _, _ = stage_keys(f"alice/{stage_id}")
    source_id, target_id = group.node_id(source), group.node_id(target)

    stream = post_chat(
        a.url, stage_id=stage_id, model_name="fake?chunks=400&interval=0.02",
        resumable=True, headers=ALICE, open=True,
    )  # fmt: skip
    stream.read_until(b"event: chat_completion_chunk", 5)
    got = with_ids(stream.events())[:5]
    codes: list[int] = []
    moved: list[bytes] = []
    with ThreadPoolExecutor(2) as pool:
        on_a = pool.submit(stream.read_to_end)
        # A client of B's resumes before the slot moves, and reads on while it moves.
        resumed = pool.submit(
            lambda: requests.get(
                f"{b.url}/stages/{stage_id}/events",
                headers={**ALICE, "Last-Event-ID": got[-1]["id"]},
                timeout=60,
            )
        )
        src, dst = group.client(source), group.client(target)
        try:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            deadline = time.monotonic() + 30
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                assert time.monotonic() < deadline, keys
                # One at a time, the stage writing meanwhile; its log first, for the
                # longest window in which the log is on the importing node while the
                # source still owns the slot: ASK for a write or a read of the log,
                # TRYAGAIN for a script over the hash and the lease, split between the
                # two nodes.
                for key in sorted(keys, key=lambda key: key != log_key.encode()):
                    src.execute_command("MIGRATE", "127.0.0.1", target, key, 0, 5000)
                    moved.append(key)
                    codes += statuses_for(b.url, stage_id, 0.3)
            # Every key moved, the slot still the source's, as while a slot's other keys
            # move: longer than a follower's blocking XREAD (1 s), so that its next one
            # meets the ASK, and than a lease, which the owner renews through the ASK.
            codes += statuses_for(b.url, stage_id, LEASE + 1)
            others = [p for p in group.primaries() if p not in (source, target)]
            for port in [target, source, *others]:
                client = group.client(port)
                try:
                    client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
                finally:
                    client.close()
        finally:
            src.close()
            dst.close()
        codes += statuses_for(b.url, stage_id, 0.3)
        events = on_a.result(timeout=60)
        during = resumed.result(timeout=60)

    assert {hash_key.encode(), log_key.encode()} <= set(moved), moved
    assert group.primary_for_slot(slot) == target
    assert_each_once(stage_id, events, "done")
    assert during.status_code == 200, during.text
    assert_resumed_exactly_once(stage_id, got, parse_events(during.content), 400)
    after = requests.get(
        f"{b.url}/stages/{stage_id}/events",
        headers={**ALICE, "Last-Event-ID": got[-1]["id"]},
        timeout=30,
    )
    assert after.status_code == 200, after.text
    assert_resumed_exactly_once(stage_id, got, parse_events(after.content), 400)
    status = stage_status(b.url, stage_id, ALICE)
    assert (status["status"], status["text"], status.get("gap")) == ("done", toks(400), None)
    print(f"status codes while the slot moved: {sorted(set(codes))} of {len(codes)}")
    assert 500 not in codes, codes
    assert_clean(a.log()[logs_from[0] :])
    assert_clean(b.log()[logs_from[1] :])


# -- a primary fails over -----------------------------------------------------------------


def test_a_failover_of_the_primary_that_holds_a_running_stage_loses_no_event(
    fake: FakeUpstream, upstream: FakeUpstream
) -> None:
    with RedisClusterGroup(primaries=3, replicas_per_primary=1) as group:
        keys, _, _ = principals(group)
        env = host_env(fake, group.url, keys)
        with gunicorn_server(env) as a, gunicorn_server(env) as b:
            primary = group.primaries()[0]
            [replica] = group.replicas_of(primary)
            stage_id = stage_id_on(group, primary, "alice", "fo")
            stream = post_chat(
                a.url, stage_id=stage_id, model_name="fake?chunks=80&interval=0.05",
                resumable=True, headers=ALICE, open=True,
            )  # fmt: skip
            stream.read_until(b"event: chat_completion_chunk", 10)
            group.kill(primary)
            events = stream.read_to_end()  # the stage in flight finishes
            assert_each_once(stage_id, events, "done")
            got = with_ids(events)[:5]
            deadline = time.monotonic() + 30
            while True:  # once the replica is primary, and the mirror has caught up
                try:
                    if stage_status(b.url, stage_id, ALICE).get("status") == "done":
                        break
                except (ValueError, requests.RequestException):
                    pass
                assert time.monotonic() < deadline, "the stage never reached the new primary"
                time.sleep(0.2)
            assert group.primary_for_slot(stage_slot("alice", stage_id)) == replica
            rest = requests.get(
                f"{b.url}/stages/{stage_id}/events",
                headers={**ALICE, "Last-Event-ID": got[-1]["id"]},
                timeout=10,
            )
            assert rest.status_code == 200, rest.text
            after = parse_events(rest.content)
            if after and after[-1].get("event") == "error" and "id" not in after[-1]:
                # The failover lost events that A no longer held: said, never skipped.
                gap = stage_status(b.url, stage_id, ALICE)["gap"]
                assert gap and gap in after[-1]["data"]["error"], (gap, after[-1])
                resumed = ids_of(after)
                first = seq(got[-1]) + 1
                assert resumed == [
                    f"{stage_id}-chunk-{n}" for n in range(first, first + len(resumed))
                ]
            else:
                assert_resumed_exactly_once(stage_id, got, after, 80)
                print("the failover lost no event")


# -- round trips --------------------------------------------------------------------------


def commandstats(group: RedisClusterGroup) -> dict[str, int]:
    """Calls per command, summed over the cluster's live nodes."""
    calls: dict[str, int] = {}
    for port in group.live_ports():
        client = group.client(port)
        try:
            for name, stats in client.info("commandstats").items():
                calls[name] = calls.get(name, 0) + int(stats["calls"])
        finally:
            client.close()
    return calls


def test_a_stage_and_a_remote_follower_send_no_command_getkeys_and_no_script_exists(
    cluster: Cluster, upstream: FakeUpstream
) -> None:
    a, b, group = cluster.a, cluster.b, cluster.group
    chunks = 250
    stage_id = stage_id_on(group, group.primaries()[2], "alice", "trips")
    for port in group.live_ports():
        client = group.client(port)
        try:
            client.config_resetstat()
        finally:
            client.close()
    started = time.monotonic()
    stream = post_chat(
        a.url, stage_id=stage_id, model_name=f"fake?chunks={chunks}&interval=0.02",
        headers=ALICE, open=True,
    )  # fmt: skip
    stream.read_until(b"event: chat_completion_chunk")
    with ThreadPoolExecutor(1) as pool:
        followed = pool.submit(
            lambda: requests.get(f"{b.url}/stages/{stage_id}/events", headers=ALICE, timeout=60)
        )
        events = stream.read_to_end()
        watched = followed.result(timeout=60)
    elapsed = time.monotonic() - started
    assert_each_once(stage_id, events, "done")
    assert watched.status_code == 200, watched.text
    assert with_ids(parse_events(watched.content)) == with_ids(events)

    calls = commandstats(group)
    written = len(with_ids(events))
    xadd, evalsha = calls.get("cmdstat_xadd", 0), calls.get("cmdstat_evalsha", 0)
    print(
        f"{chunks} chunks, {written} events in {elapsed:.1f} s: {evalsha} EVALSHA "
        f"({evalsha / chunks:.2f} a chunk), {xadd} XADD ({xadd / chunks:.2f} a chunk), "
        f"{calls.get('cmdstat_xread', 0)} XREAD; all: {sorted(calls.items())}"
    )
    assert calls.get("cmdstat_command|getkeys", 0) == 0, calls
    assert calls.get("cmdstat_script|exists", 0) == 0, calls
    # A sanity bound on one write per stage per flush: at most a write (XADD or EVALSHA)
    # and one more command per chunk, the lease renewals included.
    assert xadd + evalsha <= 2 * chunks, calls


# -- misconfiguration ---------------------------------------------------------------------


def test_a_redis_url_that_names_a_cluster_node_refuses_to_start(
    fake: FakeUpstream, redis_cluster: RedisClusterGroup
) -> None:
    node = redis_cluster.ports[0]
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("STAGESERVER_")},
        "STAGESERVER_BIND": f"127.0.0.1:{port}",
        "STAGESERVER_WORKERS": "1",
        "STAGESERVER_UPSTREAM_URL": fake.url,
        "STAGESERVER_STORE_URL": f"redis://127.0.0.1:{node}/0",
    }
    proc = subprocess.Popen(
        [str(VENV_BIN / "python"), "-m", "gunicorn", *gunicorn_args(ROOT)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        output, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
        pytest.fail(
            "gunicorn still ran 20 s after it started on a cluster node's redis:// URL:\n"
            + output.decode(errors="replace")
        )
    log = output.decode(errors="replace")
    assert proc.returncode != 0, log
    assert "redis+cluster://" in log, log
