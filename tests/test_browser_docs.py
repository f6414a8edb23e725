"""/docs in Debian's Chromium: Swagger UI, served by stageserver itself, renders this
server's document, asks no other host for anything (watched_browser fails the test if it
does, or logs an error), and "Try it out" reaches the API under a prefix, with a key."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import requests
from playwright.sync_api import expect

from testing.browser import watched_browser
from testing.fake_upstream import FakeUpstream
from testing.servers import Gunicorn, gunicorn_server

KEY = "docs-secret-key-1"
PREFIX = "/llm"  # gunicorn's SCRIPT_NAME: the app is mounted there


@pytest.fixture(scope="module")
def server(fake: FakeUpstream) -> Iterator[Gunicorn]:
    env = {
        "STAGESERVER_UPSTREAM_URL": fake.url,
        "STAGESERVER_API_KEYS": json.dumps({"docs": {"key": KEY}}),
        "SCRIPT_NAME": PREFIX,
    }
    with gunicorn_server(env) as gunicorn:
        yield gunicorn


def test_docs_show_every_operation_and_try_it_out_works_under_a_prefix(
    server: Gunicorn, upstream: FakeUpstream
) -> None:
    document = requests.get(f"{server.url}{PREFIX}/openapi.json", timeout=5).json()
    assert document["servers"] == [{"url": PREFIX}]
    with watched_browser() as browser:
        page = browser.page
        page.goto(f"{server.url}{PREFIX}/docs")
        paths = page.locator(".opblock-summary-path")
        expect(paths).to_have_count(sum(len(item) for item in document["paths"].values()))
        # One summary per operation: a path with two methods shows twice.
        operations = [path for path, item in document["paths"].items() for _ in item]
        assert sorted(paths.all_inner_texts()) == sorted(operations)

        page.get_by_role("button", name="Authorize").first.click()
        # Two schemes: the bearer key, and the same key in x-api-key (Anthropic's clients).
        containers = page.locator(".auth-container")
        expect(containers.filter(has_text="apiKeyAuth")).to_have_count(1)
        bearer = containers.filter(has_text="bearerAuth")
        bearer.locator("input").fill(KEY)
        bearer.get_by_role("button", name="Authorize").click()
        page.get_by_role("button", name="Close").first.click()

        chat = page.locator("#operations-stages-chat")
        chat.locator(".opblock-summary").click()
        chat.get_by_role("button", name="Try it out").click()
        chat.get_by_role("button", name="Execute").click()
        status = chat.locator(".live-responses-table td.response-col_status:not(.col_header)")
        expect(status).to_have_text("200")
        expect(chat.locator(".request-url")).to_contain_text(f"{server.url}{PREFIX}/chat")
    # The document's example, sent with the key: a stage of that principal, done.
    answer = requests.get(
        f"{server.url}{PREFIX}/stages/summary-1",
        timeout=5,
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert answer.json().get("status") == "done", answer.text
    assert upstream.requests[0].body["max_tokens"] == 64
