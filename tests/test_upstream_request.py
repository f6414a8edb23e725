"""A stage's upstream request (``upstream/clients.py``): built from what the SDK rendered
once for its replica and path (``RequestTemplate``), it is the request the SDK's own
``post`` sends, and it fails as that would, mapped to the same errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx2
import openai
import pytest
from openai._models import FinalRequestOptions

from stageserver.config import apply_defaults, upstream_configs
from stageserver.errors import UpstreamStatusError, UpstreamUnavailable
from stageserver.upstream.clients import ReplicaClient
from testing.fake_upstream import FakeUpstream
from testing.servers import free_port

BODY = {
    "model": "fake?chunks=2",
    "messages": [{"role": "user", "content": 'héllo \u2028 "quoted"'}],
    "stream": True,
    "stream_options": {"include_usage": True},
    "max_tokens": 16,
}


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        yield server


def _replica(url: str, api_key: str = "sk-test") -> ReplicaClient:
    config: dict[str, Any] = {
        "STAGESERVER_UPSTREAM_URL": url,
        "STAGESERVER_UPSTREAM_API_KEY": api_key,
    }
    apply_defaults(config, {})
    return ReplicaClient(upstream_configs(config)[0])


def _sdk_post(replica: ReplicaClient, body: dict[str, Any], headers: dict[str, str]) -> None:
    response = replica.client.post(
        "/chat/completions", body=body, cast_to=httpx2.Response, stream=True,
        options={"headers": headers},
    )  # fmt: skip
    response.read()
    response.close()


def test_the_request_is_the_one_the_sdk_sends(fake: FakeUpstream) -> None:
    replica = _replica(fake.url)
    try:
        headers = {"X-Request-ID": "r1", "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}
        _sdk_post(replica, BODY, headers)
        for _ in range(2):  # rendered, then reused
            response = replica.open_stream(BODY, headers)
            response.read()
            response.close()
    finally:
        replica.close()
    sdk, *ours = fake.requests
    assert len(ours) == 2
    for request in ours:
        assert (
            (request.method, request.path)
            == (sdk.method, sdk.path)
            == ("POST", "/v1/chat/completions")
        )
        assert request.headers == sdk.headers  # the same names and values (case aside)
        assert request.body == sdk.body == BODY
    assert sdk.headers["authorization"] == "Bearer sk-test"
    assert sdk.headers["accept-encoding"] == "identity"
    assert sdk.headers["x-request-id"] == "r1"


def test_a_stage_header_replaces_the_rendered_one_of_its_name(fake: FakeUpstream) -> None:
    replica = _replica(fake.url)
    try:
        replica.open_stream(BODY, {"Accept-Encoding": "gzip", "X-Request-ID": "r2"}).close()
        _sdk_post(replica, BODY, {"Accept-Encoding": "gzip", "X-Request-ID": "r2"})
    finally:
        replica.close()
    ours, sdk = fake.requests
    assert ours.headers == sdk.headers
    assert ours.headers["accept-encoding"] == "gzip"


def test_the_body_is_the_sdks_serialisation(fake: FakeUpstream) -> None:
    replica = _replica(fake.url)
    try:
        request = replica.template("/chat/completions")
        built = replica.client._build_request(  # the SDK's, for the same body
            FinalRequestOptions.construct(method="post", url="/chat/completions", json_data=BODY)
        )
        response = request.send(BODY, {})
        response.close()
    finally:
        replica.close()
    assert json.loads(built.content) == fake.requests[0].body
    assert built.content == json.dumps(BODY, ensure_ascii=False, separators=(",", ":")).encode()


def test_a_status_is_the_sdks_error_and_the_same_upstream_status_error(fake: FakeUpstream) -> None:
    replica = _replica(fake.url)
    body = {**BODY, "model": "fake?mode=status&status=429&retry_after=7"}
    try:
        with pytest.raises(UpstreamStatusError) as ours:
            replica.open_stream(body, {})
        with pytest.raises(openai.RateLimitError):  # the SDK's own error for it
            _sdk_post(replica, body, {})
    finally:
        replica.close()
    assert "answered HTTP 429" in str(ours.value)
    assert (ours.value.upstream_status, ours.value.upstream_retry_after) == (429, 7)


def test_an_upstream_not_listening_is_unavailable_as_before() -> None:
    replica = _replica(f"http://127.0.0.1:{free_port()}/v1")
    replica = ReplicaClient(replace(replica.config, connect_timeout=1.0))
    try:
        with pytest.raises(
            UpstreamUnavailable, match="could not reach upstream 'default' at .*is it running"
        ):
            replica.open_stream(BODY, {})
    finally:
        replica.close()
