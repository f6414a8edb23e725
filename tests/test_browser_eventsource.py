"""A browser's own EventSource against GET /stages/<id>/events, in Debian's Chromium: it
stops for good after the end (204), and resumes exactly once after a dropped connection.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from testing.browser import WatchedBrowser, watched_browser
from testing.fake_upstream import FakeUpstream
from testing.proxy import CuttingProxy
from testing.servers import Gunicorn, gunicorn_server
from testing.sse import post_chat

# Every event the page sees, the ids it saw them under, its connections, its end.
FOLLOW = """(stageId) => {
  window.seen = {ids: [], opens: 0, errors: [], closed: false};
  const source = new EventSource(`/stages/${stageId}/events`);
  for (const name of ["chat_completion_chunk", "done", "cancel"]) {
    source.addEventListener(name, (event) => window.seen.ids.push(event.lastEventId));
  }
  source.onopen = () => { window.seen.opens += 1; };
  source.onerror = (event) => {
    // A connection error has no data; a stage's own `error` event has.
    window.seen.errors.push(event.data === undefined ? "connection" : event.data);
    window.seen.closed = source.readyState === EventSource.CLOSED;
  };
}"""


@pytest.fixture(scope="module")
def server(fake: FakeUpstream) -> Iterator[Gunicorn]:
    settings = {"STAGESERVER_UPSTREAM_URL": fake.url, "STAGESERVER_SSE_RETRY_MS": "200"}
    with gunicorn_server(settings) as gunicorn:
        yield gunicorn


@pytest.fixture
def browser() -> Iterator[WatchedBrowser]:
    with watched_browser() as watched:
        yield watched


def follows(server: Gunicorn, stage_id: str) -> int:
    return server.log().count(f'"GET /stages/{stage_id}/events HTTP/1.1"')


def seen(browser: WatchedBrowser) -> dict[str, Any]:
    value: dict[str, Any] = browser.page.evaluate("window.seen")
    return value


def test_eventsource_stops_for_good_after_the_end(
    server: Gunicorn, browser: WatchedBrowser
) -> None:
    assert post_chat(server.url, stage_id="es-end", stream=False).status_code == 200
    page = browser.page
    page.goto(f"{server.url}/playground")  # a page of the origin (it declares its icon)
    page.evaluate(FOLLOW, "es-end")
    page.wait_for_function("window.seen.closed")
    time.sleep(1.0)  # five retry intervals: no other reconnect comes
    result = seen(browser)
    assert result["ids"] == [f"es-end-chunk-{n}" for n in range(7)] + ["es-end-done-7"]
    # The stream ended (an error event, as EventSource reports every end); it came back
    # once, with the done event's id, got 204 (another), and stopped.
    assert (result["opens"], result["errors"], result["closed"]) == (
        1,
        ["connection", "connection"],
        True,
    )
    assert follows(server, "es-end") == 2
    assert '"GET /stages/es-end/events HTTP/1.1" 204' in server.log()


def test_eventsource_resumes_exactly_once_after_a_drop(
    server: Gunicorn, browser: WatchedBrowser, upstream: FakeUpstream
) -> None:
    browser.allow_console_error(r"ERR_(INCOMPLETE_CHUNKED_ENCODING|EMPTY_RESPONSE)")
    stream = post_chat(
        server.url, stage_id="es-cut", model_name="fake?chunks=60&interval=0.05",
        resumable=True, open=True,
    )  # fmt: skip
    stream.read_until(b"event: chat_completion_chunk")
    stream.close()  # resumable: it runs on
    with CuttingProxy(server.port) as proxy:
        page = browser.page
        page.goto(f"{proxy.url}/playground")
        page.evaluate(FOLLOW, "es-cut")
        page.wait_for_function("window.seen.ids.length >= 10")
        proxy.cut()
        page.wait_for_function("window.seen.closed", timeout=20_000)
    result = seen(browser)
    assert result["ids"] == [f"es-cut-chunk-{n}" for n in range(62)] + ["es-cut-done-62"]
    assert result["opens"] == 2  # the first connection, and the resumed one
    assert result["errors"] == ["connection"] * 3  # the cut, the end, the 204
    assert upstream.requests[0].done_sent  # one stage, never restarted
    assert len(upstream.requests) == 1
