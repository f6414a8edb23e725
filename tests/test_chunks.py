"""Reading an OpenAI chunk: what the stage records, and what ends a stage."""

from __future__ import annotations

from typing import Any

import pytest

from stageserver.errors import UpstreamErrorObject, UpstreamProtocolError
from stageserver.upstream.chunks import read_chunk


@pytest.mark.parametrize(
    ("payload", "read"),
    [
        (
            b'{"choices":[{"index":0,"delta":{"content":"h\xc3\xa9"}}]}',
            ("h\u00e9", None, None, {"content": "h\u00e9"}),
        ),
        (
            b'{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}',
            (None, "stop", None, {}),
        ),
        (
            b'{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}',
            (None, None, {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}, None),
        ),
        (b'{"choices":[{"index":1,"delta":{"content":"other"}}]}', (None, None, None, None)),
        (
            b'{"choices":[{"delta":{"content":"no index"}}]}',
            ("no index", None, None, {"content": "no index"}),
        ),
        (
            b'{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c1"}]}}]}',
            (None, None, None, {"tool_calls": [{"index": 0, "id": "c1"}]}),
        ),
        (b'{"choices":[{"index":0,"delta":{"content":7}}]}', (None, None, None, {"content": 7})),
        (b'{"choices":null,"usage":null}', (None, None, None, None)),
        (b'{"choices":[],"usage":"x"}', (None, None, None, None)),
        (b'{"choices":[],"usage":[1]}', (None, None, None, None)),
        (b'  {"choices":[]}  ', (None, None, None, None)),
    ],
)
def test_what_a_chunk_says(payload: bytes, read: tuple[Any, ...]) -> None:
    assert read_chunk(payload, "up") == read


@pytest.mark.parametrize("payload", [b'{"id": not json', b"[1]", b'{"a":1} x', b"", b'"text"'])
def test_a_chunk_that_is_not_a_json_object(payload: bytes) -> None:
    with pytest.raises(UpstreamProtocolError, match="upstream 'up' sent a chunk that is not a"):
        read_chunk(payload, "up")


def test_an_error_object() -> None:
    with pytest.raises(
        UpstreamErrorObject, match="upstream 'up' reported an error mid-stream: model overloaded"
    ):
        read_chunk(b'{"error":{"message":"model overloaded","type":"server_error"}}', "up")
