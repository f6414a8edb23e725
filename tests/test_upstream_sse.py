"""Splitting an upstream SSE body into payloads, whatever the reads look like."""

from __future__ import annotations

import pytest

from stageserver.upstream.sse import SSEPayloadSplitter

BODY = 'data: {"a":"é👋"}\n\n: keep-alive\n\nevent: x\nid: 7\ndata: [DONE]\n\n'.encode()


def feed_all(reads: list[bytes]) -> list[bytes]:
    splitter = SSEPayloadSplitter()
    payloads = [p for raw in reads for p in splitter.feed(raw)]
    assert not splitter.pending()
    return payloads


def test_whole_body_in_one_read() -> None:
    assert feed_all([BODY]) == ['{"a":"é👋"}'.encode(), b"[DONE]"]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7])
def test_every_split_of_the_body_gives_the_same_payloads(size: int) -> None:
    # Byte-sized reads split the 2- and 4-byte UTF-8 characters and every line ending.
    reads = [BODY[i : i + size] for i in range(0, len(BODY), size)]
    assert feed_all(reads) == ['{"a":"é👋"}'.encode(), b"[DONE]"]


def test_crlf_split_across_reads() -> None:
    assert feed_all([b'data: {"a":1}\r', b"\n\r", b"\n", b"data: [DONE]\r\n\r\n"]) == [
        b'{"a":1}',
        b"[DONE]",
    ]


def test_lone_cr_line_endings() -> None:
    reads = [b'data: {"a":1}\r\rdata: 2\r', b"\rdata: 3\n\n"]
    assert feed_all(reads) == [b'{"a":1}', b"2", b"3"]


def test_multiline_data_is_joined_with_a_space() -> None:
    body = b'data: {\ndata:  "a": 1,\ndata: "b": 2\ndata: }\n\n'
    assert feed_all([body]) == [b'{  "a": 1, "b": 2 }']


def test_data_without_space_after_colon() -> None:
    assert feed_all([b"data:[DONE]\n\n"]) == [b"[DONE]"]


def test_truncated_event_is_pending() -> None:
    splitter = SSEPayloadSplitter()
    assert splitter.feed(b'data: {"a":1}\n') == []
    assert splitter.pending()
    partial = SSEPayloadSplitter()
    assert partial.feed(b'data: {"a"') == []
    assert partial.pending()
