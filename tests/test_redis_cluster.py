"""Stages on a Redis Cluster (``STAGESERVER_STORE_URL=redis+cluster://...``): the two
gunicorn hosts, A and B, on a loopback cluster of three primaries that the scenarios
share (``testing/topology.py``), each stage's keys on the primary its id chooses.

What a client sees is what it sees on one Redis: every event once, in order, whichever
host it asks and whichever shard holds the stage. Resuming, cancelling and the limits on
every shard are ``test_stage_api.py``'s and ``test_limits.py``'s, on every topology; here
is what only a cluster does: a host killed while its stage's shard is another's, a slot
that moves and a primary that fails over mid-stream, the round trips per node, and a
``redis://`` URL that names a cluster node, which refuses to start."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from stageserver.store.keys import stage_keys
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
from testing.shards import stage_id_on, stage_slot
from testing.sse import (
    assert_each_once,
    assert_resumed_exactly_once,
    assert_whole_once,
    ids_of,
    parse_events,
    post_chat,
    read_rest,
    seq,
    stage_status,
    toks,
    with_ids,
)
from testing.takeover import assert_continued_from_the_durable_text, continuations
from testing.topology import LEASE_SECONDS, Topology, cluster_names, host_env

SERVER_ERROR = re.compile(r'HTTP/1\.[01]" 500 ')


def assert_clean(log: str) -> None:
    """No traceback and no 500 in (a part of) a host's log."""
    assert "Traceback" not in log, log
    assert not SERVER_ERROR.search(log), log


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
    trailing: FakeUpstream, cluster_hosts: Topology
) -> None:
    # A of its own, killed; B watches. The shared hosts (B, and its A) live on: one of
    # them takes the stage over.
    group, b, survivors = cluster_hosts.cluster, cluster_hosts.follow, cluster_hosts.hosts
    assert group is not None
    alice = cluster_hosts.auth("alice")
    a = Gunicorn(cluster_hosts.env)
    try:
        a_worker = worker_of(a)
        counted = sum(continuations(host) for host in survivors)
        stage_id = stage_id_on(group, group.primaries()[1], "alice", "t-kill")
        headers = {**alice, "X-Request-ID": stage_id}
        stream = post_chat(
            a.url, stage_id=stage_id, model_name="fake?chunks=60&interval=0.05",
            resumable=True, headers=headers, open=True,
        )  # fmt: skip
        with ThreadPoolExecutor(1) as pool:
            watcher = pool.submit(
                follow, f"{b.url}/stages/{stage_id}/events", alice, b"event: continued"
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
    assert continued_at - killed_at < 2 * LEASE_SECONDS + 4, continued_at - killed_at
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

    status = stage_status(b.url, stage_id, alice)
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
        headers={**alice, "Last-Event-ID": got_on_a[-1]["id"]},
        timeout=30,
    )
    assert rest.status_code == 200
    assert_whole_once(stage_id, got_on_a + parse_events(rest.content), 60)
    assert sum(continuations(host) for host in survivors) == counted + 1


# -- a slot moves -------------------------------------------------------------------------


def statuses_for(url: str, stage_id: str, seconds: float, headers: dict[str, str]) -> list[int]:
    """Ask for a stage's status every 50 ms for ``seconds``: the HTTP statuses."""
    codes = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        codes.append(
            requests.get(f"{url}/stages/{stage_id}", headers=headers, timeout=10).status_code
        )
        time.sleep(0.05)
    return codes


def test_a_slot_migrated_key_by_key_mid_stream_loses_no_event_and_fails_no_request(
    cluster_hosts: Topology, upstream: FakeUpstream
) -> None:
    a, b, group = cluster_hosts.start, cluster_hosts.follow, cluster_hosts.cluster
    assert group is not None
    alice = cluster_hosts.auth("alice")
    logs_from = (len(a.log()), len(b.log()))
    source, target = group.primaries()[:2]
    stage_id = stage_id_on(group, source, "alice", "moved")
    slot = stage_slot("alice", stage_id)
    hash_key, log_key, _, _ = stage_keys(f"alice/{stage_id}")
    source_id, target_id = group.node_id(source), group.node_id(target)

    stream = post_chat(
        a.url, stage_id=stage_id, model_name="fake?chunks=400&interval=0.02",
        resumable=True, headers=alice, open=True,
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
                headers={**alice, "Last-Event-ID": got[-1]["id"]},
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
                    codes += statuses_for(b.url, stage_id, 0.3, alice)
            # Every key moved, the slot still the source's, as while a slot's other keys
            # move: longer than a follower's blocking XREAD (1 s), so that its next one
            # meets the ASK, and than a lease, which the owner renews through the ASK.
            codes += statuses_for(b.url, stage_id, LEASE_SECONDS + 1, alice)
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
        codes += statuses_for(b.url, stage_id, 0.3, alice)
        events = on_a.result(timeout=60)
        during = resumed.result(timeout=60)

    assert {hash_key.encode(), log_key.encode()} <= set(moved), moved
    assert group.primary_for_slot(slot) == target
    assert_each_once(stage_id, events, "done")
    assert during.status_code == 200, during.text
    assert_resumed_exactly_once(stage_id, got, parse_events(during.content), 400)
    after = requests.get(
        f"{b.url}/stages/{stage_id}/events",
        headers={**alice, "Last-Event-ID": got[-1]["id"]},
        timeout=30,
    )
    assert after.status_code == 200, after.text
    assert_resumed_exactly_once(stage_id, got, parse_events(after.content), 400)
    status = stage_status(b.url, stage_id, alice)
    assert (status["status"], status["text"], status.get("gap")) == ("done", toks(400), None)
    print(f"status codes while the slot moved: {sorted(set(codes))} of {len(codes)}")
    assert 500 not in codes, codes
    assert_clean(a.log()[logs_from[0] :])
    assert_clean(b.log()[logs_from[1] :])


# -- a primary fails over -----------------------------------------------------------------


@pytest.mark.processes
def test_a_failover_of_the_primary_that_holds_a_running_stage_loses_no_event(
    fake: FakeUpstream, upstream: FakeUpstream
) -> None:
    with RedisClusterGroup(primaries=3, replicas_per_primary=1) as group:
        names = cluster_names(group)
        env = host_env(fake, names, group.url)
        with gunicorn_server(env) as a, gunicorn_server(env) as b:
            alice = Topology("two hosts on a Redis Cluster with replicas", a, b, env, names,
                             cluster=group).auth("alice")  # fmt: skip
            primary = group.primaries()[0]
            [replica] = group.replicas_of(primary)
            stage_id = stage_id_on(group, primary, "alice", "fo")
            stream = post_chat(
                a.url, stage_id=stage_id, model_name="fake?chunks=80&interval=0.05",
                resumable=True, headers=alice, open=True,
            )  # fmt: skip
            stream.read_until(b"event: chat_completion_chunk", 10)
            group.kill(primary)
            events = stream.read_to_end()  # the stage in flight finishes
            assert_each_once(stage_id, events, "done")
            got = with_ids(events)[:5]
            deadline = time.monotonic() + 30
            while True:  # once the replica is primary, and the mirror has caught up
                try:
                    if stage_status(b.url, stage_id, alice).get("status") == "done":
                        break
                except (ValueError, requests.RequestException):
                    pass
                assert time.monotonic() < deadline, "the stage never reached the new primary"
                time.sleep(0.2)
            assert group.primary_for_slot(stage_slot("alice", stage_id)) == replica
            rest = requests.get(
                f"{b.url}/stages/{stage_id}/events",
                headers={**alice, "Last-Event-ID": got[-1]["id"]},
                timeout=10,
            )
            assert rest.status_code == 200, rest.text
            after = parse_events(rest.content)
            if after and after[-1].get("event") == "error" and "id" not in after[-1]:
                # The failover lost events that A no longer held: said, never skipped.
                gap = stage_status(b.url, stage_id, alice)["gap"]
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
    cluster_hosts: Topology, upstream: FakeUpstream
) -> None:
    a, b, group = cluster_hosts.start, cluster_hosts.follow, cluster_hosts.cluster
    assert group is not None
    alice = cluster_hosts.auth("alice")
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
        headers=alice, open=True,
    )  # fmt: skip
    stream.read_until(b"event: chat_completion_chunk")
    with ThreadPoolExecutor(1) as pool:
        followed = pool.submit(
            lambda: requests.get(f"{b.url}/stages/{stage_id}/events", headers=alice, timeout=60)
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
    fake: FakeUpstream, cluster_hosts: Topology
) -> None:
    assert cluster_hosts.cluster is not None
    node = cluster_hosts.cluster.ports[0]
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
