"""The fixtures every test module shares, and the hooks that mark and check the tests that
start a process (``testing/processes.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient

from stageserver import close, create_app
from testing.anthropic_sdk import AnthropicSDK
from testing.fake_upstream import FakeUpstream
from testing.servers import RedisClusterGroup, RedisServer
from testing.topology import CLUSTER, REDIS, TOPOLOGIES, Topologies, Topology
from testing.venvs import cached_venv

#: Marks the tests that start a process, and fails one unmarked that starts one; fails a
#: test that leaves a stageserver background thread running (an app it did not close);
#: hands the longest modules out first in a parallel run.
pytest_plugins = ("testing.processes", "testing.threads", "testing.schedule")


@pytest.fixture(scope="session")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture
def upstream(fake: FakeUpstream) -> FakeUpstream:
    """The shared fake upstream, with the previous test's records cleared."""
    fake.reset()
    fake.defaults.clear()
    return fake


@pytest.fixture
def app(upstream: FakeUpstream) -> Iterator[Flask]:
    """An app on the shared fake upstream, closed after the test."""
    app = create_app({"STAGESERVER_UPSTREAM_URL": upstream.url})
    yield app
    close(app)


@pytest.fixture
def flask_client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of the module's own."""
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisClusterGroup]:
    """A Redis Cluster of the module's own: 3 primaries, no replica."""
    with RedisClusterGroup() as group:
        yield group


@pytest.fixture(scope="session")
def anthropic_sdk() -> Iterator[AnthropicSDK]:
    """Anthropic's Python SDK, its newest release, in a venv of its own (pip brings it up
    to date from the package index; a failure fails the test, never skips it)."""
    with cached_venv("anthropic-sdk", ["anthropic"]) as venv:
        yield AnthropicSDK(venv)


@pytest.fixture(scope="session")
def topologies(fake: FakeUpstream) -> Iterator[Topologies]:
    """Every topology's hosts, started when a test first asks for them, for the session."""
    with Topologies(fake) as started:
        yield started


@pytest.fixture(params=TOPOLOGIES, ids=("one_worker", "redis", "cluster"))
def topology(
    request: pytest.FixtureRequest, topologies: Topologies, upstream: FakeUpstream
) -> Iterator[Topology]:
    """A scenario's hosts, once per topology: one worker, two hosts on Redis, two hosts on
    a Redis Cluster. Their logs get no traceback and no key during the test."""
    with topologies[request.param].checked() as topology:
        yield topology


@pytest.fixture
def redis_hosts(topologies: Topologies, upstream: FakeUpstream) -> Iterator[Topology]:
    """The two hosts on one Redis that the scenarios share (``topology``)."""
    with topologies[REDIS].checked() as topology:
        yield topology


@pytest.fixture
def cluster_hosts(topologies: Topologies, upstream: FakeUpstream) -> Iterator[Topology]:
    """The two hosts on a Redis Cluster that the scenarios share (``topology``)."""
    with topologies[CLUSTER].checked() as topology:
        yield topology


@pytest.fixture
def trailing(upstream: FakeUpstream) -> Iterator[FakeUpstream]:
    """The fake upstream, continuing a trailing assistant message (as llama-server does)."""
    upstream.defaults["continuation"] = "trailing"
    yield upstream
    upstream.defaults.clear()  # the fake is the session's
