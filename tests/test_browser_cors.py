"""CORS in Debian's Chromium: a page of a listed origin calls stageserver on another
origin with its API key; a page of an origin not on the list is refused by the browser.

Three loopback origins: stageserver (gunicorn, with keys and
``STAGESERVER_CORS_ORIGINS``), a static page server whose origin is listed, and one whose
origin is not. The pages import the browser client from stageserver's origin.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from testing.browser import watched_browser
from testing.fake_upstream import FakeUpstream
from testing.servers import Gunicorn, gunicorn_server

KEY = "cors-secret-key-1"
PAGE = (
    b'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>another origin'
    b'</title><link rel="icon" href="data:,"></head><body></body></html>'
)

# In the page: stream a stage from stageserver with the module and the key, then read a
# status with an X-Request-ID of its own.
STREAM = """async ({ server, key }) => {
  const { streamStage } = await import(`${server}/static/stageserver.js`);
  const ids = [];
  const body = { stage_id: "cors-1", model_name: "fake?chunks=3", user_prompt: "hi" };
  const result = await streamStage(body, {
    baseUrl: server, apiKey: key, onEvent: (event) => ids.push(event.id),
  });
  const status = await fetch(`${server}/stages/cors-1`, {
    headers: { Authorization: `Bearer ${key}`, "X-Request-ID": "cors-request-7" },
  });
  return { ids, status: result.status, text: result.text,
           requestId: status.headers.get("X-Request-ID"), stage: (await status.json()).status };
}"""

# In the page of an origin not on the list: what its fetches come to.
REFUSED = """async ({ server, key }) => {
  const attempt = (request) => request.then((r) => `answered ${r.status}`,
                                            (error) => `${error.name}: ${error.message}`);
  return {
    chat: await attempt(fetch(`${server}/chat`, {
      method: "POST", body: JSON.stringify({ stage_id: "cors-2", model_name: "fake",
                                             user_prompt: "hi" }),
      headers: { Authorization: `Bearer ${key}`, "Content-Type": "application/json" },
    })),
    status: await attempt(fetch(`${server}/stages/cors-1`)),
    module: await attempt(import(`${server}/static/stageserver.js`)),
  };
}"""


class _Page(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        found = self.path == "/"
        self.send_response(200 if found else 404)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(PAGE) if found else 0))
        self.end_headers()
        if found:
            self.wfile.write(PAGE)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def page_server() -> Iterator[str]:
    """A static page on an origin of its own; its origin."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def origins(fake: FakeUpstream) -> Iterator[tuple[str, str, Gunicorn]]:
    """The listed origin, the other one, and stageserver."""
    with page_server() as listed, page_server() as other:
        env = {
            "STAGESERVER_UPSTREAM_URL": fake.url,
            "STAGESERVER_API_KEYS": json.dumps({"web": {"key": KEY}}),
            "STAGESERVER_CORS_ORIGINS": json.dumps([listed]),
        }
        with gunicorn_server(env) as server:
            yield listed, other, server


def test_a_page_of_a_listed_origin_streams_a_stage_with_its_key(
    origins: tuple[str, str, Gunicorn], upstream: FakeUpstream
) -> None:
    listed, _, server = origins
    with watched_browser() as browser:
        browser.page.goto(f"{listed}/")
        got = browser.page.evaluate(STREAM, {"server": server.url, "key": KEY})
    # POST /chat with Authorization and a JSON body is preflighted: the preflight passed.
    assert got == {
        "ids": [
            "cors-1-chunk-0",
            "cors-1-chunk-1",
            "cors-1-chunk-2",
            "cors-1-chunk-3",
            "cors-1-chunk-4",
            "cors-1-done-5",
        ],
        "status": "done",
        "text": "tok0 tok1 tok2 ",
        "requestId": "cors-request-7",
        "stage": "done",
    }
    assert '"OPTIONS /chat HTTP/1.1" 200' in server.log()
    assert [r.body["model"] for r in upstream.requests] == ["fake?chunks=3"]


def test_a_page_of_another_origin_is_refused_by_the_browser(
    origins: tuple[str, str, Gunicorn], upstream: FakeUpstream
) -> None:
    _, other, server = origins
    with watched_browser() as browser:
        browser.allow_console_error(r"has been blocked by CORS policy")
        browser.allow_console_error(r"net::ERR_FAILED")
        # What the server answered, which the page may not read: the raw headers in
        # Chromium's own log (the DevTools protocol), the preflight's included.
        cdp = browser.page.context.new_cdp_session(browser.page)
        asked: dict[str, str] = {}
        answered: dict[str, dict[str, str]] = {}
        cdp.on(
            "Network.requestWillBeSent",
            lambda event: asked.update(
                {event["requestId"]: f"{event['request']['method']} {event['request']['url']}"}
            ),
        )
        cdp.on(
            "Network.responseReceivedExtraInfo",
            lambda event: answered.update(
                {event["requestId"]: {k.lower(): v for k, v in event["headers"].items()}}
            ),
        )
        cdp.send("Network.enable")
        browser.page.goto(f"{other}/")
        got = browser.page.evaluate(REFUSED, {"server": server.url, "key": KEY})
        assert browser.allowed_errors
    assert got["chat"] == "TypeError: Failed to fetch"
    assert got["status"] == "TypeError: Failed to fetch"
    assert got["module"].startswith("TypeError: Failed to fetch dynamically imported module")
    headers = {
        asked[request].replace(server.url, ""): answer
        for request, answer in answered.items()
        if server.url in asked[request]
    }
    # The preflight of the POST, the status, the module: none may be read by that page.
    assert set(headers) == {"OPTIONS /chat", "GET /stages/cors-1", "GET /static/stageserver.js"}
    assert [h for h in headers.values() if "access-control-allow-origin" in h] == []
    assert upstream.requests == []  # the POST itself was never sent
