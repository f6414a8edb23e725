"""What a takeover leaves for a test to check: the upstream's requests of one stage, the
continuation asked from the text that was durable, and a host's count of continuations.

A stage is told apart at the fake upstream by its request id: a test sends
``X-Request-ID`` (stageserver passes it on to the upstream), and ``seen`` gives that
stage's requests, in order. The hosts continue in ``trailing`` mode: the continuation is
the first request's conversation with the partial answer as a trailing assistant message.
"""

from __future__ import annotations

import requests

from .fake_upstream import FakeUpstream, UpstreamRequest
from .metrics import scrape, value
from .servers import Gunicorn
from .sse import toks

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "assert_continued_from_the_durable_text",
    "continuations",
    "seen",
]

DEFAULT_MAX_TOKENS = 512  # STAGESERVER_DEFAULT_MAX_TOKENS


def seen(fake: FakeUpstream, request_id: str) -> list[UpstreamRequest]:
    """What the upstream saw of one stage (its ``X-Request-ID``), in order."""
    return [r for r in fake.requests if r.headers.get("x-request-id") == request_id]


def assert_continued_from_the_durable_text(fake: FakeUpstream, request_id: str) -> int:
    """The upstream saw the answer asked for, then continued: the second request ends
    with the text delivered (its trailing whitespace held back) and asks only for the
    tokens left. Returns how many content chunks were delivered before it."""
    first, second = seen(fake, request_id)
    assert first.body["max_tokens"] == DEFAULT_MAX_TOKENS
    partial = second.body["messages"][-1]
    delivered = len(partial["content"].split())
    assert delivered > 0
    assert partial == {"role": "assistant", "content": toks(delivered).rstrip()}
    assert second.body["messages"][:-1] == first.body["messages"]
    assert second.body["max_tokens"] == DEFAULT_MAX_TOKENS - delivered
    return delivered


def continuations(host: Gunicorn) -> float:
    """How many stages ``host`` has continued in ``trailing`` mode after their owner was
    lost (``stageserver_stage_continuations_total``)."""
    metrics = scrape(requests.get(f"{host.url}/metrics", timeout=5).text)
    return value(
        metrics,
        "stageserver_stage_continuations_total",
        mode="trailing",
        reason="owner_lost",
        outcome="ok",
    )
