from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient

from stageserver import create_app
from testing.anthropic_sdk import AnthropicSDK
from testing.fake_upstream import FakeUpstream
from testing.servers import RedisClusterGroup, RedisServer
from testing.venvs import cached_venv


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
def app(upstream: FakeUpstream) -> Flask:
    return create_app({"STAGESERVER_UPSTREAM_URL": upstream.url})


@pytest.fixture
def client(app: Flask) -> FlaskClient:
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
