"""Debian's Chromium, headless, driven by Playwright, watched for what a page must not do.

    with watched_browser() as browser:
        page = browser.page
        page.goto(f"{server.url}/playground")
        ...

On leaving the block it fails if the page logged a console error or an uncaught
exception, or asked any host but loopback for anything. A test that provokes an error
on purpose (a connection it cuts) says which with ``allow_console_error(pattern)``;
those it sees are kept in ``allowed_errors``, so the test can check they happened.

It never downloads a browser: without ``/usr/bin/chromium`` it fails and says how to
install it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from playwright.sync_api import ConsoleMessage, Error, Page, Request, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
# Schemes that never leave the machine.
LOCAL_SCHEMES = frozenset({"data", "blob", "about"})


class WatchedBrowser:
    def __init__(self, page: Page) -> None:
        self.page = page
        self.problems: list[str] = []
        self.allowed_errors: list[str] = []
        self._allowed: list[re.Pattern[str]] = []
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.problems.append(f"uncaught: {error}"))
        page.context.on("request", self._request)

    def allow_console_error(self, pattern: str) -> None:
        self._allowed.append(re.compile(pattern))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type != "error":
            return
        if any(allowed.search(message.text) for allowed in self._allowed):
            self.allowed_errors.append(message.text)
        else:
            self.problems.append(f"console error: {message.text} ({message.location})")

    def _request(self, request: Request) -> None:
        url = urlsplit(request.url)
        if url.scheme not in LOCAL_SCHEMES and url.hostname not in LOOPBACK_HOSTS:
            self.problems.append(f"request to a host that is not loopback: {request.url}")


@contextmanager
def watched_browser() -> Iterator[WatchedBrowser]:
    if not CHROMIUM.exists():
        raise RuntimeError(
            f"{CHROMIUM} is missing: the browser tests drive Debian's chromium; "
            "run scripts/setup.sh --dev to install it"
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            watched = WatchedBrowser(browser.new_page())
            yield watched
        finally:
            try:
                browser.close()
            except Error:
                pass  # already gone; the test's own failure says more
    assert not watched.problems, "\n".join(watched.problems)
