"""The one SSE encoder, on exact bytes."""

from __future__ import annotations

import pytest

from stageserver.sse import compact_json, encode_comment, encode_event, encode_retry


@pytest.mark.parametrize(
    ("event", "data", "event_id", "wire"),
    [
        (
            "done",
            b'{"stage_id":"s"}',
            "s-done-3",
            b'id: s-done-3\nevent: done\ndata: {"stage_id":"s"}\n\n',
        ),
        ("done", b"{}", None, b"event: done\ndata: {}\n\n"),
        ("x", b"a\nb", "1", b"id: 1\nevent: x\ndata: a\ndata: b\n\n"),
        ("x", b"a\r\nb\rc", "1", b"id: 1\nevent: x\ndata: a\ndata: b\ndata: c\n\n"),
        ("x", b"", "1", b"id: 1\nevent: x\ndata: \n\n"),
        ("x", "é👋".encode(), "1", "id: 1\nevent: x\ndata: é👋\n\n".encode()),
    ],
)
def test_encode_event(event: str, data: bytes, event_id: str | None, wire: bytes) -> None:
    assert encode_event(event, data, event_id) == wire


@pytest.mark.parametrize(
    ("event", "event_id"), [("done\n", "1"), ("done", "1\nevent: x"), ("a\rb", "1")]
)
def test_line_breaks_in_id_or_event_are_refused(event: str, event_id: str) -> None:
    with pytest.raises(ValueError, match="line break"):
        encode_event(event, b"{}", event_id)


def test_comment_and_retry_lines_end_no_block() -> None:
    assert encode_comment("heartbeat") == b": heartbeat\n"
    assert encode_comment("a\nb") == b": a\n: b\n"
    assert encode_retry(1500) == b"retry: 1500\n"


def test_compact_json_keeps_unicode() -> None:
    assert compact_json({"stage_id": "s", "error": "é"}) == '{"stage_id":"s","error":"é"}'.encode()


def test_compact_json_escapes_a_lone_surrogate_as_an_upstream_sent_it() -> None:
    # json.loads('"\\ud800"') is a string UTF-8 cannot hold: a delta an upstream may send.
    assert compact_json({"content": "a\ud800é"}) == b'{"content":"a\\ud800\\u00e9"}'
