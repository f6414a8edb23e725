"""The browser client (/static/stageserver.js) and the playground, in Debian's Chromium,
against a real gunicorn and the fake upstream.

The playground test takes a screenshot mid-stream; with ``UPDATE_SCREENSHOTS=1`` it
replaces ``docs/playground.png``, the README's picture.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from testing.browser import WatchedBrowser, watched_browser
from testing.fake_upstream import FakeUpstream
from testing.proxy import CuttingProxy
from testing.servers import ROOT, Gunicorn, gunicorn_server
from testing.sse import estimated_usage, stage_status, wait_for_status

LONG = "fake?chunks=500&interval=0.05"
SCREENSHOT = ROOT / "docs" / "playground.png"

# Starts a stage in the page; window.runs[stage_id] records what the module reports.
START = """async ({ body, options }) => {
  const { streamStage } = await import("/static/stageserver.js");
  const run = { ids: [], text: "", connects: [], result: null, error: null };
  const controller = new AbortController();
  window.runs = { ...window.runs, [body.stage_id]: run };
  window.aborts = { ...window.aborts, [body.stage_id]: () => controller.abort() };
  streamStage(body, {
    ...options,
    signal: controller.signal,
    onEvent: (event) => { run.ids.push(event.id); run.text += event.text ?? ""; },
    onConnect: ({ kind, lastEventId }) => run.connects.push([kind, lastEventId]),
  }).then(
    (result) => { run.result = { ...result, events: result.events.map((e) => e.type) }; },
    (error) => { run.error = { name: error.name, message: error.message,
      status: error.status ?? null, fields: error.fields ?? null }; },
  );
}"""


@pytest.fixture(scope="module")
def server(fake: FakeUpstream) -> Iterator[Gunicorn]:
    with gunicorn_server({"STAGESERVER_UPSTREAM_URL": fake.url}) as gunicorn:
        yield gunicorn


@pytest.fixture
def browser() -> Iterator[WatchedBrowser]:
    with watched_browser() as watched:
        yield watched


def open_module(page: Page, base_url: str) -> None:
    """A page on the server's origin, from which the module can be imported: the
    playground's, once it has settled (any other page makes Chromium ask for a favicon)."""
    page.goto(f"{base_url}/playground")
    expect(page.get_by_label("Upstream")).to_have_value("default")


def start(page: Page, body: dict[str, Any], **options: Any) -> None:
    page.evaluate(START, {"body": {"user_prompt": "hi", **body}, "options": options})


def seen(page: Page, stage_id: str) -> dict[str, Any]:
    run: dict[str, Any] = page.evaluate("(id) => window.runs[id]", stage_id)
    return run


def finished(page: Page, stage_id: str) -> dict[str, Any]:
    page.wait_for_function("(id) => window.runs[id].result || window.runs[id].error", arg=stage_id)
    return seen(page, stage_id)


def wait_for_events(page: Page, stage_id: str, count: int) -> None:
    page.wait_for_function("([id, n]) => window.runs[id].ids.length >= n", arg=[stage_id, count])


def ids(stage_id: str, chunks: int, end: str = "done") -> list[str]:
    """Ids of a stage of the fake upstream: its content chunks, the finish and usage chunks."""
    return [f"{stage_id}-chunk-{n}" for n in range(chunks + 2)] + [f"{stage_id}-{end}-{chunks + 2}"]


def tokens(count: int) -> str:
    return "".join(f"tok{n} " for n in range(count))


# (pieces as they arrive, in bytes) -> (events, last retry, last event id)
PARSER_CASES: list[tuple[list[bytes], list[dict[str, str]], int | None, str]] = [
    (
        [b"id: a-1\r", b"\nevent: done\r\ndata: {}\r", b"\n\r", b"\n"],
        [{"type": "done", "data": "{}", "lastEventId": "a-1"}],
        None,
        "a-1",
    ),
    (
        [b"data: caf\xc3", b"\xa9\n\n"],
        [{"type": "message", "data": "café", "lastEventId": ""}],
        None,
        "",
    ),
    (
        [b": heartbeat\n\n", b"event: x\ndata: a\ndata: b\n\n", b": heartbeat\n\n"],
        [{"type": "x", "data": "a\nb", "lastEventId": ""}],
        None,
        "",
    ),
    ([b"retry: 2500\n\nretry: soon\n\n"], [], 2500, ""),
    (
        [b"id: a\ndata: 1\n\nid\ndata: 2\n\n"],
        [
            {"type": "message", "data": "1", "lastEventId": "a"},
            {"type": "message", "data": "2", "lastEventId": ""},
        ],
        None,
        "",
    ),
    (
        [b"\xef\xbb\xbfdata:x\rdata:  y\r\r", b"event: done\n\n"],
        [{"type": "message", "data": "x\n y", "lastEventId": ""}],
        None,
        "",
    ),
]


def test_the_sse_parser_reads_the_standard_from_awkward_pieces(
    browser: WatchedBrowser, server: Gunicorn
) -> None:
    open_module(browser.page, server.url)
    got = browser.page.evaluate(
        """async (cases) => {
          const { SSEParser } = await import("/static/stageserver.js");
          return cases.map((pieces) => {
            const [parser, decoder, events] = [new SSEParser(), new TextDecoder(), []];
            for (const piece of pieces) {
              events.push(...parser.push(decoder.decode(new Uint8Array(piece), { stream: true })));
            }
            return [events, parser.retry, parser.lastEventId];
          });
        }""",
        [[list(piece) for piece in pieces] for pieces, *_ in PARSER_CASES],
    )
    assert got == [[events, retry, last_id] for _, events, retry, last_id in PARSER_CASES]


def test_stream_stage_reports_each_event_and_resolves_with_the_outcome(
    browser: WatchedBrowser, server: Gunicorn, upstream: FakeUpstream
) -> None:
    open_module(browser.page, server.url)
    start(browser.page, {"stage_id": "b1", "model_name": "fake?chunks=3", "max_tokens": 2})
    run = finished(browser.page, "b1")
    assert run["error"] is None
    assert run["ids"] == ["b1-chunk-0", "b1-chunk-1", "b1-chunk-2", "b1-chunk-3", "b1-done-4"]
    assert run["connects"] == [["chat", ""]]
    assert run["result"] == {
        "status": "done",
        "text": "tok0 tok1 ",
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        "error": None,
        "reason": None,
        "events": ["chat_completion_chunk"] * 4 + ["done"],
    }
    assert run["text"] == "tok0 tok1 "
    assert upstream.requests[0].body["max_tokens"] == 2


def test_a_cut_connection_resumes_and_every_event_arrives_once(
    browser: WatchedBrowser, server: Gunicorn, upstream: FakeUpstream
) -> None:
    browser.allow_console_error(r"net::ERR_INCOMPLETE_CHUNKED_ENCODING")
    with CuttingProxy(server.port) as proxy:
        open_module(browser.page, proxy.url)
        model = "fake?chunks=40&interval=0.03"
        start(browser.page, {"stage_id": "bcut", "model_name": model, "resumable": True})
        wait_for_events(browser.page, "bcut", 5)
        assert proxy.cut() >= 1
        run = finished(browser.page, "bcut")
        sent = proxy.sent_by_clients()
    assert run["error"] is None
    assert run["ids"] == ids("bcut", 40)
    assert (run["result"]["status"], run["result"]["text"]) == ("done", tokens(40))
    assert run["text"] == tokens(40)
    (chat, _), (kind, resumed_after) = run["connects"]
    assert (chat, kind) == ("chat", "resume")
    assert resumed_after in run["ids"][4:-1]
    assert re.findall(rb"Last-Event-ID: (\S+)", sent, flags=re.I) == [resumed_after.encode()]
    assert browser.allowed_errors  # the browser did see its connection cut
    assert [r.done_sent for r in upstream.requests] == [True]


def test_cancel_stage_stops_it_and_the_stream_ends_with_cancel(
    browser: WatchedBrowser, server: Gunicorn, upstream: FakeUpstream
) -> None:
    browser.allow_console_error(r"status of 409 \(CONFLICT\)")  # Chromium logs every 4xx
    page = browser.page
    open_module(page, server.url)
    start(page, {"stage_id": "bstop", "model_name": LONG})
    wait_for_events(page, "bstop", 2)
    cancel = "async (id) => (await import('/static/stageserver.js')).cancelStage(id)"
    assert page.evaluate(cancel, "bstop") == {"stage_id": "bstop", "status": "cancelling"}
    run = finished(page, "bstop")
    result = run["result"]
    assert (result["status"], result["reason"]) == ("cancelled", "cancelled by request")
    assert result["events"][-1] == "cancel"
    assert run["ids"][-1] == f"bstop-cancel-{len(run['ids']) - 1}"
    assert upstream.wait_for(lambda: upstream.requests[0].client_closed_at is not None)
    again = page.evaluate(f"({cancel})('bstop').catch((e) => [e.status, e.message])", "bstop")
    assert again == [409, "stage 'bstop' has already finished"]
    assert len(browser.allowed_errors) == 1


def test_aborting_the_signal_disconnects_and_never_cancels(
    browser: WatchedBrowser, server: Gunicorn, upstream: FakeUpstream
) -> None:
    page = browser.page
    open_module(page, server.url)
    for stage_id, resumable in (("bkeep", True), ("bgone", False)):
        start(page, {"stage_id": stage_id, "model_name": LONG, "resumable": resumable})
        wait_for_events(page, stage_id, 2)
        page.evaluate("(id) => window.aborts[id]()", stage_id)
        assert finished(page, stage_id)["error"]["name"] == "AbortError"
    gone = wait_for_status(server.url, "bgone", "cancelled")
    assert gone["cancel_reason"] == "client disconnected"
    assert upstream.wait_for(lambda: upstream.requests[1].client_closed_at is not None)
    # The resumable stage runs on for its grace period, for a client to re-attach.
    assert wait_for_status(server.url, "bkeep", "running")["resumable"] is True
    assert upstream.requests[0].client_closed_at is None
    page.evaluate("async () => (await import('/static/stageserver.js')).cancelStage('bkeep')")


def test_a_refused_stage_rejects_with_the_fields_to_fix(
    browser: WatchedBrowser, server: Gunicorn, upstream: FakeUpstream
) -> None:
    browser.allow_console_error(r"status of 422 \(UNPROCESSABLE ENTITY\)")
    open_module(browser.page, server.url)
    start(browser.page, {"stage_id": "bad", "model_name": "fake", "max_tokens": 0})
    assert finished(browser.page, "bad")["error"] == {
        "name": "StageError",
        "message": "invalid request: max_tokens: must be from 1 to 4096 (got 0)",
        "status": 422,
        "fields": [{"field": "max_tokens", "message": "must be from 1 to 4096 (got 0)"}],
    }
    assert upstream.requests == []


def test_the_playground_streams_a_stage_shows_its_events_and_resumes_a_drop(
    browser: WatchedBrowser, server: Gunicorn, upstream: FakeUpstream
) -> None:
    upstream.defaults.update({"chunks": "80", "interval": "0.04", "text": PLAYGROUND_TEXT})
    page = browser.page
    page.goto(f"{server.url}/playground")
    expect(page.get_by_label("Upstream")).to_have_value("default")
    page.get_by_label("Model").fill("fake")
    page.get_by_label("User prompt").press("Control+Enter")  # the keyboard's way to start
    page.wait_for_function("document.querySelectorAll('#raw-events li').length >= 20")
    page.get_by_role("button", name="Drop the connection").click()
    expect(page.locator("#connection-log li")).to_have_count(3)
    page.screenshot(path=screenshot_path(), full_page=True)
    expect(page.get_by_role("status")).to_have_text("Done.", timeout=20_000)

    stage_id = stage_of(page)
    assert page.locator("#answer").inner_text() == PLAYGROUND_TEXT
    raw = [text.split("\n") for text in page.locator("#raw-events pre").all_inner_texts()]
    expected = zip(ids(stage_id, 80), kinds(80), strict=True)
    assert [lines[:2] for lines in raw] == [[f"id: {i}", f"event: {kind}"] for i, kind in expected]
    usage = '{"prompt_tokens":8,"completion_tokens":80,"total_tokens":88}'
    assert raw[-1][2] == f'data: {{"stage_id":"{stage_id}","usage":{usage}}}'
    log = page.locator("#connection-log li").all_inner_texts()
    assert log[0] == f"POST /chat: streaming stage {stage_id}."
    assert re.fullmatch(rf"Dropped the connection after {stage_id}-chunk-(\d+)\.", log[1])
    dropped_after = log[1].removeprefix("Dropped the connection after ").removesuffix(".")
    assert log[2:] == [f"Resumed: GET /stages/{stage_id}/events, Last-Event-ID {dropped_after}."]
    # The fake counts words: "Answer briefly." and "What is the capital of France?"
    assert page.locator("#usage").inner_text() == "8 prompt + 80 completion = 88 tokens"
    assert page.locator("#ttft").inner_text().endswith(" ms")
    assert [r.done_sent for r in upstream.requests] == [True]


def test_the_playground_stop_button_cancels_the_stage(
    browser: WatchedBrowser, server: Gunicorn, upstream: FakeUpstream
) -> None:
    page = browser.page
    page.goto(f"{server.url}/playground")
    page.get_by_label("Model").fill(LONG)
    page.get_by_role("button", name="Start").click()
    page.wait_for_function("document.querySelectorAll('#raw-events li').length >= 3")
    page.get_by_role("button", name="Stop").click()
    expect(page.get_by_role("status")).to_have_text("Cancelled: cancelled by request")
    raw = page.locator("#raw-events pre")
    last = raw.last.inner_text().split("\n")
    # Estimated (the upstream's usage chunk never came): 8 + 12 prompt tokens for the
    # playground's two prompts, one completion token per chunk shown.
    chunks = raw.count() - 1
    usage = estimated_usage(chunks, prompt_tokens=20)
    data = {"stage_id": stage_of(page), "reason": "cancelled by request", "usage": usage}
    assert last[1:] == ["event: cancel", f"data: {json.dumps(data, separators=(',', ':'))}"]
    assert upstream.wait_for(lambda: upstream.requests[0].client_closed_at is not None)
    expect(page.get_by_role("button", name="Start")).to_be_enabled()


def test_the_playground_is_in_keyboard_order(browser: WatchedBrowser, server: Gunicorn) -> None:
    page = browser.page
    page.goto(f"{server.url}/playground")
    page.get_by_label("API key").focus()
    order = []
    for _ in range(9):
        order.append(page.evaluate("document.activeElement.id"))
        page.keyboard.press("Tab")
    fields = ["upstream", "model", "system-prompt", "user-prompt", "temperature", "max-tokens"]
    assert order == ["api-key", *fields, "resumable", "start"]


CAROL = "carol-secret-key-3"


@pytest.fixture(scope="module")
def keyed_server(fake: FakeUpstream) -> Iterator[Gunicorn]:
    env = {
        "STAGESERVER_UPSTREAMS": json.dumps(
            {"first": {"url": fake.url}, "second": {"url": fake.url}}
        ),
        "STAGESERVER_API_KEYS": json.dumps({"carol": {"key": CAROL, "upstreams": ["second"]}}),
    }
    with gunicorn_server(env) as gunicorn:
        yield gunicorn


def test_the_playground_takes_an_api_key_and_says_plainly_when_it_is_refused(
    browser: WatchedBrowser, keyed_server: Gunicorn
) -> None:
    browser.allow_console_error(r"status of 401 \(UNAUTHORIZED\)")  # Chromium logs every 4xx
    page = browser.page
    page.goto(f"{keyed_server.url}/playground")
    key, problem = page.get_by_label("API key"), page.locator("#api-key-problem")
    assert key.get_attribute("type") == "password"
    expect(problem).to_have_text("This server requires an API key: enter it here.")
    expect(page.get_by_label("Upstream")).to_have_value("")

    key.fill("not-a-known-key")
    key.press("Tab")  # the keyboard's way: the key is read when it changes
    expect(problem).to_have_text("The server refused this API key (401): unknown API key")

    key.fill(CAROL)
    key.press("Tab")
    expect(problem).to_have_text("")
    # GET /upstreams lists only the upstreams this key may use.
    expect(page.locator("#upstream option")).to_have_text(["second (openai, default)"])
    page.get_by_label("Model").fill("fake?chunks=3")
    page.get_by_label("User prompt").press("Control+Enter")
    expect(page.get_by_role("status")).to_have_text("Done.")
    assert page.locator("#answer").inner_text() == "tok0 tok1 tok2 "
    status = stage_status(keyed_server.url, stage_of(page), {"Authorization": f"Bearer {CAROL}"})
    assert (status["status"], status["upstream"]) == ("done", "second")

    # Kept for the page's life only: in no storage, no URL, no cookie, nothing shown.
    kept = page.evaluate("[localStorage.length, sessionStorage.length, document.cookie]")
    assert kept == [0, 0, ""]
    assert CAROL not in page.url
    assert CAROL not in page.content()
    assert CAROL not in page.locator("body").inner_text()

    key.fill("")
    key.press("Tab")
    page.get_by_label("User prompt").press("Control+Enter")
    expect(page.get_by_role("status")).to_have_text(
        "Failed: this server requires an API key: send 'Authorization: Bearer <key>'"
    )
    expect(problem).to_have_text("This server requires an API key: enter it here.")
    assert CAROL not in keyed_server.log()


PLAYGROUND_TEXT = (
    "Paris is the capital of France. It sits on the Seine, in the north of the country, "
    "and has been the seat of its government for most of the last thousand years."
)


def kinds(chunks: int) -> list[str]:
    return ["chat_completion_chunk"] * (chunks + 2) + ["done"]


def stage_of(page: Page) -> str:
    """The id the playground chose, from its first event."""
    first = page.locator("#raw-events pre").first.inner_text()
    return first.removeprefix("id: ").split("-chunk-0")[0]


def screenshot_path() -> str:
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        return str(SCREENSHOT)
    return str(ROOT / ".pytest_cache" / "playground.png")
